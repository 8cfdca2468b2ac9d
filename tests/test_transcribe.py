"""`asr-lora transcribe`: inputs (files, folders, manifests), long audio windows, output formats,
failures reported and skipped, adapter mode without merging."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asr_lora.audio import SAMPLE_RATE, load_audio
from asr_lora.cli import main
from asr_lora.transcribe import Item, Writer, _timestamp, pause_points, split_points, transcribe_items
from asr_lora.settings import ModelSettings

from .conftest import ASSETS, load_script
from .test_export import clips_manifest, make_adapter

TOKENS = "3"
SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)$")
VTT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)$")


def _seconds(h, m, s, ms) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    cues = []
    for n, block in enumerate(text.strip().split("\n\n"), start=1):
        lines = block.split("\n")
        assert lines[0] == str(n), block
        m = SRT_TIME.match(lines[1])
        assert m, lines[1]
        cues.append((_seconds(*m.groups()[:4]), _seconds(*m.groups()[4:]), "\n".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    assert text.startswith("WEBVTT\n\n")
    cues = []
    for block in text[len("WEBVTT\n\n"):].strip().split("\n\n"):
        lines = block.split("\n")
        m = VTT_TIME.match(lines[0])
        assert m, lines[0]
        cues.append((_seconds(*m.groups()[:4]), _seconds(*m.groups()[4:]), "\n".join(lines[1:])))
    return cues


def assert_monotonic(cues) -> None:
    for start, end, text in cues:
        assert 0 <= start < end and text
    for (_, end, _), (start, _, _) in zip(cues, cues[1:]):
        assert end <= start


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory) -> Path:
    """70 s: the Korean clips over and over, 0.6 s of silence between them."""
    clips = [load_audio(ASSETS / name) for name in ("ko_greeting.flac", "ko_finetune.flac", "en_fox.flac")]
    gap = np.zeros(int(0.6 * SAMPLE_RATE), dtype=np.float32)
    parts, total, i = [], 0, 0
    while total < 70 * SAMPLE_RATE:
        parts += [clips[i % len(clips)], gap]
        total += len(clips[i % len(clips)]) + len(gap)
        i += 1
    audio = np.concatenate(parts)[: 70 * SAMPLE_RATE]
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(path, audio, SAMPLE_RATE)
    return path


def run(args, capsys) -> tuple[int, str, str]:
    code = main(["transcribe", *map(str, args), "--max-new-tokens", TOKENS, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- windows


def test_short_audio_is_one_window():
    assert split_points(np.zeros(30 * SAMPLE_RATE, dtype=np.float32)) == [0, 30 * SAMPLE_RATE]


def test_long_audio_is_cut_at_the_quietest_point():
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(80 * SAMPLE_RATE)).astype(np.float32)
    for quiet in (27.0, 53.5):  # 0.3 s of silence inside each 25-30 s search window
        audio[int(quiet * SAMPLE_RATE): int((quiet + 0.3) * SAMPLE_RATE)] = 0
    bounds = split_points(audio)
    assert bounds[0] == 0 and bounds[-1] == len(audio)
    assert len(bounds) == 4
    assert abs(bounds[1] / SAMPLE_RATE - 27.15) < 0.15 and abs(bounds[2] / SAMPLE_RATE - 53.65) < 0.15
    widths = np.diff(bounds) / SAMPLE_RATE
    assert (widths <= 30).all() and (widths[:-1] >= 25).all()


def test_no_sliver_at_the_end():
    bounds = split_points(np.ones(int(60.5 * SAMPLE_RATE), dtype=np.float32))
    widths = np.diff(bounds) / SAMPLE_RATE
    assert (widths <= 30).all() and widths[-1] >= 5


def _speech_with_pauses(pieces: list[tuple[float, float]], seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Noise bursts ("speech", seconds) each followed by a pause (seconds) of low noise; returns the audio
    and the middle of each pause."""
    rng = np.random.default_rng(seed)
    parts, middles, t = [], [], 0.0
    for speech, pause in pieces:
        parts.append(0.3 * rng.standard_normal(int(speech * SAMPLE_RATE)))
        parts.append(1e-4 * rng.standard_normal(int(pause * SAMPLE_RATE)))  # a noise floor, not digital silence
        t += speech
        middles.append(t + pause / 2)
        t += pause
    return np.concatenate(parts).astype(np.float32), middles


def test_pauses_cut_long_audio_at_each_pause_and_keep_short_audio_whole():
    audio, middles = _speech_with_pauses([(4.0, 0.6), (6.0, 0.5), (3.0, 0.2), (5.0, 0.8), (9.0, 0.5), (7.0, 0.0)])
    bounds = pause_points(audio)
    assert bounds[0] == 0 and bounds[-1] == len(audio) and bounds == sorted(bounds)
    cuts = np.array(bounds[1:-1]) / SAMPLE_RATE
    expected = [m for m, (_, pause) in zip(middles, [(4, .6), (6, .5), (3, .2), (5, .8), (9, .5)]) if pause >= 0.4]
    assert len(cuts) == len(expected)  # the 0.2 s pause is not a cut
    assert np.abs(cuts - np.array(expected)).max() < 0.05
    assert pause_points(audio[: 20 * SAMPLE_RATE]) == [0, 20 * SAMPLE_RATE]  # at most 30 s: one window


def test_pauses_join_short_pieces_and_cut_long_ones():
    # 1 s "words" with pauses: pieces under 2 s join the one before; 70 s without a pause is cut in windows
    audio, _ = _speech_with_pauses([(1.0, 0.5)] * 8 + [(70.0, 0.5), (1.0, 0.0)])
    bounds = pause_points(audio)
    widths = np.diff(bounds) / SAMPLE_RATE
    assert bounds[0] == 0 and bounds[-1] == len(audio)
    assert (widths >= 2.0 - 1e-6).all() and (widths <= 30.0 + 1e-6).all()
    assert len(bounds) - 1 >= 3 + 3  # several pieces in the first 12 s, 3 windows over the 70 s


class SpyTranscriber:
    """Records the piece lengths it is asked to decode; every piece reads 'speech'."""

    settings = ModelSettings(audio_context="full")

    def __init__(self):
        self.decoded: list[int] = []

    def decode(self, pieces):
        from asr_lora.backends import Hypothesis

        self.decoded += [len(p) for p in pieces]
        return [Hypothesis("speech") for _ in pieces]


def test_silence_and_slivers_are_not_decoded(tmp_path):
    """Digital silence and a 50 ms sliver get empty text without decoding (Whisper invents a sentence
    for them); a file whose one window is silent still gets a transcript, in input order."""
    clip = load_audio(ASSETS / "ko_greeting.flac")
    silent_gap = np.zeros(40 * SAMPLE_RATE, dtype=np.float32)
    files = {"silence.wav": silent_gap, "sliver.wav": clip[: SAMPLE_RATE // 20],
             "speech_then_silence.wav": np.concatenate([clip, silent_gap]), "speech.wav": clip}
    items = []
    for name, audio in files.items():
        sf.write(tmp_path / name, audio, SAMPLE_RATE)
        items.append(Item(str(tmp_path / name), str(tmp_path / name)))
    spy, out = SpyTranscriber(), tmp_path / "out"
    writer = Writer("json", out, "ko", None)
    assert transcribe_items(spy, items, writer, batch_size=2, progress=False, split="windows", vad=False) == []
    docs = {name: json.loads((out / f"{Path(name).stem}.json").read_text()) for name in files}
    assert docs["silence.wav"]["text"] == "" and docs["sliver.wav"]["text"] == ""
    assert docs["speech.wav"]["text"] == "speech"
    segs = docs["speech_then_silence.wav"]["segments"]
    assert len(segs) == 2 and [s["text"] for s in segs] == ["speech", ""]  # the silent window is not decoded
    assert segs[1]["skip_reason"] == "silence" and docs["sliver.wav"]["segments"][0]["skip_reason"] == "too_short"
    assert abs(segs[-1]["end"] - len(files["speech_then_silence.wav"]) / SAMPLE_RATE) < 1e-3
    assert len(spy.decoded) == 2 and spy.decoded.count(len(clip)) == 1  # speech.wav + the first window
    assert [p.name for p in writer.written] == ["silence.json", "sliver.json", "speech_then_silence.json",
                                                "speech.json"]


def test_timestamp_format():
    assert _timestamp(3661.5, ",") == "01:01:01,500"
    assert _timestamp(0.0004, ".") == "00:00:00.000"


# --------------------------------------------------------------------------- CLI


def test_txt_to_stdout_keeps_path_tab_text(tiny_whisper, capsys):
    paths = [ASSETS / "ko_greeting.flac", ASSETS / "en_fox.flac"]
    code, out, _ = run([*paths, "--model", tiny_whisper], capsys)
    assert code == 0
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in paths]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)


def test_long_file_srt_vtt_json(tiny_whisper, long_wav, tmp_path, capsys):
    """Without VAD every piece is decoded: cues cover the file to its end."""
    for fmt in ("srt", "vtt", "json"):
        code, _, err = run([long_wav, "--model", tiny_whisper, "--format", fmt, "--out", tmp_path, "--no-vad"], capsys)
        assert code == 0, err
    cues = parse_srt((tmp_path / "long.srt").read_text())
    assert_monotonic(cues)
    assert len(cues) >= 3 and cues[0][0] == 0 and abs(cues[-1][1] - 70) < 0.01
    vtt = parse_vtt((tmp_path / "long.vtt").read_text())
    assert [(a, b) for a, b, _ in vtt] == [(a, b) for a, b, _ in cues]
    doc = json.loads((tmp_path / "long.json").read_text())
    assert doc["language"] == "ko" and abs(doc["duration"] - 70) < 1e-3 and doc["path"] == str(long_wav)
    segs = doc["segments"]
    assert len(segs) >= 3 and segs[0]["start"] == 0 and segs[-1]["end"] == doc["duration"]
    for a, b in zip(segs, segs[1:]):
        assert a["end"] == b["start"] and b["end"] - b["start"] <= 30
    assert doc["text"] == " ".join(s["text"] for s in segs if s["text"])


def test_tsv_one_file_and_stdout(tiny_whisper, long_wav, tmp_path, capsys):
    code, _, _ = run([long_wav, ASSETS / "ko_greeting.flac", "--model", tiny_whisper, "--format", "tsv",
                      "--out", tmp_path], capsys)
    assert code == 0
    rows = [line.split("\t") for line in (tmp_path / "transcripts.tsv").read_text().splitlines()]
    assert rows[0] == ["path", "start", "end", "text"]
    assert all(len(r) == 4 for r in rows)
    assert [r[0] for r in rows[1:]].count(str(long_wav)) >= 3 and rows[-1][0] == str(ASSETS / "ko_greeting.flac")
    code, out, _ = run([ASSETS / "ko_greeting.flac", "--model", tiny_whisper, "--format", "tsv"], capsys)
    assert out.splitlines()[0] == "path\tstart\tend\ttext" and len(out.splitlines()) == 2


def test_bad_file_is_reported_others_transcribed(tiny_whisper, tmp_path, capsys):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really")
    out_dir = tmp_path / "out"
    code, _, err = run([ASSETS / "ko_greeting.flac", bad, tmp_path / "missing.flac", ASSETS / "en_fox.flac",
                        "--model", tiny_whisper, "--out", out_dir], capsys)
    assert code == 1
    assert "broken.wav" in err and "missing.flac" in err and "2 of 4" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["en_fox.txt", "ko_greeting.txt"]


def test_folder_is_searched_recursively(tiny_whisper, tmp_path, capsys):
    (tmp_path / "in" / "deep").mkdir(parents=True)
    (tmp_path / "in" / "deep" / "a.flac").write_bytes((ASSETS / "ko_greeting.flac").read_bytes())
    (tmp_path / "in" / "b.wav").write_bytes((ASSETS / "ko_stereo_44k.wav").read_bytes())
    (tmp_path / "in" / "notes.txt").write_text("not audio")
    code, out, _ = run([tmp_path / "in", "--model", tiny_whisper], capsys)
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(tmp_path / "in" / "b.wav"),
                                                                   str(tmp_path / "in" / "deep" / "a.flac")]


def test_manifest_input_names_outputs_by_id(tiny_whisper, tmp_path, capsys):
    manifest = clips_manifest(tmp_path / "m.jsonl")
    code, _, _ = run([manifest, "--model", tiny_whisper, "--format", "json", "--out", tmp_path / "out"], capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["en-fox.json", "ko-finetune.json",
                                                                    "ko-greeting.json"]
    assert json.loads((tmp_path / "out" / "en-fox.json").read_text())["id"] == "en-fox"


def test_adapter_mode_without_merging(tiny_whisper, tmp_path, capsys):
    adapter = make_adapter(tiny_whisper, tmp_path / "run" / "best")
    code, out, _ = run([ASSETS / "ko_greeting.flac", "--adapter", adapter], capsys)
    assert code == 0 and out.startswith(str(ASSETS / "ko_greeting.flac") + "\t")


def test_srt_to_stdout_needs_a_single_input(tiny_whisper, capsys):
    code, _, err = run([ASSETS / "ko_greeting.flac", ASSETS / "en_fox.flac", "--model", tiny_whisper,
                        "--format", "srt"], capsys)
    assert code == 2 and "needs --out" in err


def test_only_one_model_source(tiny_whisper, tmp_path):
    with pytest.raises(SystemExit):
        main(["transcribe", "x.wav", "--model", str(tiny_whisper), "--ct2", str(tmp_path)])
    import argparse

    from asr_lora.errors import UserError
    from asr_lora.sources import ModelSource, source_from_args

    with pytest.raises(UserError, match="give one of --model, --adapter, --merged, --ct2, not 2"):
        source_from_args(argparse.Namespace(source_model=str(tiny_whisper), source_merged=str(tmp_path)))
    assert source_from_args(argparse.Namespace()) == ModelSource("model", "bundled:whisper-base")


def test_zero_length_audio_is_a_reported_failure_not_an_empty_transcript(tiny_whisper, tmp_path, capsys):
    """A WAV cut right after its header (or a few samples later): transcribe skips it with the reason and
    exits 1, writing no (empty) transcript for it; eval skips the row with the same reason."""
    from .test_audio import write_cut_wav

    header_only = write_cut_wav(tmp_path / "header_only.wav")
    three = write_cut_wav(tmp_path / "three_samples.wav", extra_bytes=6)
    out_dir = tmp_path / "out"
    code, _, err = run([header_only, ASSETS / "ko_greeting.flac", three, "--model", tiny_whisper,
                        "--format", "json", "--out", out_dir], capsys)
    assert code == 1
    assert f"skipped {header_only}: no audio samples" in err
    assert f"skipped {three}: only 3 audio samples" in err and "2 of 3 input(s) failed" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["ko_greeting.json"]

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "cut", "audio": str(header_only), "text": "없음"}) + "\n"
                        + json.dumps({"id": "ok", "audio": str(ASSETS / "ko_greeting.flac"), "text": "안녕하세요"}) + "\n",
                        encoding="utf-8")
    assert main(["eval", "--data", str(manifest), "--model", str(tiny_whisper), "--out", str(tmp_path / "eval"),
                 "--max-new-tokens", TOKENS, "--no-progress"]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n"] == 1
    assert summary["skipped_rows"] == [{"id": "cut", "reason": f"{header_only}: no audio samples"}]


def test_long_form_with_noise_and_music_gaps_gets_no_cue_inside_the_gaps(tiny_whisper, tmp_path, capsys):
    """Speech clips with non-speech (noise, tones, music-like) between them: VAD leaves the gaps
    undecoded (JSON says why), so no cue lies inside a gap, whatever the model would invent there."""
    audio, speech = load_script("make_nonspeech").build_longform(seconds=60.0, seed=1)
    path = tmp_path / "longform.wav"
    sf.write(path, audio, SAMPLE_RATE)
    for fmt in ("srt", "json"):
        code, _, err = run([path, "--model", tiny_whisper, "--format", fmt, "--out", tmp_path / "out",
                            "--max-new-tokens", "4"], capsys)
        assert code == 0, err
    cues = parse_srt((tmp_path / "out" / "longform.srt").read_text())
    gaps = [(a_end, b_start) for (_, a_end, _), (b_start, _, _) in zip(speech, speech[1:]) if b_start - a_end >= 2.0]
    assert cues and len(gaps) >= 3
    for gap_start, gap_end in gaps:  # 0.75 s margins: VAD pads speech by 0.4 s, on 32 ms windows
        inner = (gap_start + 0.75, gap_end - 0.75)
        assert not [c for c in cues if c[0] < inner[1] and c[1] > inner[0]], (inner, cues)
    segments = json.loads((tmp_path / "out" / "longform.json").read_text())["segments"]
    assert any(s.get("skip_reason") == "no_speech_vad" and s["text"] == "" for s in segments)
    decoded = [s for s in segments if "skip_reason" not in s or s["skip_reason"] == "no_speech"]
    assert decoded and all("no_speech_prob" in s and "avg_logprob" in s for s in decoded)
