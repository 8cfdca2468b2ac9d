"""Manifest reading, conversion and validation on real clips mixed with every kind of bad row."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asr_lora.audio import load_audio
from asr_lora.cli import main
from asr_lora.data.manifest import (
    REASONS,
    BadRow,
    ManifestRow,
    read_rows,
    prepare_manifest,
    read_manifest,
    to_manifest_rows,
)
from asr_lora.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
STEREO = ASSETS / "ko_stereo_44k.wav"


def _duration(path: Path) -> float:
    info = sf.info(str(path))
    return info.frames / info.samplerate


def _clips(root: Path) -> Path:
    """Copies of the real clips plus the bad files, under root/clips."""
    clips = root / "clips"
    clips.mkdir(parents=True)
    for name in ("ko_greeting.flac", "ko_finetune.flac", "en_callback.flac"):
        shutil.copy(ASSETS / name, clips / name)
    rng = np.random.default_rng(0)
    (clips / "corrupt.flac").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    data = (ASSETS / "ko_greeting.flac").read_bytes()
    (clips / "truncated.flac").write_bytes(data[: len(data) // 2])
    sf.write(clips / "zero.wav", np.zeros(0, dtype=np.int16), 16000)
    long = (0.1 * np.sin(np.arange(31 * 16000) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    sf.write(clips / "long31.wav", long, 16000, subtype="PCM_16")
    return clips


# (raw line, expected: "keep" or a reason code); blank lines are skipped but counted
MIXED = [
    ({"audio": "clips/ko_greeting.flac", "text": " 안녕하세요 ", "language": "ko"}, "keep"),  # 1
    ({"id": "ft", "audio": "clips/ko_finetune.flac", "text": "파인튜닝", "speaker": "s1"}, "keep"),  # 2
    ({"audio": str(ASSETS / "en_fox.flac"), "text": "the quick brown fox", "language": "en"}, "keep"),  # 3
    ({"audio": str(STEREO), "text": "스테레오", "duration": 99.0}, "keep"),  # 4: 44.1 kHz stereo
    ('{"audio": "clips/ko_greeting.flac", "text": ', "malformed_line"),  # 5
    ("", None),  # 6: blank
    ({"audio": "clips/ko_greeting.flac"}, "missing_field"),  # 7
    ({"audio": "clips/nowhere.flac", "text": "없는 파일"}, "missing_file"),  # 8
    ({"audio": "clips/corrupt.flac", "text": "깨진 파일"}, "unreadable_audio"),  # 9
    ({"audio": "clips/truncated.flac", "text": "잘린 파일"}, "unreadable_audio"),  # 10
    ({"audio": "clips/zero.wav", "text": "빈 파일"}, "zero_length"),  # 11
    ({"audio": "clips/long31.wav", "text": "너무 길어"}, "too_long"),  # 12
    ({"audio": "clips/long31.wav", "text": "구간", "offset": 10.0, "end": 15.0}, "keep"),  # 13
    ({"audio": "clips/ko_greeting.flac", "text": "   "}, "empty_text"),  # 14
    ({"audio": "clips/ko_greeting.flac", "text": "가" * 500}, "label_too_long"),  # 15
    ({"audio": "clips/ko_greeting.flac", "text": "거꾸로", "offset": 3.0, "end": 2.0}, "bad_segment"),  # 16
    ({"audio": "clips/ko_greeting.flac", "text": "넘침", "offset": 1.0, "end": 10.0}, "bad_segment"),  # 17
    ({"audio": "clips/ko_greeting.flac", "text": "타입", "duration": "abc"}, "malformed_line"),  # 18
    ({"id": "ft", "audio": "clips/en_callback.flac", "text": "callback"}, "keep"),  # 19: duplicate id
    ("[1, 2]", "malformed_line"),  # 20
    ({"audio": "clips/long31.wav", "text": "긴 구간", "offset": 0.0, "end": 30.5}, "too_long"),  # 21
]


def _write_mixed(root: Path) -> Path:
    _clips(root)
    manifest = root / "mixed.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for raw, _ in MIXED:
            f.write((raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)) + "\n")
    return manifest


def _expected_drops() -> set[tuple[int, str]]:
    return {(i, want) for i, (_, want) in enumerate(MIXED, start=1) if want not in ("keep", None)}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_whisper):
    """The mixed manifest prepared once: (source folder, out folder, report)."""
    root = tmp_path_factory.mktemp("mixed")
    manifest = _write_mixed(root)
    out = root / "out"
    report = prepare_manifest(manifest, out, model=str(tiny_whisper), progress=False, workers=3)
    return root, out, report


def test_read_manifest_streams_rows_and_bad_lines(tmp_path):
    manifest = _write_mixed(tmp_path)
    rows = read_manifest(manifest)
    first = next(rows)  # a generator: nothing read beyond what is asked
    assert isinstance(first, ManifestRow)
    assert first.line == 1 and first.audio == str(tmp_path / "clips" / "ko_greeting.flac")
    assert first.language == "ko"
    rest = list(rows)
    bad = {(r.line, r.reason) for r in rest if isinstance(r, BadRow)}
    assert bad == {(5, "malformed_line"), (7, "missing_field"), (18, "malformed_line"), (20, "malformed_line")}
    segment = next(r for r in rest if r.line == 13)
    assert (segment.offset, segment.end, segment.is_segment) == (10.0, 15.0, True)
    assert next(r for r in rest if r.line == 2).extra == {"speaker": "s1"}


def test_prepare_keeps_good_rows_and_reports_every_bad_one(mixed):
    root, out, report = mixed
    kept = _read_jsonl(out / "mixed.jsonl")
    assert [r["id"] for r in kept] == ["mixed-1", "ft", "mixed-3", "mixed-4", "mixed-13", "ft"]

    by_id = {r["id"]: r for r in kept[:-1]}
    expected = {
        "mixed-1": ASSETS / "ko_greeting.flac",
        "ft": ASSETS / "ko_finetune.flac",
        "mixed-3": ASSETS / "en_fox.flac",
        "mixed-4": STEREO,  # stereo 44.1 kHz is kept, with its true duration (not the 99 given)
    }
    for row_id, source in expected.items():
        assert by_id[row_id]["duration"] == pytest.approx(_duration(source), abs=1e-3)
    for row in kept:  # relative when the audio lies inside OUT's parent folder, else absolute
        assert os.path.isabs(row["audio"]) == (row["id"] in ("mixed-3", "mixed-4"))
        assert (out / row["audio"]).is_file()
    assert os.path.samefile(out / by_id["mixed-1"]["audio"], root / "clips" / "ko_greeting.flac")
    assert by_id["mixed-1"]["text"] == "안녕하세요" and by_id["mixed-1"]["language"] == "ko"
    assert by_id["mixed-3"]["language"] == "en" and "language" not in by_id["mixed-4"]
    assert by_id["ft"]["speaker"] == "s1"
    segment = by_id["mixed-13"]
    assert (segment["offset"], segment["end"], segment["duration"]) == (10.0, 15.0, 5.0)

    assert {(d["line"], d["reason"]) for d in report["dropped_rows"]} == _expected_drops()
    assert len(report["dropped_rows"]) == len(_expected_drops())
    for drop in report["dropped_rows"]:
        assert drop["reason"] in REASONS and drop["detail"]
    missing = next(d for d in report["dropped_rows"] if d["reason"] == "missing_file")
    assert missing["audio"] == str(root / "clips" / "nowhere.flac")

    assert (report["total"], report["kept"], report["dropped"]) == (20, 6, 14)
    assert report["dropped_by_reason"] == {
        "malformed_line": 3, "missing_field": 1, "missing_file": 1, "unreadable_audio": 2, "zero_length": 1,
        "too_long": 2, "empty_text": 1, "label_too_long": 1, "bad_segment": 2,
    }
    assert report["sample_rates"] == {"16000": 5, "44100": 1}
    assert report["channels"] == {"1": 5, "2": 1}
    assert report["warnings"] == [{"kind": "duplicate_id", "id": "ft", "line": 19, "first_line": 2}]
    assert report["seconds_kept"] == pytest.approx(sum(r["duration"] for r in kept), abs=1e-2)
    assert report["summary_line"].startswith(f"kept 6 of 20 rows ({report['hours_kept']:.2f} h); dropped 14: ")
    assert "malformed_line 3" in report["summary_line"] and "warnings: duplicate_id 1" in report["summary_line"]
    assert json.loads((out / "prepare_report.json").read_text(encoding="utf-8")) == report
    assert not list(out.glob("*.partial"))


def test_label_limit_counts_prefix_and_end_tokens(tmp_path, tiny_whisper):
    from asr_lora.model import load_processor

    tokenizer = load_processor(str(tiny_whisper)).tokenizer
    text = "가" * 40
    n = len(tokenizer(text).input_ids)
    assert n == len(tokenizer(text, add_special_tokens=False).input_ids) + 5  # sot, ko, transcribe, notimestamps, eot
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": str(ASSETS / "ko_greeting.flac"), "text": text}) + "\n")
    assert prepare_manifest(manifest, tmp_path / "a", str(tiny_whisper), max_label_tokens=n, progress=False)["kept"] == 1
    report = prepare_manifest(manifest, tmp_path / "b", str(tiny_whisper), max_label_tokens=n - 1, progress=False)
    assert report["dropped_by_reason"] == {"label_too_long": 1}


def test_cli_prepare_manifest_prints_the_summary(tmp_path, tiny_whisper, capsys):
    manifest = _write_mixed(tmp_path)
    out = tmp_path / "cli-out"
    code = main(["prepare", "manifest", str(manifest), "--out", str(out), "--model", str(tiny_whisper), "--no-progress"])
    assert code == 0
    report = json.loads((out / "prepare_report.json").read_text(encoding="utf-8"))
    assert report["summary_line"] in capsys.readouterr().out
    assert len(_read_jsonl(out / "mixed.jsonl")) == 6


def test_missing_input_is_a_user_error(tmp_path, tiny_whisper, capsys):
    with pytest.raises(UserError):
        prepare_manifest(tmp_path / "nope.jsonl", tmp_path / "out", str(tiny_whisper), progress=False)
    code = main(["prepare", "manifest", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out"),
                 "--model", str(tiny_whisper)])
    assert code == 2 and "input not found" in capsys.readouterr().err


def test_csv_and_tsv(tmp_path, tiny_whisper):
    clips = _clips(tmp_path)
    (tmp_path / "t.csv").write_text(
        "audio,text,offset,end,language\n"
        'clips/ko_greeting.flac,"안녕, 하세요",,,ko\n'  # 2: a quoted comma
        "clips/ko_finetune.flac,,,,\n"  # 3: empty text
        "\n"
        "clips/nowhere.flac,없음,,,\n"  # 5
        "clips/long31.wav,구간,1.5,4,\n"  # 6: a segment
        "clips/ko_greeting.flac,필드가 많아,,,,extra\n",  # 7
        encoding="utf-8",
    )
    report = prepare_manifest(tmp_path / "t.csv", tmp_path / "out", str(tiny_whisper), progress=False)
    assert {(d["line"], d["reason"]) for d in report["dropped_rows"]} == {
        (3, "empty_text"), (5, "missing_file"), (7, "malformed_line")}
    rows = _read_jsonl(tmp_path / "out" / "t.jsonl")
    assert [(r["id"], r["text"]) for r in rows] == [("t-2", "안녕, 하세요"), ("t-6", "구간")]
    assert rows[0]["language"] == "ko" and "offset" not in rows[0]
    assert (rows[1]["offset"], rows[1]["end"], rows[1]["duration"]) == (1.5, 4.0, 2.5)

    # Common Voice style: path/sentence columns, tab-separated, bare quotes in a sentence
    (tmp_path / "cv.tsv").write_text(
        "client_id\tpath\tsentence\n"
        f"c1\t{clips / 'ko_greeting.flac'}\t그는 \"안녕\"이라고 했다\n"
        f"c2\t{STEREO}\t스테레오\n",
        encoding="utf-8",
    )
    report = prepare_manifest(tmp_path / "cv.tsv", tmp_path / "out", str(tiny_whisper), progress=False)
    assert report["kept"] == 2 and report["dropped"] == 0
    rows = _read_jsonl(tmp_path / "out" / "cv.jsonl")
    assert rows[0]["text"] == '그는 "안녕"이라고 했다' and rows[0]["client_id"] == "c1"


def test_table_without_audio_column_is_a_user_error(tmp_path, tiny_whisper):
    (tmp_path / "bad.csv").write_text("file,transcript\na.flac,hi\n", encoding="utf-8")
    with pytest.raises(UserError, match="no audio column"):
        prepare_manifest(tmp_path / "bad.csv", tmp_path / "out", str(tiny_whisper), progress=False)


def test_saved_dataset_folder(tmp_path, tiny_whisper):
    import datasets

    stereo_wav = STEREO.read_bytes()
    ds = datasets.Dataset.from_dict({
        "audio": [
            {"bytes": None, "path": str(ASSETS / "ko_finetune.flac")},  # save_to_disk embeds the file
            {"bytes": stereo_wav, "path": None},  # only bytes, WAV: re-encoded as FLAC
            {"bytes": None, "path": str(ASSETS / "ko_greeting.flac")},
        ],
        "transcription": ["파인튜닝", "스테레오", ""],
        "speaker": ["a", "b", "c"],
    }).cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "ds"))

    report = prepare_manifest(tmp_path / "ds", tmp_path / "out", str(tiny_whisper), progress=False)
    assert report["input_format"] == "saved_dataset"
    assert [(d["line"], d["reason"]) for d in report["dropped_rows"]] == [(3, "empty_text")]
    rows = _read_jsonl(tmp_path / "out" / "ds.jsonl")
    assert [(r["id"], r["text"], r["speaker"]) for r in rows] == [("ds-1", "파인튜닝", "a"), ("ds-2", "스테레오", "b")]
    first, second = (tmp_path / "out" / r["audio"] for r in rows)
    assert first.parent == tmp_path / "out" / "audio" and first.suffix == second.suffix == ".flac"
    assert first.read_bytes() == (ASSETS / "ko_finetune.flac").read_bytes()  # FLAC bytes kept as they are
    assert sf.info(str(second)).channels == 2 and sf.info(str(second)).samplerate == 44100
    np.testing.assert_array_equal(sf.read(str(second), dtype="int16")[0], sf.read(str(STEREO), dtype="int16")[0])
    assert rows[1]["duration"] == pytest.approx(_duration(STEREO), abs=1e-3)


@pytest.mark.parametrize("metadata", ["metadata.csv", "metadata.jsonl"])
def test_audiofolder(tmp_path, tiny_whisper, metadata):
    folder = tmp_path / "my_clips"
    folder.mkdir()
    for name in ("ko_greeting.flac", "ko_finetune.flac"):
        shutil.copy(ASSETS / name, folder / name)
    entries = [("ko_greeting.flac", "안녕하세요"), ("ko_finetune.flac", "파인튜닝"), ("gone.flac", "없음")]
    if metadata.endswith(".csv"):
        text = "file_name,transcription\n" + "".join(f"{a},{t}\n" for a, t in entries)
    else:
        text = "".join(json.dumps({"file_name": a, "sentence": t}, ensure_ascii=False) + "\n" for a, t in entries)
    (folder / metadata).write_text(text, encoding="utf-8")

    report = prepare_manifest(folder, tmp_path / "out", str(tiny_whisper), progress=False)
    assert report["input_format"] == "audiofolder"
    gone_line = 4 if metadata.endswith(".csv") else 3
    assert [(d["line"], d["reason"]) for d in report["dropped_rows"]] == [(gone_line, "missing_file")]
    rows = _read_jsonl(tmp_path / "out" / "my_clips.jsonl")
    assert [r["text"] for r in rows] == ["안녕하세요", "파인튜닝"]
    assert os.path.samefile(tmp_path / "out" / rows[0]["audio"], folder / "ko_greeting.flac")


def test_to_manifest_rows_dispatches(tmp_path):
    (tmp_path / "rows.txt").write_text(f"audio|text\n{ASSETS / 'en_fox.flac'}|fox\n", encoding="utf-8")
    (row,) = to_manifest_rows(tmp_path / "rows.txt")  # no known suffix: delimiter sniffed
    assert (row.audio, row.text, row.line) == (str(ASSETS / "en_fox.flac"), "fox", 2)
    (tmp_path / "arr.json").write_text('[{"audio": "a.flac", "text": "x"}]', encoding="utf-8")
    with pytest.raises(UserError, match="JSON Lines"):
        to_manifest_rows(tmp_path / "arr.json")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="neither"):
        to_manifest_rows(tmp_path / "empty_dir")


def test_read_rows_absolute_paths_typed_ids(mixed):
    """Training and evaluation read a prepared manifest as typed rows, audio absolute, ids filled in."""
    _, out, report = mixed
    rows, bad = read_rows(out / "mixed.jsonl")
    assert bad == [] and len(rows) == report["kept"]
    for row in rows:
        assert os.path.isabs(row.audio) and os.path.isfile(row.audio) and row.id
    assert rows[4].offset == 10.0 and rows[0].offset is None  # typed, absent -> None
    assert rows[1].extra["speaker"] == "s1" and rows[0].language == "ko"
    assert len(load_audio(rows[4].audio, rows[4].offset, rows[4].end)) == 5 * 16000


def test_wav_cut_after_its_header_is_zero_length(tmp_path, tiny_whisper):
    """A header that parses but no audio (or a few samples of it) is dropped as zero_length, never kept
    with duration 0.0; the good row next to it is kept."""
    from .test_audio import write_cut_wav

    write_cut_wav(tmp_path / "header_only.wav")
    write_cut_wav(tmp_path / "stereo_48k.wav", "wavex-24bit-stereo-48k", streaming=True)
    write_cut_wav(tmp_path / "three_samples.wav", extra_bytes=6)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"audio": "header_only.wav", "text": "비어 있음"},
        {"audio": "stereo_48k.wav", "text": "비어 있음"},
        {"audio": "three_samples.wav", "text": "거의 비어 있음"},
        {"audio": str(ASSETS / "ko_greeting.flac"), "text": "안녕하세요"},
    ]), encoding="utf-8")
    report = prepare_manifest(manifest, tmp_path / "out", str(tiny_whisper), progress=False)
    assert report["kept"] == 1 and report["dropped_by_reason"] == {"zero_length": 3}
    details = {Path(d["audio"]).name: d["detail"] for d in report["dropped_rows"]}
    assert details == {"header_only.wav": "no audio samples", "stereo_48k.wav": "no audio samples",
                       "three_samples.wav": details["three_samples.wav"]}
    assert details["three_samples.wav"].startswith("only 3 audio samples")
    assert [r["id"] for r in _read_jsonl(tmp_path / "out" / "m.jsonl")] == ["m-4"]


def test_prepare_keeps_intended_nonspeech_rows_and_drops_accidental_empty_text(tmp_path, tiny_whisper):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"id": "noise", "audio": str(ASSETS / "ko_greeting.flac"), "text": "", "nonspeech": True},
        {"id": "oops", "audio": str(ASSETS / "ko_greeting.flac"), "text": ""},
        {"id": "both", "audio": str(ASSETS / "ko_greeting.flac"), "text": "말", "nonspeech": True},
        {"id": "speech", "audio": str(ASSETS / "ko_greeting.flac"), "text": "안녕하세요"},
    ]), encoding="utf-8")
    report = prepare_manifest(manifest, tmp_path / "out", str(tiny_whisper), progress=False)
    assert report["dropped_by_reason"] == {"empty_text": 1, "nonspeech_with_text": 1}
    kept = _read_jsonl(tmp_path / "out" / "m.jsonl")
    assert [(r["id"], r["text"], r.get("nonspeech")) for r in kept] == [("noise", "", True), ("speech", "안녕하세요", None)]
    rows, _ = read_rows(tmp_path / "out" / "m.jsonl")
    assert [r.nonspeech for r in rows] == [True, False]
