"""Batched greedy decoding -> metrics report. Used by training (CER every N steps) and `asr-lora eval`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .metrics import Report, score


@dataclass
class EvalResult:
    """Scores of one evaluation pass."""

    report: Report
    eval_loss: float
    seconds: float
    ids: list[str]
    refs: list[str]
    hyps: list[str]
    skipped: list[tuple[str, str]]

    def metrics(self) -> dict:
        """The keys written to metrics.jsonl."""
        r = self.report
        return {"cer": r.cer, "cer_nospace": r.cer_nospace, "wer": r.wer, "swer": r.swer,
                "eval_loss": self.eval_loss, "eval_seconds": round(self.seconds, 3), "eval_n": r.n,
                "eval_skipped": len(self.skipped)}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over label tokens (-100 ignored) and the number of tokens counted."""
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((labels != -100).sum())


def _length_key(row: dict) -> float:
    """Sort key for batching: the segment or clip duration when the manifest gives it, else the text length
    (a duration proxy at about 0.2 s per character)."""
    if row.get("end") is not None and row.get("offset") is not None:
        return float(row["end"]) - float(row["offset"])
    if row.get("duration"):
        return float(row["duration"])
    return 0.2 * len(row.get("text") or "")


@torch.no_grad()
def evaluate_rows(model, tokenizer, collator: Callable, rows: Sequence[dict], *, batch_size: int = 16,
                  language: str = "ko", task: str = "transcribe", max_new_tokens: int = 128,
                  num_beams: int = 1, device=None, progress: bool = False) -> EvalResult:
    """Teacher-forced loss and greedy transcripts for ``rows``, scored with the Korean metrics."""
    from tqdm import tqdm

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    done, hyps, skipped = [], [], []  # done: the row index of each hypothesis
    loss_sum, n_tokens = 0.0, 0
    rows = [dict(r, id=str(r.get("id", i))) for i, r in enumerate(rows)]
    # Batches of similar lengths: trimmed batches pad less, and the decoding cap (from the longest
    # label) fits every row of a batch. Results return in the given order.
    order = sorted(range(len(rows)), key=lambda i: _length_key(rows[i]))
    batches = range(0, len(rows), batch_size)
    for start_i in tqdm(batches, desc="eval", leave=False, disable=not progress):
        chunk = [rows[i] for i in order[start_i:start_i + batch_size]]
        batch = collator(chunk)
        skipped.extend(batch["skipped"])
        if not batch["ids"]:
            continue
        features = batch["input_features"].to(device=device, dtype=dtype if dtype != torch.float32 else None)
        labels = batch["labels"].to(device)
        # one encoder pass serves both the teacher-forced loss and generation
        encoded = model.get_encoder()(features)
        out = model(encoder_outputs=encoded, labels=labels, use_cache=False)
        batch_loss, batch_tokens = token_loss_sum(out.logits, labels)
        loss_sum += float(batch_loss)
        n_tokens += batch_tokens
        # bound decoding by the references: a hypothesis twice as long as its reference is already
        # all errors, and the bound stops untuned or 8-bit models from looping to the cap
        longest = int((labels != -100).sum(dim=1).max())
        cap = min(max_new_tokens, 2 * longest + 8)
        generated = model.generate(encoder_outputs=encoded, language=language, task=task,
                                   max_new_tokens=cap, num_beams=num_beams, use_cache=True)
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        read = iter(batch["ids"])  # the collator keeps the chunk's order, leaving out what it skipped
        want = next(read, None)
        for i in order[start_i:start_i + batch_size]:
            if rows[i]["id"] == want:
                done.append(i)
                want = next(read, None)
        hyps.extend(t.strip() for t in texts)
    if was_training:
        model.train()
    if not done:
        raise ValueError(f"nothing to evaluate: all {len(rows)} rows were skipped ({skipped[:3]})")
    in_order = sorted(zip(done, hyps))
    ids = [rows[i]["id"] for i, _ in in_order]
    refs = [rows[i]["text"] for i, _ in in_order]
    hyps = [h for _, h in in_order]
    report = score(refs, hyps, ids=ids)
    return EvalResult(report=report, eval_loss=loss_sum / max(n_tokens, 1), seconds=time.perf_counter() - start,
                      ids=ids, refs=refs, hyps=hyps, skipped=skipped)


# --------------------------------------------------------------------------- `asr-lora eval`

SUMMARY_KEYS = ("n", "cer", "cer_nospace", "wer", "swer", "insertion_rate", "loop_fraction", "length_ratio",
                "decode_seconds", "audio_seconds", "rtf", "skipped")
WORST_SHOWN = 10


def hypothesis_loops(hyp: str, ref: str = "") -> bool:
    """Whether ``hyp`` holds a decoding loop that ``ref`` does not: a 1..4-word n-gram 4 times in a row,
    or (Korean often loops without spaces) a 1..10-character n-gram 4 times in a row."""
    from .metrics import repeated_ngram_loop

    def loops(text: str) -> bool:
        return repeated_ngram_loop(text, n=4, min_repeats=4, unit="word") or \
            repeated_ngram_loop(text, n=10, min_repeats=4, unit="char")

    return loops(hyp) and not loops(ref)


@dataclass
class ManifestEval:
    """Transcripts and scores of one manifest, with timing and the rows that could not be scored."""

    report: Report
    rows: list[dict]  # per utterance: id, audio, duration, ref, hyp, loop
    decode_seconds: float
    audio_seconds: float
    skipped: list[dict]  # {"id", "reason"}

    def summary(self) -> dict:
        r = self.report
        loops = sum(row["loop"] for row in self.rows)
        return {"n": r.n, "cer": r.cer, "cer_nospace": r.cer_nospace, "wer": r.wer, "swer": r.swer,
                "insertion_rate": r.insertion_rate, "loop_fraction": loops / max(r.n, 1),
                "length_ratio": r.length_ratio, "decode_seconds": round(self.decode_seconds, 3),
                "audio_seconds": round(self.audio_seconds, 3),
                "rtf": self.decode_seconds / self.audio_seconds if self.audio_seconds else None,
                "skipped": len(self.skipped), "skipped_rows": self.skipped, "n_loops": loops}

    def utterances(self) -> list[dict]:
        """utterances.jsonl lines: the row, its character errors and rates, the loop flag."""
        out = []
        for row, u in zip(self.rows, self.report.utterances):
            out.append({"id": row["id"], "audio": row["audio"], "duration": row["duration"],
                        "ref": row["ref"], "hyp": row["hyp"], "errors": u["char_errors"],
                        "ref_chars": u["ref_chars"], "cer": u["cer"], "cer_nospace": u["cer_nospace"],
                        "wer": u["wer"], "loop": row["loop"]})
        return out


def readable_clips(entries: Iterable, manifest: Path, skipped: list[dict], long_hint: str = "") -> Iterator:
    """``(id, row, audio)`` for each row of ``entries`` (from ``read_manifest(manifest)``) that reads as at
    most 30 s of audio; every other row is appended to ``skipped`` as ``{"id", "reason"}``."""
    from .audio import N_SAMPLES, SAMPLE_RATE, AudioError, load_audio
    from .data.manifest import BadRow

    for entry in entries:
        if isinstance(entry, BadRow):
            skipped.append({"id": f"line {entry.line}", "reason": f"{entry.reason}: {entry.detail}".rstrip(": ")})
            continue
        uid = entry.id or f"{manifest.stem}-{entry.line}"
        try:
            audio = load_audio(entry.audio, offset=entry.offset, end=entry.end)
        except AudioError as e:
            skipped.append({"id": uid, "reason": str(e)})
            continue
        if len(audio) > N_SAMPLES:
            skipped.append({"id": uid, "reason": f"longer than 30 s ({len(audio) / SAMPLE_RATE:.1f} s){long_hint}"})
            continue
        yield uid, entry, audio


def evaluate_manifest(transcriber, manifest: str | Path, *, batch_size: int = 16, limit: int | None = None,
                      progress: bool = True) -> ManifestEval:
    """Transcribe every row of ``manifest`` in batches with ``transcriber`` (see
    :func:`asr_lora.backends.load_transcriber`) and score it. Malformed rows, unreadable audio and
    clips longer than 30 s are skipped with a reason, never fatal. ``decode_seconds`` counts
    features + decoding, not audio loading."""
    from tqdm import tqdm

    from .audio import SAMPLE_RATE
    from .data.manifest import read_manifest
    from .errors import UserError

    manifest = Path(manifest)
    entries = list(read_manifest(manifest))
    if limit:
        entries = entries[:limit]
    rows, skipped = [], []
    decode_seconds = audio_seconds = 0.0
    pending: list[tuple[dict, object]] = []

    def flush() -> None:
        nonlocal decode_seconds
        if not pending:
            return
        start = time.perf_counter()
        hyps = transcriber.transcribe_batch([audio for _, audio in pending])
        decode_seconds += time.perf_counter() - start
        for (row, _), hyp in zip(pending, hyps):
            rows.append({**row, "hyp": hyp, "loop": hypothesis_loops(hyp, row["ref"])})
        pending.clear()

    bar = tqdm(entries, desc="eval", unit="utt", disable=not progress, leave=False)
    for uid, entry, audio in readable_clips(bar, manifest, skipped, long_hint="; eval scores single Whisper "
                                            "windows, use transcribe for long audio"):
        duration = len(audio) / SAMPLE_RATE
        audio_seconds += duration
        pending.append(({"id": uid, "audio": entry.audio, "duration": round(duration, 3), "ref": entry.text}, audio))
        if len(pending) >= batch_size:
            flush()
    flush()
    if not rows:
        raise UserError(f"{manifest}: nothing to evaluate, all {len(entries)} rows skipped "
                        f"(first: {skipped[0]['id']}: {skipped[0]['reason']})" if skipped else f"{manifest}: no rows")
    report = score([r["ref"] for r in rows], [r["hyp"] for r in rows], ids=[r["id"] for r in rows])
    return ManifestEval(report=report, rows=rows, decode_seconds=decode_seconds, audio_seconds=audio_seconds,
                        skipped=skipped)


def _md_cell(text: str, width: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def summary_markdown(result: ManifestEval, meta: dict) -> str:
    """summary.md: the metrics table, the worst utterances by character errors, the skipped rows."""
    s = result.summary()
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    lines = [f"# Evaluation of {meta.get('model', 'model')}", "",
             f"Manifest `{meta.get('manifest')}`: {s['n']} utterances scored, {s['skipped']} skipped; "
             f"{s['audio_seconds']:.1f} s of audio decoded in {s['decode_seconds']:.1f} s "
             f"(batch {meta.get('batch_size')}, language {meta.get('language')}).", "",
             "| metric | value |", "|---|---|",
             f"| CER | {pct(s['cer'])} |", f"| CER without spaces | {pct(s['cer_nospace'])} |",
             f"| WER | {pct(s['wer'])} |", f"| sWER (re-spaced) | {pct(s['swer'])} |",
             f"| insertion rate (chars) | {pct(s['insertion_rate'])} |",
             f"| hypotheses with a loop | {s['n_loops']} ({pct(s['loop_fraction'])}) |",
             f"| length ratio hyp/ref | {s['length_ratio']:.3f} |",
             f"| real-time factor | {s['rtf']:.4f} |" if s["rtf"] is not None else "| real-time factor | n/a |",
             "", f"## Worst {WORST_SHOWN} utterances (by character errors)", "",
             "| id | errors | CER | loop | reference | hypothesis |", "|---|---:|---:|---|---|---|"]
    worst = sorted(result.utterances(), key=lambda u: (-u["errors"], u["id"]))[:WORST_SHOWN]
    for u in worst:
        lines.append(f"| {_md_cell(u['id'], 40)} | {u['errors']} | {pct(u['cer'])} | {'yes' if u['loop'] else ''} "
                     f"| {_md_cell(u['ref'])} | {_md_cell(u['hyp'])} |")
    if result.skipped:
        lines += ["", f"## Skipped ({len(result.skipped)})", "", "| id | reason |", "|---|---|"]
        lines += [f"| {_md_cell(x['id'], 40)} | {_md_cell(x['reason'], 200)} |" for x in result.skipped]
    return "\n".join(lines) + "\n"


def write_eval_outputs(result: ManifestEval, out: str | Path, meta: dict) -> Path:
    """``out/summary.json``, ``out/utterances.jsonl`` and ``out/summary.md``; returns ``out``."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**result.summary(), **meta}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(out / "utterances.jsonl", "w", encoding="utf-8") as fh:
        for u in result.utterances():
            fh.write(json.dumps(u, ensure_ascii=False) + "\n")
    (out / "summary.md").write_text(summary_markdown(result, meta), encoding="utf-8")
    return out
