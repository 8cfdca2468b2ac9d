"""Manifests: the one internal data format, readers for other tabular sources, and validation.

A manifest is JSON Lines, one utterance per line::

    {"id": "a-1", "audio": "clips/a.flac", "text": "안녕하세요", "duration": 3.55, "language": "ko"}

``audio`` (required) is relative to the manifest's folder or absolute; ``text`` (required) is the
transcript; ``id``, ``duration`` (seconds), ``offset``/``end`` (seconds: a segment of a longer
file), ``language`` and ``prompt`` (the text said just before, e.g. the previous utterance of the
same session: a ``<|startofprev|>`` prompt in training, ``train.prompt_probability``) are optional;
other fields are carried along untouched.

Other sources are read into the same rows (:func:`to_manifest_rows`):

* CSV / TSV with the same columns (``.csv`` comma, ``.tsv`` tab without quoting, else sniffed);
* a folder saved with ``datasets.save_to_disk`` (an ``Audio`` column whose files no longer exist
  where recorded has its embedded bytes written out as FLAC);
* an ``audiofolder``-style folder: audio files plus ``metadata.jsonl`` or ``metadata.csv``.

Everywhere the audio column may also be called ``file_name`` or ``path`` and the text column
``transcription`` or ``sentence`` (the Hugging Face / Common Voice names).

:func:`prepare_manifest` validates any of these, decoding every clip, and writes the rows kept
plus a report naming every row dropped, with its line and one of :data:`REASONS`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

from tqdm import tqdm

import numpy as np

from asr_lora.atomic import atomic_file, write_json_atomic
from asr_lora.audio import SAMPLE_RATE, AudioError, ZeroLengthAudio, audio_info, load_audio, zero_length_reason
from asr_lora.data import _chunks
from asr_lora.errors import UserError

REPORT_NAME = "prepare_report.json"
REASONS = (
    "malformed_line",  # not a JSON object / CSV record, undecodable bytes, a field of the wrong type
    "missing_field",  # no audio or no text
    "missing_file",  # the audio file does not exist
    "unreadable_audio",  # not audio, corrupt, truncated
    "zero_length",  # an audio file without samples
    "too_long",  # longer than max_duration (a segment of a long file via offset/end is fine)
    "empty_text",  # nothing left after strip()
    "label_too_long",  # prefix tokens + text + end-of-text longer than max_label_tokens
    "bad_segment",  # offset < 0, offset >= end, offset or end past the end of the file
    "nonspeech_with_text",  # "nonspeech": true but a transcript: one of the two is wrong
)
AUDIO_KEYS = ("audio", "file_name", "path")  # first one present is the audio column
TEXT_KEYS = ("text", "transcription", "sentence")  # first one present is the text column
NUMBER_KEYS = ("duration", "offset", "end")
MANIFEST_SUFFIXES = frozenset({".jsonl", ".json", ".ndjson"})
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")  # audiofolder metadata, in the folder itself
SEGMENT_TOLERANCE = 0.01  # seconds an ``end`` may pass the end of the file (rounding in annotations)
TEXT_BATCH = 256  # rows tokenised together
PRECISION = 3  # decimals of the durations written



@dataclass(frozen=True)
class ManifestRow:
    """One well-formed utterance; ``audio`` is an absolute path, ``line`` 1-based in the source."""

    line: int
    audio: str
    text: str
    id: str | None = None
    duration: float | None = None
    offset: float | None = None
    end: float | None = None
    language: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_segment(self) -> bool:
        return self.offset is not None or self.end is not None

    @property
    def nonspeech(self) -> bool:
        """An intended non-speech clip (``"nonspeech": true``, empty text): trained towards and scored
        by Whisper's no-speech token, never by CER."""
        return self.extra.get("nonspeech") is True

    @property
    def prompt(self) -> str | None:
        """The optional ``prompt`` field: text said before this utterance (checked to be a string by
        :func:`row_from_record`; carried in ``extra``, so every reader and ``prepare`` keep it)."""
        return self.extra.get("prompt") or None


class BadRow(NamedTuple):
    """A source line that is not a usable row: where, which audio (if known), why."""

    line: int
    audio: str | None
    reason: str  # one of REASONS
    detail: str = ""


# --- one record -> one row ----------------------------------------------------------------------


def _resolve(base: Path, audio: str) -> str:
    return os.path.abspath(os.path.join(base, audio))


def _number(key: str, value: Any, from_text: bool) -> float | None:
    """A finite float, ``None`` for absent; ``ValueError`` naming the field otherwise."""
    if value is None or (from_text and value.strip() == ""):
        return None
    if from_text:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{key!r} must be a number, got {value!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer with hundreds of digits
            raise ValueError(f"{key!r} must be finite, got an integer of {len(str(value))} digits") from None
    else:
        raise ValueError(f"{key!r} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{key!r} must be finite, got {value!r}")
    return number


def _optional_str(key: str, value: Any, allow_int: bool = False) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{key!r} must be a string, got {type(value).__name__} {value!r}")


def row_from_record(record: Mapping[str, Any], line: int, base: Path, from_text: bool = False) -> ManifestRow | BadRow:
    """Check one parsed record (a JSON object, or a CSV record when ``from_text``) and make a row.

    Relative audio paths are resolved against ``base``, the folder of the source file.
    """
    audio_key = next((k for k in AUDIO_KEYS if k in record), None)
    text_key = next((k for k in TEXT_KEYS if k in record), None)
    raw_audio = record.get(audio_key) if audio_key else None
    audio = _resolve(base, raw_audio) if isinstance(raw_audio, str) and raw_audio else None
    if audio_key is None or raw_audio is None or raw_audio == "":
        return BadRow(line, None, "missing_field", "no audio path (field 'audio')")
    if not isinstance(raw_audio, str):
        return BadRow(line, None, "malformed_line", f"{audio_key!r} must be a string, got {type(raw_audio).__name__}")
    if text_key is None or record[text_key] is None:
        return BadRow(line, audio, "missing_field", "no transcript (field 'text')")
    text = record[text_key]
    if not isinstance(text, str):
        return BadRow(line, audio, "malformed_line", f"{text_key!r} must be a string, got {type(text).__name__}")
    try:
        numbers = {key: _number(key, record.get(key), from_text) for key in NUMBER_KEYS}
        row_id = _optional_str("id", record.get("id"), allow_int=True)
        language = _optional_str("language", record.get("language"))
        _optional_str("prompt", record.get("prompt"))
    except ValueError as e:
        return BadRow(line, audio, "malformed_line", str(e))
    used = {audio_key, text_key, "id", "language", *NUMBER_KEYS}
    extra = {k: v for k, v in record.items() if k not in used}
    return ManifestRow(line, audio, text, row_id, numbers["duration"], numbers["offset"], numbers["end"],
                       language, extra)


# --- JSON Lines ---------------------------------------------------------------------------------


def _json_records(path: Path) -> Iterator[tuple[int, dict | BadRow]]:
    """(line number, object or BadRow) for every non-blank line, read one line at a time."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield line_no, BadRow(line_no, None, "malformed_line", f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                yield line_no, BadRow(line_no, None, "malformed_line", f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            except ValueError as e:  # an integer longer than Python's int conversion limit
                yield line_no, BadRow(line_no, None, "malformed_line", f"invalid JSON ({str(e).split(':')[0]})")
                continue
            except RecursionError:
                yield line_no, BadRow(line_no, None, "malformed_line", "invalid JSON (nested too deeply)")
                continue
            if not isinstance(record, dict):
                yield line_no, BadRow(line_no, None, "malformed_line", f"a JSON {type(record).__name__}, not an object")
                continue
            if (b"\\ud" in raw or b"\\uD" in raw) and not _encodable(record):
                yield line_no, BadRow(line_no, None, "malformed_line", "a \\uD800-\\uDFFF escape that is not a "
                                      "surrogate pair (not valid Unicode)")
                continue
            yield line_no, record


def _encodable(record: dict) -> bool:
    """Whether every string in ``record`` is valid Unicode (a lone surrogate from a JSON escape is not,
    and would fail later, in a file name or when the row is written out)."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
        return True
    except (UnicodeEncodeError, RecursionError):
        return False


def _check_file(path: Path, what: str) -> Path:
    path = Path(os.path.abspath(path))
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        raise UserError(f"{path} holds a JSON array; a manifest is JSON Lines, one object per line")
    return path


def read_manifest(path: str | os.PathLike) -> Iterator[ManifestRow | BadRow]:
    """Stream the rows of a JSONL manifest, one line at a time, bad lines as ``BadRow``."""
    path = _check_file(Path(path), "manifest")
    return _read_manifest(path)


def _read_manifest(path: Path) -> Iterator[ManifestRow | BadRow]:
    base = path.parent
    for line_no, record in _json_records(path):
        yield record if isinstance(record, BadRow) else row_from_record(record, line_no, base)


# --- CSV / TSV ----------------------------------------------------------------------------------


def _csv_dialect(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return {"delimiter": ","}
    if suffix == ".tsv":  # TSV convention: no quoting (Common Voice sentences hold bare quotes)
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        sample = f.read(64 * 1024)
    try:
        return {"delimiter": csv.Sniffer().sniff(sample, delimiters=",\t;|").delimiter}
    except csv.Error:
        return {"delimiter": ","}


def read_table(path: str | os.PathLike) -> Iterator[ManifestRow | BadRow]:
    """Stream the rows of a CSV/TSV manifest (header row naming the columns); lines are physical."""
    path = _check_file(Path(path), "table")
    dialect = _csv_dialect(path)
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = next(csv.reader(f, **dialect), None)
    if not header:
        raise UserError(f"{path} is empty; want a header row with at least 'audio' and 'text' columns")
    header = [name.strip() for name in header]
    if not any(k in header for k in AUDIO_KEYS) or not any(k in header for k in TEXT_KEYS):
        raise UserError(
            f"{path}: the header {header} has no audio column ({' / '.join(AUDIO_KEYS)}) or no text column "
            f"({' / '.join(TEXT_KEYS)}); delimiter {dialect['delimiter']!r}"
        )
    return _read_table(path, dialect, header)


def _read_table(path: Path, dialect: dict, header: list[str]) -> Iterator[ManifestRow | BadRow]:
    base = path.parent
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f, **dialect)
        next(reader)
        while True:
            line_no = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield BadRow(line_no, None, "malformed_line", f"CSV error: {e}")
                if reader.line_num < line_no:  # the reader did not move on: give up on the file
                    return
                continue
            if not values:  # blank line
                continue
            if len(values) != len(header):
                yield BadRow(line_no, None, "malformed_line", f"{len(values)} fields, the header has {len(header)}")
                continue
            if any("\ufffd" in v for v in values):
                yield BadRow(line_no, None, "malformed_line", "not UTF-8")
                continue
            yield row_from_record(dict(zip(header, values)), line_no, base, from_text=True)


# --- Hugging Face dataset folders ---------------------------------------------------------------


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def read_saved_dataset(folder: str | os.PathLike, audio_dir: str | os.PathLike | None = None) -> Iterator[ManifestRow | BadRow]:
    """Rows of a ``save_to_disk`` folder; line = row index + 1.

    An ``Audio`` column gives ``{path, bytes}``: the path is used when that file exists (as is,
    or relative to the folder); otherwise the bytes are written to ``audio_dir/<line>.flac``
    (re-encoded losslessly unless already FLAC), and without ``audio_dir`` the row is a
    ``missing_file``.
    """
    import datasets

    folder = Path(os.path.abspath(folder))
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise UserError(f"{folder} holds a DatasetDict; give one split folder, one of {splits}")
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises many types for a broken folder
        raise UserError(f"cannot load the dataset saved in {folder}: {type(e).__name__}: {e}") from e
    audio_key = next((k for k in AUDIO_KEYS if k in ds.column_names), None)
    text_key = next((k for k in TEXT_KEYS if k in ds.column_names), None)
    if audio_key is None or text_key is None:
        raise UserError(f"{folder}: columns {ds.column_names} lack an audio ({' / '.join(AUDIO_KEYS)}) "
                        f"or a text ({' / '.join(TEXT_KEYS)}) column")
    if isinstance(ds.features[audio_key], datasets.Audio):
        ds = ds.cast_column(audio_key, datasets.Audio(decode=False))  # path + bytes, no decoding
    return _read_saved_dataset(ds, folder, audio_key, None if audio_dir is None else Path(audio_dir))


def _read_saved_dataset(ds, folder: Path, audio_key: str, audio_dir: Path | None) -> Iterator[ManifestRow | BadRow]:
    for index, example in enumerate(ds):
        line = index + 1
        value = example[audio_key]
        if isinstance(value, dict):
            path, data = value.get("path"), value.get("bytes")
            usable = next((p for p in ([path, folder / path] if path else []) if os.path.isfile(p)), None)
            if usable is not None:
                value = os.path.abspath(usable)
            elif data:
                if audio_dir is None:
                    yield BadRow(line, path, "missing_file", "audio stored only as bytes and no folder to write it to")
                    continue
                value = str(write_audio_bytes(data, audio_dir / f"{line:08d}", path))
            else:
                value = path
        record = {k: v for k, v in example.items() if k == audio_key or _is_scalar(v)}
        record[audio_key] = value
        yield row_from_record(record, line, folder)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def write_audio_bytes(data: bytes, stem: Path, name_hint: str | None = None) -> Path:
    """Write encoded audio bytes to ``stem.flac`` (lossless: FLAC as is, others re-encoded).

    Bytes libsndfile cannot decode (or FLAC cannot hold) are written unchanged with the suffix of
    ``name_hint`` (``.bin`` without one), for validation to decode or report.
    """
    import soundfile as sf

    stem.parent.mkdir(parents=True, exist_ok=True)
    target = stem.with_name(stem.name + ".flac")
    if data[:4] == b"fLaC":
        target.write_bytes(data)
        return target
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            deep = f.subtype in ("PCM_24", "PCM_32", "FLOAT", "DOUBLE")
            dtype = ("float32" if f.subtype in ("FLOAT", "DOUBLE") else "int32") if deep else "int16"
            audio, sample_rate = f.read(dtype=dtype, always_2d=True), f.samplerate
        sf.write(str(target), audio, sample_rate, format="FLAC", subtype="PCM_24" if deep else "PCM_16")
        return target
    except Exception:  # not decodable here: keep the bytes, let validation judge them
        target.unlink(missing_ok=True)
        suffix = Path(name_hint).suffix if name_hint else ""
        target = stem.with_name(stem.name + (suffix or ".bin"))
        target.write_bytes(data)
        return target


# --- dispatch -----------------------------------------------------------------------------------


def _audiofolder_metadata(folder: Path) -> Path | None:
    found = [folder / name for name in METADATA_NAMES if (folder / name).is_file()]
    if len(found) > 1:
        raise UserError(f"{folder} has both {' and '.join(p.name for p in found)}; keep one")
    return found[0] if found else None


def source_format(input_path: str | os.PathLike) -> str:
    """``jsonl``, ``csv``, ``tsv``, ``table`` (sniffed), ``saved_dataset`` or ``audiofolder``."""
    path = Path(input_path)
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if path.is_dir():
        if is_saved_dataset(path):
            return "saved_dataset"
        if _audiofolder_metadata(path) is not None:
            return "audiofolder"
        raise UserError(f"{path} is neither a dataset saved with save_to_disk (state.json) nor an "
                        f"audiofolder ({' or '.join(METADATA_NAMES)} beside the audio)")
    suffix = path.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    return "jsonl" if head.startswith((b"{", b"[")) else "table"


def to_manifest_rows(input_path: str | os.PathLike, audio_dir: str | os.PathLike | None = None) -> Iterator[ManifestRow | BadRow]:
    """Rows of any supported source (see :func:`source_format`), streamed; ``UserError`` if unusable.

    ``audio_dir`` receives audio that a saved dataset holds only as bytes.
    """
    path = Path(os.path.abspath(input_path))
    fmt = source_format(path)
    if fmt == "saved_dataset":
        return read_saved_dataset(path, audio_dir)
    if fmt == "audiofolder":
        metadata = _audiofolder_metadata(path)
        return read_manifest(metadata) if metadata.suffix == ".jsonl" else read_table(metadata)
    return read_manifest(path) if fmt == "jsonl" else read_table(path)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(partial(f.read, 1 << 20), b""))


def _estimate_rows(path: Path, fmt: str) -> int | None:
    """Rows to expect, for the progress bar only."""
    if fmt == "saved_dataset":
        import datasets

        return len(datasets.load_from_disk(str(path)))  # memory-mapped: cheap
    if fmt == "audiofolder":
        path = _audiofolder_metadata(path)
    has_header = path.suffix != ".jsonl" and fmt != "jsonl"
    return max(_count_lines(path) - has_header, 0)


# --- rows for training, evaluation and transcription ---------------------------------------------


def default_id(row: ManifestRow, stem: str) -> str:
    """The one id rule: the row's own ``id``, else ``<manifest stem>-<line>``."""
    return row.id if row.id else f"{stem}-{row.line}"


def read_rows(path: str | os.PathLike, strict: bool = True) -> tuple[list[ManifestRow], list[BadRow]]:
    """The rows of a JSONL manifest with their ids filled in (:func:`default_id`), and its bad lines.

    ``strict`` (training): any bad line, or no row at all, is an error that says how to clean the
    manifest; otherwise (evaluation, transcription) bad lines are returned for the caller to report.
    """
    from dataclasses import replace

    path = Path(path)
    rows: list[ManifestRow] = []
    bad: list[BadRow] = []
    for row in read_manifest(path):
        if isinstance(row, BadRow):
            bad.append(row)
        else:
            rows.append(replace(row, id=default_id(row, path.stem)))
    if strict and bad:
        first = bad[0]
        raise UserError(f"{path}: {len(bad)} bad row(s), first at line {first.line}: {first.reason} "
                        f"{first.detail}; clean it with 'asr-lora prepare manifest {path} --out DIR'")
    if strict and not rows:
        raise UserError(f"{path}: no rows")
    return rows, bad


def load_row_audio(row: ManifestRow, max_seconds: float | None = None) -> np.ndarray:
    """The row's clip (its ``offset``/``end`` segment) as 16 kHz mono float32; an ``AudioError``
    naming the file when it cannot be read, selects nothing, or is longer than ``max_seconds``."""
    try:
        audio = load_audio(row.audio, offset=row.offset, end=row.end)
    except ValueError as e:  # offset/end that select no segment (a manifest not from 'prepare')
        raise AudioError(row.audio, f"bad segment ({e})") from None
    if max_seconds is not None and len(audio) > max_seconds * SAMPLE_RATE:
        raise AudioError(row.audio, f"longer than {max_seconds:g} s ({len(audio) / SAMPLE_RATE:.1f} s)")
    return audio


def length_hint(row: ManifestRow) -> float:
    """Seconds of a row for batching: the segment or clip duration when the manifest gives it, else
    the text length (a duration proxy at about 0.2 s per character)."""
    if row.end is not None and row.offset is not None:
        return row.end - row.offset
    if row.duration:
        return row.duration
    return 0.2 * len(row.text or "")


def nonspeech_rows(path: str | os.PathLike) -> list[ManifestRow]:
    """Non-speech clips as rows (``nonspeech``, empty text): every row of a JSONL manifest, or every
    audio file under a folder (recursively, sorted)."""
    from dataclasses import replace

    from asr_lora.audio import AUDIO_SUFFIXES

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        rows = [ManifestRow(line=i + 1, audio=str(p.resolve()), text="", id=f"nonspeech-{p.stem}",
                            duration=audio_info(p)[0])  # batching by length needs it
                for i, p in enumerate(files)]
    else:
        rows = read_rows(path)[0]
    rows = [replace(r, text="", extra={**r.extra, "nonspeech": True}) for r in rows]
    if not rows:
        raise UserError(f"{path}: no non-speech clips (a JSONL manifest, or a folder of audio files)")
    return rows


def mix_nonspeech(rows: list[ManifestRow], nonspeech: list[ManifestRow], rate: float, seed: int) -> list[ManifestRow]:
    """``rows`` plus non-speech rows drawn (with replacement, deterministically from ``seed``) so that
    they make up ``rate`` of the result."""
    import random

    n = round(rate / (1 - rate) * len(rows)) if rate > 0 else 0
    rng = random.Random(seed * 7919 + 1)
    return rows + [nonspeech[rng.randrange(len(nonspeech))] for _ in range(n)]


def training_rows(cfg) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """Training and dev rows of a recipe (``RecipeConfig``): the train manifest with ``data.nonspeech``
    mixed in at ``data.nonspeech_rate``; the dev manifest (or its fixed ``eval.max_samples`` subset)
    followed by the ``data.nonspeech_dev`` clips."""
    import random

    d, seed = cfg.data, cfg.train.seed
    train, _ = read_rows(d.train)
    if d.nonspeech and d.nonspeech_rate > 0:
        train = mix_nonspeech(train, nonspeech_rows(d.nonspeech), d.nonspeech_rate, seed)
    dev, _ = read_rows(d.dev)
    if cfg.eval.max_samples and cfg.eval.max_samples < len(dev):
        dev = [dev[i] for i in sorted(random.Random(seed).sample(range(len(dev)), cfg.eval.max_samples))]
    return train, dev + (nonspeech_rows(d.nonspeech_dev) if d.nonspeech_dev else [])


def label_tokenizer(model: str):
    """The model's Whisper tokenizer with the Korean transcription prefix, for label lengths."""
    from transformers import WhisperTokenizer

    from asr_lora.bundled import resolve_model

    tokenizer = WhisperTokenizer.from_pretrained(resolve_model(model))
    tokenizer.set_prefix_tokens(language="ko", task="transcribe", predict_timestamps=False)
    return tokenizer


# --- validation ---------------------------------------------------------------------------------


class Drop(NamedTuple):
    reason: str  # one of REASONS
    detail: str


class AudioCheck(NamedTuple):
    duration: float  # seconds decoded (the segment's, for offset/end rows)
    sample_rate: int
    channels: int


def check_audio(row: ManifestRow, max_duration: float = 30.0) -> Drop | AudioCheck:
    """Open and fully decode the row's audio (its segment only, for offset/end rows)."""
    path = row.audio
    if not os.path.exists(path):
        return Drop("missing_file", "no such file")
    if not os.path.isfile(path):
        return Drop("missing_file", "not a regular file")
    try:
        if os.path.getsize(path) == 0:
            return Drop("zero_length", "empty file (0 bytes)")
        file_duration, sample_rate, channels = audio_info(path)
        if empty := zero_length_reason(round(file_duration * sample_rate), sample_rate):
            return Drop("zero_length", empty)
        if row.is_segment:
            start = row.offset or 0.0
            stop = file_duration if row.end is None else min(row.end, file_duration)
            if start >= file_duration:
                return Drop("bad_segment", f"offset {start:g} s is past the end of the file ({file_duration:.3f} s)")
            if row.end is not None and row.end > file_duration + SEGMENT_TOLERANCE:
                return Drop("bad_segment", f"end {row.end:g} s is past the end of the file ({file_duration:.3f} s)")
            if stop - start > max_duration:
                return Drop("too_long", f"segment of {stop - start:.2f} s > {max_duration:g} s")
        elif file_duration > max_duration:
            return Drop("too_long", f"{file_duration:.2f} s > {max_duration:g} s; split it or give offset/end segments")
        # Decode at the file's own rate: every sample is read, nothing resampled.
        audio = load_audio(path, offset=row.offset, end=row.end, sr=sample_rate)
    except ZeroLengthAudio as e:  # the header promised samples that are not there
        return Drop("zero_length", e.reason)
    except AudioError as e:
        return Drop("unreadable_audio", e.reason)
    except Exception as e:  # a corrupt file can fail anywhere; one bad row never stops the run
        return Drop("unreadable_audio", f"{type(e).__name__}: {e}")
    duration = len(audio) / sample_rate
    if duration > max_duration:  # the header understated it
        return Drop("too_long", f"{duration:.2f} s > {max_duration:g} s")
    return AudioCheck(duration, sample_rate, channels)


def _static_problem(row: ManifestRow, n_tokens: int, max_label_tokens: int) -> Drop | None:
    """Problems visible without opening the audio."""
    if row.offset is not None and row.offset < 0:
        return Drop("bad_segment", f"offset {row.offset:g} s is negative")
    if row.end is not None and row.end <= (row.offset or 0.0):
        return Drop("bad_segment", f"offset {row.offset or 0.0:g} s is not before end {row.end:g} s")
    if row.nonspeech and row.text.strip():
        return Drop("nonspeech_with_text", f"marked nonspeech but has text {row.text.strip()[:40]!r}")
    if not row.text.strip() and not row.nonspeech:  # intended non-speech rows are kept, empty
        return Drop("empty_text", "transcript is empty" + (" after strip()" if row.text else ""))
    if n_tokens > max_label_tokens:
        return Drop("label_too_long", f"{n_tokens} label tokens (prefix + text + end) > {max_label_tokens}")
    return None


def validate_rows(
    rows: Iterable[ManifestRow | BadRow],
    tokenizer,
    max_label_tokens: int = 448,
    max_duration: float = 30.0,
    workers: int | None = None,
) -> Iterator[tuple[ManifestRow | BadRow, Drop | AudioCheck]]:
    """Each row with its verdict, in input order; audio is decoded on a thread pool.

    Threads suffice: libsndfile and numpy release the GIL while decoding. At most a few
    rows per worker are in flight, so memory does not grow with the manifest.
    """
    workers = max(1, workers or os.cpu_count() or 1)
    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check-audio") as pool:
        pending: deque[tuple[ManifestRow | BadRow, Drop | AudioCheck | Future]] = deque()
        for chunk in _chunks(rows, TEXT_BATCH):
            good = [row for row in chunk if isinstance(row, ManifestRow)]
            texts = [row.text.strip() for row in good]
            lengths = [len(ids) for ids in tokenizer(texts, verbose=False).input_ids] if texts else []
            n_tokens = dict(zip(map(id, good), lengths))
            for row in chunk:
                if isinstance(row, BadRow):
                    pending.append((row, Drop(row.reason, row.detail)))
                elif problem := _static_problem(row, n_tokens[id(row)], max_label_tokens):
                    pending.append((row, problem))
                else:
                    pending.append((row, pool.submit(check_audio, row, max_duration)))
                while len(pending) > window:
                    row_, verdict = pending.popleft()
                    yield row_, verdict.result() if isinstance(verdict, Future) else verdict
        while pending:
            row_, verdict = pending.popleft()
            yield row_, verdict.result() if isinstance(verdict, Future) else verdict


def _relative_to(path: str, folder: Path) -> str:
    """``path`` relative to ``folder`` when it lies inside ``folder``'s parent, else absolute.

    Audio kept next to the output (``corpus/audio`` beside ``corpus/manifests``) stays portable;
    anything elsewhere keeps its absolute path, so moving OUT never breaks it.
    """
    base = folder.resolve().parent
    try:
        if os.path.commonpath([os.path.abspath(path), base]) != str(base):
            return path
        return os.path.relpath(path, folder)
    except ValueError:  # another drive (Windows)
        return path


def _output_row(row: ManifestRow, check: AudioCheck, row_id: str, out: Path) -> dict:
    out_row = {"id": row_id, "audio": _relative_to(row.audio, out), "text": row.text.strip(),
               "duration": round(check.duration, PRECISION)}
    if row.offset is not None:
        out_row["offset"] = row.offset
    if row.end is not None:
        out_row["end"] = row.end
    if row.language is not None:
        out_row["language"] = row.language
    out_row.update({k: v for k, v in row.extra.items() if k not in out_row})
    return out_row


def _summary_line(kept: int, total: int, hours: float, by_reason: Counter, warnings: Counter) -> str:
    order = sorted(by_reason, key=lambda r: (-by_reason[r], REASONS.index(r)))
    line = f"kept {kept} of {total} rows ({hours:.2f} h); dropped {total - kept}"
    if order:
        line += ": " + ", ".join(f"{reason} {by_reason[reason]}" for reason in order)
    if warnings:
        line += "; warnings: " + ", ".join(f"{kind} {n}" for kind, n in sorted(warnings.items()))
    return line


def prepare_manifest(
    input: Path,
    out: Path,
    model: str,
    max_label_tokens: int = 448,
    progress: bool = True,
    max_duration: float = 30.0,
    workers: int | None = None,
) -> dict:
    """Validate a manifest / CSV / TSV / dataset folder into ``OUT/<stem>.jsonl`` + a report.

    Every clip is decoded. Rows kept get ``duration`` (seconds decoded), an ``id``
    (``<stem>-<line>`` when absent), a stripped ``text`` and ``audio`` relative to OUT. Every
    row dropped is listed in ``OUT/prepare_report.json`` with its line, audio and reason (one of
    :data:`REASONS`); duplicate ids are warnings. Stereo or non-16 kHz audio is kept (loading
    downmixes and resamples) and only counted. Raises ``UserError`` only when the input as a
    whole is missing or unreadable. Returns the report.
    """
    input_path = Path(os.path.abspath(input))
    out = Path(os.path.abspath(out))
    fmt = source_format(input_path)
    stem = input_path.name if input_path.is_dir() else input_path.stem
    rows = to_manifest_rows(input_path, audio_dir=out / "audio")  # raises UserError before any work
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = label_tokenizer(str(model))

    manifest_path = out / f"{stem}.jsonl"
    dropped: list[dict] = []
    by_reason: Counter = Counter()
    sample_rates: Counter = Counter()
    channels: Counter = Counter()
    warnings: list[dict] = []
    first_line_of_id: dict[str, int] = {}
    total = kept = 0
    seconds = 0.0
    verdicts = validate_rows(rows, tokenizer, max_label_tokens, max_duration, workers)
    try:
        with atomic_file(manifest_path) as f, tqdm(
            total=_estimate_rows(input_path, fmt), desc=f"checking {stem}", unit="row", disable=not progress
        ) as bar:
            for row, verdict in verdicts:
                total += 1
                bar.update(1)
                if isinstance(verdict, Drop):
                    by_reason[verdict.reason] += 1
                    dropped.append({"line": row.line, "audio": row.audio, "reason": verdict.reason,
                                    "detail": verdict.detail})
                    continue
                row_id = default_id(row, stem)
                if row_id in first_line_of_id:
                    warnings.append({"kind": "duplicate_id", "id": row_id, "line": row.line,
                                     "first_line": first_line_of_id[row_id]})
                else:
                    first_line_of_id[row_id] = row.line
                out_row = _output_row(row, verdict, row_id, out)
                f.write(json.dumps(out_row, ensure_ascii=False) + "\n")
                kept += 1
                seconds += out_row["duration"]
                sample_rates[str(verdict.sample_rate)] += 1
                channels[str(verdict.channels)] += 1
            bar.total = total  # the estimate counted blank lines and multi-line CSV records
            bar.refresh()
    finally:
        verdicts.close()

    hours = seconds / 3600
    warning_counts = Counter(w["kind"] for w in warnings)
    report = {
        "input": str(input_path),
        "input_format": fmt,
        "manifest": str(manifest_path),
        "model": str(model),
        "max_label_tokens": max_label_tokens,
        "max_duration": max_duration,
        "total": total,
        "kept": kept,
        "dropped": total - kept,
        "seconds_kept": round(seconds, PRECISION),
        "hours_kept": round(hours, 4),
        "dropped_by_reason": {r: by_reason[r] for r in REASONS if by_reason[r]},
        "sample_rates": dict(sorted(sample_rates.items(), key=lambda kv: int(kv[0]))),
        "channels": dict(sorted(channels.items(), key=lambda kv: int(kv[0]))),
        "summary_line": _summary_line(kept, total, hours, by_reason, warning_counts),
        "warnings": warnings,
        "dropped_rows": dropped,
    }
    write_json_atomic(out / REPORT_NAME, report)
    return report
