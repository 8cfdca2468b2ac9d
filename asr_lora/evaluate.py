"""Scoring: decode manifest rows in batches through a transcriber, score them with the Korean metrics.

One function, :func:`evaluate_rows`, serves in-training evaluation (with the teacher-forced dev loss
through a callback) and ``asr-lora eval``: the same transcriber decode path, batches of similar
length, the same decoding options, so the two agree on the same rows.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .data.concat import JoinedRow, load_input
from .data.manifest import ManifestRow, length_hint, read_rows
from .errors import UserError
from .metrics import Report, score

SUMMARY_KEYS = ("n", "cer", "cer_nospace", "wer", "swer", "insertion_rate", "deletion_rate", "loop_fraction",
                "length_ratio",
                "decode_seconds", "audio_seconds", "rtf", "skipped")
WORST_SHOWN = 10
UTTERANCES_FILE = "utterances.jsonl"
TRANSCRIBE_UTTERANCES = "utterances_transcribe.jsonl"  # eval --as-transcribe
SIGNAL_KEYS = ("no_speech_prob", "avg_logprob", "compression_ratio", "temperature", "skip_reason")
LONG_HINT = "; eval scores single Whisper windows, use transcribe for long audio"


class NothingToEvaluate(UserError, ValueError):
    """Every row was skipped (unreadable, too long, malformed)."""


@dataclass
class EvalResult:
    """Transcripts and scores of one evaluation pass, in the rows' order."""

    report: Report
    utterances_in: list[dict]  # per scored row: id, audio, offset, end, duration, ref, hyp
    skipped: list[dict]  # {"id", "reason"}
    decode_seconds: float = 0.0  # features + decoding (+ the loss pass), not audio loading
    audio_seconds: float = 0.0
    seconds: float = 0.0  # the whole pass
    eval_loss: float | None = None
    extra: dict = field(default_factory=dict)  # nonspeech_n, nonspeech_share when non-speech rows were decoded
    nonspeech: list[dict] = field(default_factory=list)  # the non-speech rows decoded, with their hyps

    @property
    def ids(self) -> list[str]:
        return [u["id"] for u in self.utterances_in]

    @property
    def refs(self) -> list[str]:
        return [u["ref"] for u in self.utterances_in]

    @property
    def hyps(self) -> list[str]:
        return [u["hyp"] for u in self.utterances_in]

    def metrics(self) -> dict:
        """The keys of an evaluation record in metrics.jsonl."""
        r = self.report
        return {"cer": r.cer, "cer_nospace": r.cer_nospace, "wer": r.wer, "swer": r.swer,
                "eval_loss": self.eval_loss, "eval_seconds": round(self.seconds, 3), "eval_n": r.n,
                "eval_skipped": len(self.skipped), **self.extra}

    def summary(self) -> dict:
        """``asr-lora eval``'s summary.json keys."""
        r = self.report
        loops = sum(hypothesis_loops(u["hyp"], u["ref"]) for u in self.utterances_in)
        return {"n": r.n, "cer": r.cer, "cer_nospace": r.cer_nospace, "wer": r.wer, "swer": r.swer,
                "insertion_rate": r.insertion_rate, "deletion_rate": r.deletion_rate,
                "loop_fraction": loops / max(r.n, 1),
                "length_ratio": r.length_ratio, "decode_seconds": round(self.decode_seconds, 3),
                "audio_seconds": round(self.audio_seconds, 3),
                "rtf": self.decode_seconds / self.audio_seconds if self.audio_seconds else None,
                "skipped": len(self.skipped), "skipped_rows": self.skipped, "n_loops": loops, **self.extra}

    def utterances(self) -> list[dict]:
        """utterances.jsonl lines: the row, its character errors and rates, the loop flag, the
        no-speech signals; then the non-speech rows (``nonspeech: true``, no error counts)."""
        out = []
        for u, s in zip(self.utterances_in, self.report.utterances):
            line = {"id": u["id"], "audio": u["audio"], "duration": u["duration"]}
            line.update({k: u[k] for k in ("offset", "end") if u.get(k) is not None})
            line.update({"ref": u["ref"], "hyp": u["hyp"], "errors": s["char_errors"], "ref_chars": s["ref_chars"],
                         "cer": s["cer"], "cer_nospace": s["cer_nospace"], "wer": s["wer"],
                         "loop": hypothesis_loops(u["hyp"], u["ref"])})
            line.update({k: u[k] for k in SIGNAL_KEYS if k in u})
            out.append(line)
        for u in self.nonspeech:
            out.append({k: v for k, v in u.items() if v is not None or k in SIGNAL_KEYS} | {"loop": False})
        return out


def scored(utterances: list[dict], skipped: list[dict], **kwargs) -> EvalResult:
    """An :class:`EvalResult` of already decoded utterances (e.g. gathered from several processes).

    Speech rows are scored (CER, WER, ...); intended non-speech rows (``nonspeech``) are not: their
    number and the share that got any output go to ``extra`` (``nonspeech_n``, ``nonspeech_share``)."""
    speech = [u for u in utterances if not u.get("nonspeech")]
    silent = [u for u in utterances if u.get("nonspeech")]
    if not speech:
        first = f" (first: {skipped[0]['id']}: {skipped[0]['reason']})" if skipped else ""
        what = f"no speech row among the {len(silent)} decoded" if silent else f"all {len(skipped)} rows were skipped"
        raise NothingToEvaluate(f"nothing to evaluate: {what}{first}")
    report = score([u["ref"] for u in speech], [u["hyp"] for u in speech], ids=[u["id"] for u in speech])
    result = EvalResult(report=report, utterances_in=speech, skipped=skipped, **kwargs)
    if silent:
        result.extra.update(nonspeech_n=len(silent), nonspeech_share=sum(bool(u["hyp"]) for u in silent) / len(silent))
        result.nonspeech = silent
    return result


def evaluate_rows(transcriber, rows: Sequence[ManifestRow | JoinedRow], *, batch_size: int = 16,
                  loss: Callable | None = None, before_batch: Callable[[int], None] | None = None,
                  progress: bool = False) -> EvalResult:
    """Decode ``rows`` (ids filled in) with ``transcriber`` and score them.

    Rows are batched by length (trimmed batches pad less, and a reference-bounded cap fits every row
    of a batch); results come back in the given order. Unreadable rows and clips over 30 s are
    skipped with a reason. ``loss(encoder_outputs, rows) -> (loss_sum, n_tokens)`` adds the
    teacher-forced loss on the same encoder pass (HF transcribers). ``before_batch(i)`` is called
    before batch ``i``.
    """
    from tqdm import tqdm

    from .audio import SAMPLE_RATE, AudioError

    start = time.perf_counter()
    done: list[tuple[int, dict]] = []
    skipped: list[dict] = []
    loss_sum, n_tokens = 0.0, 0
    decode_seconds = audio_seconds = 0.0
    order = sorted(range(len(rows)), key=lambda i: length_hint(rows[i]))
    with eval_mode(transcriber):
        for k, first in enumerate(tqdm(range(0, len(rows), batch_size), desc="eval", leave=False,
                                       disable=not progress)):
            if before_batch is not None:
                before_batch(k)
            batch, audios = [], []
            for i in order[first:first + batch_size]:
                try:
                    audios.append(load_input(rows[i], max_seconds=30.0))
                except AudioError as e:
                    hint = LONG_HINT if "longer than" in (e.reason or "") else ""
                    skipped.append({"id": rows[i].id, "reason": str(e) + hint})
                    continue
                batch.append(i)
            if not batch:
                continue
            texts = [rows[i].text for i in batch]
            t0 = time.perf_counter()
            losses = []
            batch_rows = [rows[i] for i in batch]
            on_encoded = (lambda encoded: losses.append(loss(encoded, batch_rows))) if loss is not None else None
            hyps = transcriber.decode(audios, references=texts, on_encoded=on_encoded)
            decode_seconds += time.perf_counter() - t0
            for (batch_loss, batch_tokens) in losses:
                loss_sum += float(batch_loss)
                n_tokens += batch_tokens
            for i, audio, hyp in zip(batch, audios, hyps):
                duration = len(audio) / SAMPLE_RATE
                audio_seconds += duration
                row = rows[i]
                done.append((i, {"id": row.id, "audio": row.audio, "offset": row.offset, "end": row.end,
                                 "duration": round(duration, 3), "ref": row.text, "hyp": hyp.text,
                                 "nonspeech": row.nonspeech, **hyp.to_json()}))
    utterances = [u for _, u in sorted(done, key=lambda x: x[0])]
    return scored(utterances, skipped, decode_seconds=decode_seconds, audio_seconds=audio_seconds,
                  seconds=time.perf_counter() - start, eval_loss=loss_sum / n_tokens if loss and n_tokens else None)


@contextmanager
def eval_mode(transcriber):
    """The transcriber's model in eval mode (no dropout) for the block, its training mode back after."""
    model = getattr(transcriber, "model", None)
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def evaluate_as_transcribe(transcriber, rows: Sequence[ManifestRow | JoinedRow], *, split: str = "auto",
                           vad: bool = True, progress: bool = False) -> EvalResult:
    """Decode each row as ``asr-lora transcribe`` decodes a file (:func:`asr_lora.transcribe.transcribe_audio`:
    VAD pieces within the model's trained input length, the transcriber's options with their fallback and
    silence rule, the completeness guard) and score the joined text. Rows of any length; unreadable rows
    are skipped with a reason. Each utterance line gets ``pieces`` (decoded) and ``redecoded`` (pieces the
    completeness guard split)."""
    from tqdm import tqdm

    from .audio import SAMPLE_RATE, AudioError
    from .transcribe import resolve_split, transcribe_audio

    start = time.perf_counter()
    split = resolve_split(split, transcriber.settings)
    done, skipped = [], []
    decode_seconds = audio_seconds = 0.0
    with eval_mode(transcriber):
        for row in tqdm(rows, desc="eval (as transcribe)", leave=False, disable=not progress):
            try:
                audio = load_input(row)
            except AudioError as e:
                skipped.append({"id": row.id, "reason": str(e)})
                continue
            t0 = time.perf_counter()
            segments = transcribe_audio(audio, transcriber.decode, split, vad, transcriber.settings)
            decode_seconds += time.perf_counter() - t0
            audio_seconds += len(audio) / SAMPLE_RATE
            decoded = [s for s in segments if "avg_logprob" in s]
            done.append({"id": row.id, "audio": row.audio, "offset": row.offset, "end": row.end,
                         "duration": round(len(audio) / SAMPLE_RATE, 3), "ref": row.text,
                         "hyp": " ".join(s["text"] for s in segments if s["text"]).strip(),
                         "nonspeech": row.nonspeech, "pieces": len(decoded),
                         "redecoded": sum(1 for s in decoded if s.get("redecoded"))})
    return scored(done, skipped, decode_seconds=decode_seconds, audio_seconds=audio_seconds,
                  seconds=time.perf_counter() - start)


@dataclass
class LongformProbe:
    """Fixed long-form inputs made of dev rows (``eval.longform_*``): ``inputs``, consecutive rows joined
    into inputs of 20-30 s, and ``file``, all of them joined into one file."""

    inputs: list[JoinedRow]
    file: JoinedRow

    @classmethod
    def from_rows(cls, rows: Sequence[ManifestRow], n: int, seconds: Sequence[float], pause: float) -> LongformProbe:
        from .data.concat import group_rows, joined

        speech = [r for r in rows if not r.nonspeech][:n]
        if not speech:
            raise UserError("the long-form probe (eval.longform_rows) needs speech rows in data.dev")
        groups = group_rows(speech, seconds[0], seconds[1], pause)
        return cls([joined(g, pause) for g in groups], joined(speech, pause))

    def describe(self) -> str:
        minutes = (sum(map(length_hint, self.file.parts)) + sum(self.file.pauses)) / 60
        return (f"long-form probe: {len(self.file.parts)} dev rows as {len(self.inputs)} joined inputs and one "
                f"{minutes:.1f}-minute file")


def score_longform(probe: LongformProbe, whole, file) -> tuple[dict, list[dict]]:
    """The long-form probe decoded: ``whole`` (a transcriber) decodes each joined input as one piece,
    ``file`` (a transcriber with transcription's options) decodes the file as ``asr-lora transcribe``
    does. Returns ``longform_cer``, ``longform_deletion_rate``, ``longfile_cer``,
    ``longfile_deletion_rate``, ``longfile_pieces`` and the utterance lines (ids ``longform-1``, ...,
    and ``longfile``); the keys of a part whose audio could not be read are left out."""
    metrics: dict = {}
    lines: list[dict] = []
    try:  # unreadable dev audio leaves the probe's keys out; the evaluation goes on
        inputs = evaluate_rows(whole, probe.inputs, batch_size=len(probe.inputs))
        metrics.update(longform_cer=inputs.report.cer, longform_deletion_rate=inputs.report.deletion_rate)
        lines += [{**u, "id": f"longform-{k + 1}"} for k, u in enumerate(inputs.utterances())]
    except NothingToEvaluate:
        pass
    try:
        long_file = evaluate_as_transcribe(file, [probe.file])
        metrics.update(longfile_cer=long_file.report.cer, longfile_deletion_rate=long_file.report.deletion_rate,
                       longfile_pieces=long_file.utterances_in[0]["pieces"])
        lines += [{**u, "id": "longfile"} for u in long_file.utterances()]
    except NothingToEvaluate:
        pass
    return metrics, lines


# --------------------------------------------------------------------------- `asr-lora eval`


def hypothesis_loops(hyp: str, ref: str = "") -> bool:
    """Whether ``hyp`` holds a decoding loop that ``ref`` does not: a 1..4-word n-gram 4 times in a row,
    or (Korean often loops without spaces) a 1..10-character n-gram 4 times in a row."""
    from .metrics import repeated_ngram_loop

    def loops(text: str) -> bool:
        return repeated_ngram_loop(text, n=4, min_repeats=4, unit="word") or \
            repeated_ngram_loop(text, n=10, min_repeats=4, unit="char")

    return loops(hyp) and not loops(ref)


def evaluate_manifest(transcriber, manifest: str | Path, *, batch_size: int = 16, limit: int | None = None,
                      progress: bool = True, as_transcribe: bool = False, split: str = "auto",
                      vad: bool = True) -> EvalResult:
    """Transcribe every row of ``manifest`` in batches with ``transcriber`` (see
    :func:`asr_lora.sources.load_transcriber`) and score it. Malformed rows, unreadable audio and
    clips longer than 30 s are skipped with a reason, never fatal. ``as_transcribe``: each row decoded
    as ``asr-lora transcribe`` decodes a file (:func:`evaluate_as_transcribe`; rows of any length)."""
    manifest = Path(manifest)
    rows, bad = read_rows(manifest, strict=False)
    if limit:
        rows = rows[:limit]
    skipped = [{"id": f"line {b.line}", "reason": f"{b.reason}: {b.detail}".rstrip(": ")} for b in bad]
    try:
        if as_transcribe:
            result = evaluate_as_transcribe(transcriber, rows, split=split, vad=vad, progress=progress)
        else:
            result = evaluate_rows(transcriber, rows, batch_size=batch_size, progress=progress)
    except NothingToEvaluate as e:
        raise NothingToEvaluate(f"{manifest}: {e}" if rows else f"{manifest}: no rows") from None
    result.skipped = skipped + result.skipped
    return result


def write_utterances(path: Path, result: EvalResult) -> None:
    from .atomic import atomic_file

    with atomic_file(path) as fh:
        for u in result.utterances():
            fh.write(json.dumps(u, ensure_ascii=False) + "\n")


def _md_cell(text: str, width: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def summary_markdown(result: EvalResult, meta: dict) -> str:
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


def write_eval_outputs(result: EvalResult, out: str | Path, meta: dict) -> Path:
    """``out/summary.json``, ``out/utterances.jsonl`` and ``out/summary.md``; returns ``out``."""
    from .atomic import write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", {**result.summary(), **meta})
    write_utterances(out / UTTERANCES_FILE, result)
    write_text_atomic(out / "summary.md", summary_markdown(result, meta))
    return out
