"""KsponSpeech preparation on a tiny corpus laid out like the real one."""

import json
import os
from pathlib import Path

import pytest

from asr_lora.data import kspon
from asr_lora.data.kspon import prepare_kspon

SECOND = 16_000 * 2  # bytes of 16 kHz s16le mono audio per second

# (trn path, where the .pcm really is, .pcm size in bytes or None for no file, raw transcript)
TRAIN = [
    (
        "KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000001.pcm",
        None,
        int(1.5 * SECOND),
        "b/ 어/ (3시)/(세 시)에 그+ 그 사람* o/ 만났어# n/",
    ),
    (
        "KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000002.pcm",
        None,
        SECOND,
        "(70%)/(칠십 퍼센트) (SNS)/(에스엔에스)에 올렸어 u/ 음/.",
    ),
    ("KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000003.pcm", None, SECOND // 10, "b/ n/"),
    ("KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000004.pcm", None, None, "파일이 없어"),
    ("KsponSpeech_01/KsponSpeech_0002/KsponSpeech_001001.pcm", None, 0, "빈 파일이야"),
]
DEV = [
    (
        "KsponSpeech_05/KsponSpeech_0621/KsponSpeech_620001.pcm",
        None,
        int(0.75 * SECOND),
        "(3시/(세 시) 쯤 l/ 어/그래",
    ),
]
EVAL_CLEAN = [
    # odd byte length: 4000 samples and one stray byte
    ("KsponSpeech_eval/eval_clean/KsponSpeech_E00001.pcm", None, 8001, "(2)/(두) 개 (1/2)/(이분의 일)"),
]
EVAL_OTHER = [
    # listed with its first component, unpacked without it
    (
        "KsponSpeech_eval/eval_other/KsponSpeech_E03001.pcm",
        "eval_other/KsponSpeech_E03001.pcm",
        SECOND // 2,
        "o/ 100 % 확실해",
    ),
]
SPLIT_ROWS = {"train": TRAIN, "dev": DEV, "eval_clean": EVAL_CLEAN, "eval_other": EVAL_OTHER}


def _write_pcm(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(i % 251 for i in range(size)))


def make_corpus(root: Path, scripts: bool = True) -> Path:
    """KsponSpeech-shaped tree: .pcm + cp949 .txt pairs, eval audio, and scripts/*.trn."""
    for split, rows in SPLIT_ROWS.items():
        lines = []
        for listed, actual, size, raw in rows:
            pcm = root / (actual or listed)
            if size is not None:
                _write_pcm(pcm, size)
            if split in ("train", "dev"):
                pcm.parent.mkdir(parents=True, exist_ok=True)
                pcm.with_suffix(".txt").write_bytes(raw.encode("cp949") + b"\r\n")
            lines.append(f"{listed} :: {raw}")
        if split == "train":  # a blank line (ignored) and a line without " :: " (reported)
            lines += ["", "KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000005.pcm 설명 없음"]
        if scripts:
            trn = root / "scripts" / f"{split}.trn"
            trn.parent.mkdir(parents=True, exist_ok=True)
            trn.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_trn_layout_spelling(tmp_path):
    root = make_corpus(tmp_path / "kspon")
    out = tmp_path / "out"
    report = prepare_kspon(root, out, workers=1, progress=False)

    train = read_manifest(out / "train.jsonl")
    assert [r["id"] for r in train] == ["KsponSpeech_000001", "KsponSpeech_000002"]
    assert [r["text"] for r in train] == ["어 3시에 그 그 사람 만났어", "70% SNS에 올렸어 음."]
    assert [r["duration"] for r in train] == [1.5, 1.0]
    assert all(r["language"] == "ko" for r in train)
    assert train[0]["audio"] == os.path.join(
        "..", "kspon", "KsponSpeech_01", "KsponSpeech_0001", "KsponSpeech_000001.pcm"
    )
    assert (out / train[0]["audio"]).resolve() == (root / TRAIN[0][0]).resolve()

    assert read_manifest(out / "dev.jsonl") == [
        {
            "id": "KsponSpeech_620001",
            "audio": os.path.join(
                "..", "kspon", "KsponSpeech_05", "KsponSpeech_0621", "KsponSpeech_620001.pcm"
            ),
            "text": "3시 세 시 쯤 어 그래",
            "duration": 0.75,
            "language": "ko",
            "session": os.path.join("..", "kspon", "KsponSpeech_05", "KsponSpeech_0621"),
        }
    ]
    (eval_clean,) = read_manifest(out / "eval_clean.jsonl")
    assert (eval_clean["text"], eval_clean["duration"]) == ("2 개 1/2", 0.25)
    (eval_other,) = read_manifest(out / "eval_other.jsonl")
    assert eval_other["text"] == "100 % 확실해"
    assert eval_other["audio"] == os.path.join("..", "kspon", "eval_other", "KsponSpeech_E03001.pcm")

    # the raw file lines survive the json round trip unescaped
    assert "어 3시에" in (out / "train.jsonl").read_text(encoding="utf-8")

    assert report == json.loads((out / "prepare_report.json").read_text(encoding="utf-8"))
    assert report["mode"] == "trn" and report["side"] == "spelling"
    assert report["root"] == os.path.abspath(root) and report["missing_sources"] == []
    splits = report["splits"]
    assert {s: splits[s]["utterances"] for s in splits} == {
        "train": 2, "dev": 1, "eval_clean": 1, "eval_other": 1,
    }
    assert splits["train"]["seconds"] == 2.5 and splits["train"]["hours"] == round(2.5 / 3600, 4)
    assert splits["train"]["noise_only"] == {
        "count": 1, "kept": False, "ids": ["KsponSpeech_000003"],
    }
    assert splits["train"]["dropped"] == [
        {"line": 4, "path": TRAIN[3][0], "reason": "audio not found"},
        {"line": 5, "path": TRAIN[4][0], "reason": "empty audio file (0 bytes)"},
        {
            "line": 7,
            "path": "KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000005.pcm 설명 없음",
            "reason": "malformed line (want 'path :: text')",
        },
    ]
    assert splits["eval_clean"]["odd_length_files"] == 1
    assert splits["train"]["odd_length_files"] == 0
    assert not any(s["skipped"] for s in splits.values())
    assert splits["train"]["source"]["path"] == os.path.abspath(root / "scripts" / "train.trn")
    assert report["totals"] == {
        "utterances": 5,
        "seconds": 4.0,
        "hours": round(4.0 / 3600, 4),
        "dropped": 3,
        "noise_only": 1,
        "odd_length_files": 1,
    }
    assert sorted(p.name for p in out.iterdir()) == [
        "dev.jsonl", "eval_clean.jsonl", "eval_other.jsonl", "prepare_report.json", "train.jsonl",
    ]


def test_trn_layout_phonetic(tmp_path):
    root = make_corpus(tmp_path / "kspon")
    report = prepare_kspon(root, tmp_path / "out", side="phonetic", workers=1, progress=False)
    train = read_manifest(tmp_path / "out" / "train.jsonl")
    assert [r["text"] for r in train] == ["어 세 시에 그 그 사람 만났어", "칠십 퍼센트 에스엔에스에 올렸어 음."]
    (eval_clean,) = read_manifest(tmp_path / "out" / "eval_clean.jsonl")
    assert eval_clean["text"] == "두 개 이분의 일"
    assert report["side"] == "phonetic"


def test_keep_noise_only(tmp_path):
    root = make_corpus(tmp_path / "kspon")
    report = prepare_kspon(root, tmp_path / "out", keep_noise_only=True, workers=1, progress=False)
    train = read_manifest(tmp_path / "out" / "train.jsonl")
    assert [(r["id"], r["text"]) for r in train][-1] == ("KsponSpeech_000003", "")
    assert report["splits"]["train"]["utterances"] == 3
    assert report["splits"]["train"]["noise_only"]["kept"] is True


def test_walk_layout_splits_by_folder_number(tmp_path):
    root = make_corpus(tmp_path / "kspon", scripts=False)
    folder = root / "KsponSpeech_01" / "KsponSpeech_0002"
    # UTF-8 transcripts are tolerated (these bytes also decode as cp949, to the wrong
    # characters "吏꾩쭨? 臾몄옣"), undecodable ones reported
    _write_pcm(folder / "KsponSpeech_001002.pcm", SECOND)
    (folder / "KsponSpeech_001002.txt").write_text("u/ 진짜? 문장", encoding="utf-8")
    _write_pcm(folder / "KsponSpeech_001003.pcm", SECOND)
    (folder / "KsponSpeech_001003.txt").write_bytes(b"\xff\xfe\xff broken")
    # a folder number outside 0001-0623 belongs to no split
    stray = root / "KsponSpeech_05" / "KsponSpeech_0700" / "KsponSpeech_699001.txt"
    stray.parent.mkdir(parents=True)
    stray.write_bytes("아".encode("cp949"))
    out = tmp_path / "out"

    report = prepare_kspon(root, out, workers=1, progress=False)

    assert report["mode"] == "walk"
    assert sorted(report["splits"]) == ["dev", "train"]
    assert [(r["id"], r["text"], r["duration"]) for r in read_manifest(out / "train.jsonl")] == [
        ("KsponSpeech_000001", "어 3시에 그 그 사람 만났어", 1.5),
        ("KsponSpeech_000002", "70% SNS에 올렸어 음.", 1.0),
        ("KsponSpeech_001002", "진짜? 문장", 1.0),
    ]
    assert [r["id"] for r in read_manifest(out / "dev.jsonl")] == ["KsponSpeech_620001"]
    train = report["splits"]["train"]
    p = os.path.join
    assert train["dropped"] == [
        {"line": None, "path": p("KsponSpeech_01", "KsponSpeech_0001", "KsponSpeech_000004.txt"),
         "reason": "audio not found (no .pcm beside it)"},
        {"line": None, "path": p("KsponSpeech_01", "KsponSpeech_0002", "KsponSpeech_001001.txt"),
         "reason": "empty audio file (0 bytes)"},
        {"line": None, "path": p("KsponSpeech_01", "KsponSpeech_0002", "KsponSpeech_001003.txt"),
         "reason": "transcript is neither UTF-8 nor cp949"},
    ]
    assert train["noise_only"]["ids"] == ["KsponSpeech_000003"]
    assert train["source"] == {
        "mode": "walk", "root": os.path.abspath(root), "folders": 2, "files": 7,
        "side": "spelling", "keep_noise_only": False,
    }
    assert report["splits"]["dev"]["source"]["folders"] == 1
    assert report["outside_splits"] == [
        {"line": None, "path": p("KsponSpeech_05", "KsponSpeech_0700", "KsponSpeech_699001.txt"),
         "reason": "not in a KsponSpeech_NNNN folder numbered 0001-0623"},
    ]
    assert report["missing_sources"] == []


def test_walk_layout_without_dev_folders_writes_train_only(tmp_path):
    root = make_corpus(tmp_path / "kspon", scripts=False)
    for f in (root / "KsponSpeech_05" / "KsponSpeech_0621").iterdir():
        f.unlink()
    report = prepare_kspon(root, tmp_path / "out", workers=1, progress=False)
    assert list(report["splits"]) == ["train"]
    assert report["missing_sources"] == ["dev: no .txt under KsponSpeech_0621-0623"]
    assert not (tmp_path / "out" / "dev.jsonl").exists()


def test_not_a_kspon_tree_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither scripts"):
        prepare_kspon(tmp_path, tmp_path / "out", progress=False)


def test_rerun_skips_finished_splits(tmp_path, monkeypatch):
    root = make_corpus(tmp_path / "kspon")
    out = tmp_path / "out"
    first = prepare_kspon(root, out, workers=1, progress=False)
    manifests = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}

    def must_not_run(*args):
        raise AssertionError("a finished split was processed again")

    monkeypatch.setattr(kspon, "_process_trn_chunk", must_not_run)
    second = prepare_kspon(root, out, workers=1, progress=False)
    assert all(s["skipped"] for s in second["splits"].values())
    assert second["totals"] == first["totals"]
    assert second["splits"]["train"]["dropped"] == first["splits"]["train"]["dropped"]
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == manifests
    monkeypatch.undo()

    # a changed source list or another side is prepared again
    trn = root / "scripts" / "dev.trn"
    trn.write_text(trn.read_text(encoding="utf-8") + "KsponSpeech_05/x.pcm :: 없음\n", "utf-8")
    third = prepare_kspon(root, out, workers=1, progress=False)
    assert {s: v["skipped"] for s, v in third["splits"].items()} == {
        "train": True, "dev": False, "eval_clean": True, "eval_other": True,
    }
    assert third["splits"]["dev"]["dropped"][-1]["reason"] == "audio not found"
    phonetic = prepare_kspon(root, out, side="phonetic", workers=1, progress=False)
    assert not any(s["skipped"] for s in phonetic["splits"].values())
    assert read_manifest(out / "eval_clean.jsonl")[0]["text"] == "두 개 이분의 일"


def test_interrupted_split_leaves_no_manifest(tmp_path, monkeypatch):
    root = make_corpus(tmp_path / "kspon")
    out = tmp_path / "out"

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(kspon, "_process_trn_chunk", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_kspon(root, out, workers=1, progress=False)
    assert not (out / "train.jsonl").exists()
    assert not (out / "prepare_report.json").exists()
    monkeypatch.undo()
    report = prepare_kspon(root, out, workers=1, progress=False)
    assert report["splits"]["train"]["utterances"] == 2 and not report["splits"]["train"]["skipped"]


@pytest.mark.parametrize("scripts", [True, False])
def test_worker_processes_match_one_process(tmp_path, monkeypatch, scripts):
    root = make_corpus(tmp_path / "kspon", scripts=scripts)
    monkeypatch.setattr(kspon, "CHUNK_SIZE", 2)
    serial = prepare_kspon(root, tmp_path / "serial", workers=1, progress=False)
    pooled = prepare_kspon(root, tmp_path / "pooled", workers=2, progress=True)
    for split in serial["splits"]:
        rows = read_manifest(tmp_path / "serial" / f"{split}.jsonl")
        assert read_manifest(tmp_path / "pooled" / f"{split}.jsonl") == rows
        assert pooled["splits"][split]["dropped"] == serial["splits"][split]["dropped"]
    assert pooled["totals"] == serial["totals"]


def test_cli_prepare_kspon_both_sides(tmp_path, capsys):
    """The same corpus through `asr-lora prepare kspon`, spelling and phonetic sides."""
    from asr_lora.cli import main

    root = make_corpus(tmp_path / "kspon")
    assert main(["prepare", "kspon", "--root", str(root), "--out", str(tmp_path / "sp"), "--workers", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "train:        2 utterances" in out and "dropped 3, noise-only 1" in out
    assert [r["text"] for r in read_manifest(tmp_path / "sp" / "train.jsonl")] == [
        "어 3시에 그 그 사람 만났어", "70% SNS에 올렸어 음.",
    ]
    assert main(["prepare", "kspon", "--root", str(root), "--out", str(tmp_path / "ph"), "--side", "phonetic",
                 "--workers", "1", "--no-progress"]) == 0
    phonetic = [r["text"] for r in read_manifest(tmp_path / "ph" / "train.jsonl")]
    assert phonetic != [r["text"] for r in read_manifest(tmp_path / "sp" / "train.jsonl")]
    assert "세 시" in phonetic[0]
    counts = {s: len(read_manifest(tmp_path / "ph" / f"{s}.jsonl")) for s in SPLIT_ROWS}
    assert counts == {"train": 2, "dev": 1, "eval_clean": 1, "eval_other": 1}


def test_cli_prepare_kspon_not_a_corpus(tmp_path, capsys):
    from asr_lora.cli import main

    assert main(["prepare", "kspon", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(tmp_path) in err
