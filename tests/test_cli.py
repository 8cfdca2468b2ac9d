"""The `asr-lora` entry point: subcommands, help, info, import-ct2, transcribe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asr_lora.cli import build_parser, main

from .conftest import ASSETS

SUBCOMMANDS = ["info", "import-ct2", "prepare", "transcribe"]


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "asr_lora.cli", "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert name in out.stdout


def test_console_script_installed():
    out = subprocess.run(["asr-lora", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("asr-lora ")


@pytest.mark.parametrize("argv", [["info"], ["import-ct2", "a", "b"], ["prepare", "kspon", "--root", "r", "--out", "o"],
                                  ["prepare", "manifest", "m.jsonl", "--out", "o"], ["transcribe", "x.wav"]])
def test_subcommands_parse(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_info_no_build_reports_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ASR_LORA_CACHE", str(tmp_path))
    assert main(["info", "--no-build", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["name"] == "bundled:whisper-base"
    assert info["model"]["path"].startswith(str(tmp_path))
    assert info["model"]["exists"] is False
    assert info["packages"]["transformers"].startswith("5.")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_info_builds_bundled_model(bundled_base, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert str(bundled_base) in out and "80" in out and "6 encoder + 6 decoder" in out


def test_info_on_local_folder(tiny_whisper, capsys):
    assert main(["info", "--model", str(tiny_whisper), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["path"] == str(tiny_whisper)
    assert info["model"]["num_mel_bins"] == 80


def test_import_ct2_error_is_one_line(tmp_path, capsys):
    assert main(["import-ct2", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "missing model.bin" in err and "Traceback" not in err


def test_transcribe_skips_bad_file_and_fails_exit(tiny_whisper, tmp_path, capsys):
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"not audio at all")
    code = main(["transcribe", str(ASSETS / "ko_greeting.flac"), str(bad), str(ASSETS / "en_fox.flac"),
                 "--model", str(tiny_whisper), "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(ASSETS / "ko_greeting.flac"), str(ASSETS / "en_fox.flac")]
    assert "broken.flac" in captured.err and "1 of 3" in captured.err


@pytest.mark.slow
def test_transcribe_bundled_base_korean(bundled_base, capsys):
    assert main(["transcribe", str(ASSETS / "en_fox.flac"), "--language", "en"]) == 0
    text = capsys.readouterr().out.split("\t")[1].lower()
    assert "fox" in text and "lazy dog" in text
