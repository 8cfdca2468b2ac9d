"""KsponSpeech (AI Hub, ETRI) -> JSONL manifests.

Two source layouts are understood:

* ``ROOT/scripts/{train,dev,eval_clean,eval_other}.trn``: the official split lists, UTF-8 lines
  ``<relpath> :: <raw transcript>``. A path that does not exist under ROOT is tried again without
  its first component (eval audio is unpacked both as ``KsponSpeech_eval/eval_clean/...`` and as
  ``eval_clean/...``).
* No ``scripts/``: ``ROOT/KsponSpeech_0*/**/*.txt`` (cp949 or UTF-8, one per ``.pcm`` with the
  same stem), split by the numbered folder ``KsponSpeech_NNNN``: 0001-0620 train, 0621-0623 dev.

Audio stays where it is: rows point at the headerless 16 kHz s16le mono ``.pcm`` files, and the
duration comes from the file size alone. Transcripts are cleaned by
:func:`asr_lora.text.clean_kspon_transcript` (the ETRI rules are listed in ``asr_lora/text.py``).

Every row names its ``session`` (the folder, see below), which ``data.concat_probability`` follows
when it joins utterances into one training input. With ``prompts``, each row gets a ``prompt``: the text of the utterance before it in the same session
(:func:`session_of`), for ``train.prompt_probability``. KsponSpeech file names carry no dialogue id:
utterances are numbered in recording order and stored 1000 to a numbered folder
(``KsponSpeech_0001/KsponSpeech_000001.pcm`` ...), so a session here is a folder, and the previous
utterance is the row just before in that folder (the first row of a folder has no prompt; a prompt
may cross the boundary between two dialogues inside a folder, rarely: dialogues hold hundreds of
utterances).

Every problem is reported, never raised: missing or empty audio, undecodable transcripts,
malformed lines, and noise-only utterances (not written unless ``keep_noise_only``) all land in
``OUT/prepare_report.json`` with their line numbers or paths. Manifests are written to a
``.partial`` file and renamed when complete, and the report is rewritten after each split, so an
interrupted run never leaves a manifest that looks finished and a rerun skips finished splits.
"""

from __future__ import annotations

import json
import os
import re
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from tqdm import tqdm

from asr_lora.atomic import atomic_file, write_json_atomic
from asr_lora.data import _chunks
from asr_lora.errors import DataError, UserError
from asr_lora.text import KSPON_SIDES, clean_kspon_transcript, is_noise_only

SAMPLE_RATE = 16_000
BYTES_PER_SAMPLE = 2
SPLITS = ("train", "dev", "eval_clean", "eval_other")
WALK_SPLITS = {"train": range(1, 621), "dev": range(621, 624)}
REPORT_NAME = "prepare_report.json"
CHUNK_SIZE = 2048  # utterances per worker task

_NUMBERED_FOLDER = re.compile(r"KsponSpeech_(\d{4})")


# --- per-utterance work (runs in worker processes) --------------------------------------------


def pcm_duration(size_bytes: int) -> float:
    """Seconds of 16 kHz s16le mono audio in a file this size (a trailing odd byte is ignored)."""
    return (size_bytes // BYTES_PER_SAMPLE) / SAMPLE_RATE


def decode_transcript(data: bytes) -> str | None:
    """Decode a transcript file: UTF-8 first, then cp949; ``None`` if neither works.

    UTF-8 goes first because it is the strict one: cp949 Hangul bytes are never valid UTF-8,
    while UTF-8 Hangul often decodes as cp949 without error, into the wrong characters.
    """
    for encoding in ("utf-8-sig", "cp949"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return None


def _manifest_audio_path(audio: str, out_dir: str) -> str:
    try:
        return os.path.relpath(audio, out_dir)
    except ValueError:  # another drive on Windows
        return audio


def _utterance(audio: str, raw: str, where: dict, out_dir: str, side: str) -> dict:
    """Stat the audio and clean the transcript of one utterance -> a row or a drop record."""
    try:
        size = os.stat(audio).st_size
    except OSError as err:
        return {"drop": {**where, "reason": f"audio not readable: {err.strerror or err}"}}
    if size < BYTES_PER_SAMPLE:
        return {"drop": {**where, "reason": f"empty audio file ({size} bytes)"}}
    text = clean_kspon_transcript(raw, side)
    row = {
        "id": Path(audio).stem,
        "audio": _manifest_audio_path(audio, out_dir),
        "text": text,
        "duration": round(pcm_duration(size), 3),
        "language": "ko",
    }
    row["session"] = session_of(row)  # joined inputs (data.concat_probability) follow a session's utterances
    return {"row": row, "odd": size % 2 == 1, "noise_only": is_noise_only(text)}


def resolve_audio(root: str, relpath: str) -> str | None:
    """``ROOT/relpath``, else ``ROOT/relpath-without-its-first-component``, else ``None``."""
    parts = [p for p in relpath.replace("\\", "/").split("/") if p not in ("", ".")]
    for candidate in (parts, parts[1:]):
        if candidate:
            path = os.path.join(root, *candidate)
            if os.path.isfile(path):
                return path
    return None


def _process_trn_chunk(root: str, out_dir: str, side: str, items: list) -> list[dict]:
    results = []
    for line_no, data in items:
        where = {"line": line_no}
        raw_line = decode_transcript(data)
        if raw_line is None:
            reason = "line is neither UTF-8 nor cp949"
            results.append({"drop": {**where, "path": None, "reason": reason}})
            continue
        relpath, sep, raw = raw_line.partition("::")
        relpath = relpath.strip()
        where["path"] = relpath or None
        if not sep or not relpath:
            results.append({"drop": {**where, "reason": "malformed line (want 'path :: text')"}})
            continue
        audio = resolve_audio(root, relpath)
        if audio is None:
            results.append({"drop": {**where, "reason": "audio not found"}})
            continue
        results.append(_utterance(audio, raw, where, out_dir, side))
    return results


def _process_walk_chunk(root: str, out_dir: str, side: str, items: list) -> list[dict]:
    results = []
    for txt in items:
        where = {"line": None, "path": os.path.relpath(txt, root)}
        try:
            with open(txt, "rb") as f:
                raw = decode_transcript(f.read())
        except OSError as err:
            results.append({"drop": {**where, "reason": f"transcript not readable: {err}"}})
            continue
        if raw is None:
            results.append({"drop": {**where, "reason": "transcript is neither UTF-8 nor cp949"}})
            continue
        audio = os.path.splitext(txt)[0] + ".pcm"
        if not os.path.isfile(audio):
            results.append({"drop": {**where, "reason": "audio not found (no .pcm beside it)"}})
            continue
        results.append(_utterance(audio, " ".join(raw.splitlines()), where, out_dir, side))
    return results


# --- sources ----------------------------------------------------------------------------------


def _trn_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield line_no, line


def _trn_chunks(path: Path) -> Iterator[list]:
    return _chunks(_trn_lines(path), CHUNK_SIZE)


def _count_trn_lines(path: Path) -> int:
    return sum(1 for _ in _trn_lines(path))


def _walk_transcripts(root: Path) -> tuple[dict[str, list[str]], dict[str, int], list[dict]]:
    """``KsponSpeech_0*/**/*.txt`` by split, numbered-folder counts per split, and strays."""
    by_split: dict[str, list[str]] = {split: [] for split in WALK_SPLITS}
    folders: dict[str, set[str]] = {split: set() for split in WALK_SPLITS}
    outside = []
    tops = sorted(p for p in root.glob("KsponSpeech_0*") if p.is_dir())
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            txts = sorted(f for f in filenames if f.endswith(".txt"))
            if not txts:
                continue
            rel_dir = os.path.relpath(dirpath, root)
            numbers = [int(m.group(1)) for part in Path(rel_dir).parts
                       if (m := _NUMBERED_FOLDER.fullmatch(part))]
            split = next((s for s, r in WALK_SPLITS.items() if numbers and numbers[-1] in r), None)
            if split is None:
                reason = "not in a KsponSpeech_NNNN folder numbered 0001-0623"
                outside += [{"line": None, "path": os.path.join(rel_dir, f), "reason": reason}
                            for f in txts]
                continue
            folders[split].add(rel_dir)
            by_split[split] += [os.path.join(dirpath, f) for f in txts]
    return by_split, {s: len(f) for s, f in folders.items()}, outside


# --- running a split --------------------------------------------------------------------------


def _ordered_parallel(fn: Callable, chunks: Iterable[list], workers: int) -> Iterator[list]:
    """``map(fn, chunks)`` over worker processes, in order, with a bounded number in flight."""
    if workers <= 1:
        yield from map(fn, chunks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(fn, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def session_of(row: dict) -> str:
    """A row's session: the folder of its audio file (see the module docstring)."""
    return os.path.dirname(row["audio"].replace("\\", "/"))


class PreviousText:
    """Fills ``prompt`` with the text of the previous row written in the same session."""

    def __init__(self):
        self.session, self.text = None, ""

    def __call__(self, row: dict) -> dict:
        session = session_of(row)
        if session == self.session and self.text:
            row = {**row, "prompt": self.text}
        self.session, self.text = session, row["text"]
        return row


def _write_split(
    out: Path,
    split: str,
    results: Iterator[list],
    total: int,
    keep_noise_only: bool,
    progress: bool,
    prompts: bool = False,
) -> dict:
    """Stream rows into ``OUT/split.jsonl`` (via ``.partial``) and return the split's stats."""
    final = out / f"{split}.jsonl"
    kept, seconds, odd = 0, 0.0, 0
    dropped, noise_ids = [], []
    previous = PreviousText() if prompts else None
    with atomic_file(final) as f, tqdm(
        total=total, desc=f"kspon {split}", unit="utt", disable=not progress
    ) as bar:
        for chunk in results:
            for result in chunk:
                if "drop" in result:
                    dropped.append(result["drop"])
                    continue
                row = result["row"]
                if result["noise_only"]:
                    noise_ids.append(row["id"])
                    if not keep_noise_only:
                        continue
                if previous is not None:
                    row = previous(row)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                kept += 1
                seconds += row["duration"]
                odd += result["odd"]
            bar.update(len(chunk))
    return {
        "manifest": final.name,
        "utterances": kept,
        "seconds": round(seconds, 3),
        "hours": round(seconds / 3600, 4),
        "odd_length_files": odd,
        "noise_only": {"count": len(noise_ids), "kept": keep_noise_only, "ids": noise_ids},
        "dropped": dropped,
    }


def _load_report(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        return report if isinstance(report, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_report(path: Path, report: dict) -> None:
    write_json_atomic(path, report)


def _totals(splits: dict) -> dict:
    done = [s for s in splits.values() if "utterances" in s]
    seconds = sum(s["seconds"] for s in done)
    return {
        "utterances": sum(s["utterances"] for s in done),
        "seconds": round(seconds, 3),
        "hours": round(seconds / 3600, 4),
        "dropped": sum(len(s["dropped"]) for s in done),
        "noise_only": sum(s["noise_only"]["count"] for s in done),
        "odd_length_files": sum(s["odd_length_files"] for s in done),
    }


# --- entry point ------------------------------------------------------------------------------


class _SplitPlan(NamedTuple):
    source: dict  # what the split is made from; an unchanged source means "skip on rerun"
    count: Callable[[], int]  # number of work items, for the progress bar
    chunks: Callable[[], Iterator[list]]
    worker: Callable[..., list[dict]]  # _process_trn_chunk or _process_walk_chunk


def _plan_trn(root: Path, settings: dict) -> tuple[dict[str, _SplitPlan], dict]:
    plans, missing = {}, []
    for split in SPLITS:
        trn = root / "scripts" / f"{split}.trn"
        if not trn.is_file():
            missing.append(str(trn))
            continue
        stat = trn.stat()
        source = {"mode": "trn", "path": str(trn), "size": stat.st_size,
                  "mtime_ns": stat.st_mtime_ns, **settings}
        plans[split] = _SplitPlan(
            source,
            partial(_count_trn_lines, trn),
            partial(_trn_chunks, trn),
            _process_trn_chunk,
        )
    return plans, {"missing_sources": missing}


def _plan_walk(root: Path, settings: dict) -> tuple[dict[str, _SplitPlan], dict]:
    by_split, folder_counts, outside = _walk_transcripts(root)
    if not any(by_split.values()) and not outside:
        raise DataError(
            f"{root} has neither scripts/*.trn nor KsponSpeech_0*/**/*.txt transcripts"
        )
    plans, missing = {}, []
    for split, txts in by_split.items():
        numbers = WALK_SPLITS[split]
        if not txts:
            missing.append(f"{split}: no .txt under KsponSpeech_{numbers[0]:04d}-{numbers[-1]:04d}")
            continue
        source = {"mode": "walk", "root": str(root), "folders": folder_counts[split],
                  "files": len(txts), **settings}
        plans[split] = _SplitPlan(
            source, partial(len, txts), partial(_chunks, txts, CHUNK_SIZE), _process_walk_chunk
        )
    return plans, {"missing_sources": missing, "outside_splits": outside}


def prepare_kspon(
    root: Path,
    out: Path,
    side: str = "spelling",
    workers: int | None = None,
    keep_noise_only: bool = False,
    progress: bool = True,
    prompts: bool = False,
) -> dict:
    """Write ``OUT/{split}.jsonl`` and ``OUT/prepare_report.json`` for a KsponSpeech tree.

    ``side`` picks the spelling or pronunciation side of dual transcriptions. A split whose
    manifest exists and whose recorded source (trn path, size and mtime, or the walked folder
    and file counts, plus side, keep_noise_only and prompts) is unchanged is skipped. ``prompts``: each
    row's ``prompt`` is the previous utterance's text in its session (module docstring). Returns the report.
    """
    if side not in KSPON_SIDES:
        raise UserError(f"side must be one of {KSPON_SIDES}, got {side!r}")
    root, out = Path(os.path.abspath(root)), Path(os.path.abspath(out))
    if not root.is_dir():
        raise DataError(f"KsponSpeech root not found: {root}")
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    report_path = out / REPORT_NAME
    previous = _load_report(report_path).get("splits", {})
    settings = {"side": side, "keep_noise_only": keep_noise_only, **({"prompts": True} if prompts else {})}

    has_trn = any((root / "scripts" / f"{s}.trn").is_file() for s in SPLITS)
    mode = "trn" if has_trn else "walk"
    plans, notes = (_plan_trn if has_trn else _plan_walk)(root, settings)

    report = {"root": str(root), "out": str(out), "mode": mode, **settings,
              "splits": {}, **notes, "totals": {}}
    for split, plan in plans.items():
        before = previous.get(split, {})
        if before.get("source") == plan.source and (out / f"{split}.jsonl").is_file():
            report["splits"][split] = {**before, "skipped": True}
        else:
            total = plan.count()
            worker = partial(plan.worker, str(root), str(out), side)
            pool_size = workers if total > CHUNK_SIZE else 1  # one chunk: no pool to start
            results = _ordered_parallel(worker, plan.chunks(), pool_size)
            stats = _write_split(out, split, results, total, keep_noise_only, progress, prompts)
            report["splits"][split] = {"source": plan.source, "skipped": False, **stats}
        report["totals"] = _totals(report["splits"])
        _save_report(report_path, report)
    return report
