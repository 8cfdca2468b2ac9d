"""Scoring for Korean ASR: CER (with and without spaces), WER and space-normalised WER (sWER).

Every text goes through ``asr_lora.text.normalize`` (NFKC, never NFKD) before scoring, and edit
distances come from jiwer. Rates are corpus-level: total edits / total reference units, never a
mean of per-utterance rates.

Empty references (empty after normalisation) are kept: they add nothing to the denominators and
every hypothesis unit counts as an insertion. A rate whose denominator is 0 is 0.0 when there are
no errors and ``inf`` otherwise (never NaN, so "lower is better" comparisons keep working).

sWER follows ESPnet1's KsponSpeech scoring (``egs/ksponspeech/asr1/local/
get_space_normalized_hyps.py``, Bang et al. 2020): the hypothesis is re-spaced to follow the
reference before WER is computed, so inconsistent Korean spacing is not counted as word errors.
See ``respace_hypothesis`` for the rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jiwer

from asr_lora.text import normalize

__all__ = ["EditCounts", "Report", "score", "respace_hypothesis", "repeated_ngram_loop"]


@dataclass
class EditCounts:
    """Reference/hypothesis lengths and edit operations for one unit (chars or words)."""

    ref: int = 0
    hyp: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        return _rate(self.errors, self.ref)

    def __add__(self, other: EditCounts) -> EditCounts:
        return EditCounts(
            self.ref + other.ref,
            self.hyp + other.hyp,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )


@dataclass
class Report:
    """Corpus-level scores, their counts, and per-utterance details."""

    n: int
    chars: EditCounts
    chars_nospace: EditCounts
    words: EditCounts
    swords: EditCounts  # words after re-spacing the hypothesis (sWER)
    n_empty_ref: int
    utterances: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cer(self) -> float:
        return self.chars.rate

    @property
    def cer_nospace(self) -> float:
        return self.chars_nospace.rate

    @property
    def wer(self) -> float:
        return self.words.rate

    @property
    def swer(self) -> float:
        return self.swords.rate

    @property
    def insertion_rate(self) -> float:
        """Character insertions / reference characters: high values flag hallucination."""
        return _rate(self.chars.insertions, self.chars.ref)

    @property
    def deletion_rate(self) -> float:
        """Character deletions / reference characters: high values flag lost speech."""
        return _rate(self.chars.deletions, self.chars.ref)

    @property
    def length_ratio(self) -> float:
        """Hypothesis characters / reference characters (spaces included); 1.0 if both are 0."""
        if self.chars.ref == 0 and self.chars.hyp == 0:
            return 1.0
        return _rate(self.chars.hyp, self.chars.ref)

    def summary(self) -> dict[str, float | int]:
        """Flat dict of rates and counts (no per-utterance details), for logs and JSON."""
        out: dict[str, float | int] = {
            "n": self.n,
            "cer": self.cer,
            "cer_nospace": self.cer_nospace,
            "wer": self.wer,
            "swer": self.swer,
            "insertion_rate": self.insertion_rate,
            "deletion_rate": self.deletion_rate,
            "length_ratio": self.length_ratio,
            "n_empty_ref": self.n_empty_ref,
        }
        for prefix, counts in (
            ("char", self.chars),
            ("char_nospace", self.chars_nospace),
            ("word", self.words),
            ("sword", self.swords),
        ):
            out[f"{prefix}_ref"] = counts.ref
            out[f"{prefix}_hyp"] = counts.hyp
            out[f"{prefix}_substitutions"] = counts.substitutions
            out[f"{prefix}_deletions"] = counts.deletions
            out[f"{prefix}_insertions"] = counts.insertions
        return out


def score(
    refs: Sequence[str], hyps: Sequence[str], ids: Sequence[str] | None = None
) -> Report:
    """Score hypotheses against references after ``normalize()``; see the module docstring."""
    if isinstance(refs, str) or isinstance(hyps, str):
        raise TypeError("refs and hyps must be sequences of strings, not a single string")
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses")
    if ids is None:
        ids = [str(i) for i in range(len(refs))]
    elif len(ids) != len(refs):
        raise ValueError(f"got {len(ids)} ids for {len(refs)} utterances")
    if len(refs) == 0:
        raise ValueError("score() needs at least one utterance")

    ref_norm = [normalize(r) for r in refs]
    hyp_norm = [normalize(h) for h in hyps]
    ref_ns = [r.replace(" ", "") for r in ref_norm]
    hyp_ns = [h.replace(" ", "") for h in hyp_norm]

    chars = _align(ref_norm, hyp_norm, by="char")
    chars_ns = _align(ref_ns, hyp_ns, by="char")
    words = _align(ref_norm, hyp_norm, by="word")
    respaced = [
        respace_hypothesis(r, h, chunks)
        for r, h, (_, chunks) in zip(ref_norm, hyp_norm, chars_ns)
    ]
    swords = _align(ref_norm, respaced, by="word")

    utterances = []
    for i, utt_id in enumerate(ids):
        c, c_ns, w, sw = chars[i][0], chars_ns[i][0], words[i][0], swords[i][0]
        utterances.append(
            {
                "id": utt_id,
                "ref": ref_norm[i],
                "hyp": hyp_norm[i],
                "ref_raw": refs[i],
                "hyp_raw": hyps[i],
                "hyp_respaced": respaced[i],
                "cer": c.rate,
                "cer_nospace": c_ns.rate,
                "wer": w.rate,
                "swer": sw.rate,
                "char_errors": c.errors,
                "ref_chars": c.ref,
                "char_errors_nospace": c_ns.errors,
                "ref_chars_nospace": c_ns.ref,
                "word_errors": w.errors,
                "ref_words": w.ref,
                "sword_errors": sw.errors,
            }
        )

    return Report(
        n=len(refs),
        chars=_total(chars),
        chars_nospace=_total(chars_ns),
        words=_total(words),
        swords=_total(swords),
        n_empty_ref=sum(1 for r in ref_norm if not r),
        utterances=utterances,
    )


def respace_hypothesis(ref: str, hyp: str, chunks: Sequence[Any] | None = None) -> str:
    """Re-space ``hyp`` to follow ``ref``'s word boundaries (the ESPnet1 KsponSpeech rule).

    Both strings (already normalised) are aligned character by character with spaces removed.
    Each hypothesis character then decides whether a word boundary precedes it:
      * matched (equal) to a reference character -> copies the reference's boundary;
      * substituted or inserted -> keeps its own boundary from the hypothesis;
    and deleted reference characters emit nothing. Only spaces change: the hypothesis characters
    are kept as they are. ``chunks`` are jiwer alignment chunks of the space-free strings (computed
    here when not given). Where several alignments are equally cheap, jiwer (rapidfuzz) picks one,
    which may differ from ESPnet's Kaldi-style tie-breaking in rare cases.
    """
    ref_chars, ref_starts = _chars_with_word_starts(ref)
    hyp_chars, hyp_starts = _chars_with_word_starts(hyp)
    if not ref_chars or not hyp_chars:
        return hyp
    if chunks is None:
        chunks = jiwer.process_characters("".join(ref_chars), "".join(hyp_chars)).alignments[0]

    out: list[str] = []
    for chunk in chunks:
        for j in range(chunk.hyp_start_idx, chunk.hyp_end_idx):
            if chunk.type == "equal":
                starts_word = ref_starts[chunk.ref_start_idx + j - chunk.hyp_start_idx]
            else:
                starts_word = hyp_starts[j]
            if starts_word and out:
                out.append(" ")
            out.append(hyp_chars[j])
    return "".join(out)


def repeated_ngram_loop(
    text: str, n: int = 4, min_repeats: int = 4, unit: str = "word"
) -> bool:
    """True if some n-gram of 1..``n`` units repeats ``min_repeats`` times back to back.

    A cheap hallucination indicator (Whisper's decoding loops). ``unit="word"`` works on
    whitespace tokens; ``unit="char"`` on characters with spaces removed, which catches loops
    written without spaces (``"감사합니다감사합니다..."``). The text is normalised first, so
    punctuation between repeats does not hide a loop.
    """
    if n < 1 or min_repeats < 2:
        raise ValueError("need n >= 1 and min_repeats >= 2")
    if unit == "word":
        tokens: list[str] = normalize(text).split()
    elif unit == "char":
        tokens = list(normalize(text).replace(" ", ""))
    else:
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")

    for size in range(1, n + 1):
        span = size * min_repeats
        for start in range(len(tokens) - span + 1):
            gram = tokens[start : start + size]
            if all(
                tokens[start + k * size : start + (k + 1) * size] == gram
                for k in range(1, min_repeats)
            ):
                return True
    return False


def _rate(errors: int, ref: int) -> float:
    if ref == 0:
        return 0.0 if errors == 0 else math.inf
    return errors / ref


def _total(aligned: list[tuple[EditCounts, list[Any]]]) -> EditCounts:
    total = EditCounts()
    for counts, _ in aligned:
        total = total + counts
    return total


def _chars_with_word_starts(text: str) -> tuple[list[str], list[bool]]:
    """Characters of ``text`` without spaces, and whether a space preceded each one."""
    chars, starts = [], []
    after_space = False
    for ch in text:
        if ch == " ":
            after_space = True
            continue
        chars.append(ch)
        starts.append(after_space)
        after_space = False
    return chars, starts


def _units(text: str, by: str) -> list[str]:
    return text.split() if by == "word" else list(text)


def _align(refs: list[str], hyps: list[str], by: str) -> list[tuple[EditCounts, list[Any]]]:
    """Per-pair edit counts and jiwer alignment chunks, at ``by`` = "char" or "word" level.

    jiwer is called once for all pairs where both sides are non-empty; pairs with an empty side
    are counted here (some jiwer versions reject empty references).
    """
    out: list[tuple[EditCounts, list[Any]]] = []
    todo = []
    for i, (r, h) in enumerate(zip(refs, hyps)):
        n_ref, n_hyp = len(_units(r, by)), len(_units(h, by))
        if n_ref and n_hyp:
            todo.append(i)
            out.append((EditCounts(n_ref, n_hyp), []))
        else:
            out.append((EditCounts(n_ref, n_hyp, deletions=n_ref, insertions=n_hyp), []))
    if not todo:
        return out

    process = jiwer.process_words if by == "word" else jiwer.process_characters
    result = process([refs[i] for i in todo], [hyps[i] for i in todo])
    for i, chunks in zip(todo, result.alignments):
        counts = out[i][0]
        for chunk in chunks:
            n_ref = chunk.ref_end_idx - chunk.ref_start_idx
            n_hyp = chunk.hyp_end_idx - chunk.hyp_start_idx
            if chunk.type == "substitute":
                counts.substitutions += min(n_ref, n_hyp)
                counts.deletions += max(n_ref - n_hyp, 0)
                counts.insertions += max(n_hyp - n_ref, 0)
            elif chunk.type == "delete":
                counts.deletions += n_ref
            elif chunk.type == "insert":
                counts.insertions += n_hyp
        out[i] = (counts, list(chunks))
    return out
