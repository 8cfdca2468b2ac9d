"""Whisper's timestamp tokens and ``<|startofprev|>`` prompts, for training labels and decoding (pure functions).

**Timestamps.** Whisper's vocabulary holds 1501 timestamp tokens ``<|0.00|>`` ... ``<|30.00|>`` on a
0.02 s grid, the first one right after ``<|notimestamps|>`` (openai/whisper ``tokenizer.timestamp_begin``).
A timestamped decoding is ``<|startoftranscript|> <|ko|> <|transcribe|> <|0.00|> text <|2.40|> ...
<|endoftext|>`` (no ``<|notimestamps|>``); segments start and end on timestamp tokens
(:func:`timestamp_segments` reads them the way openai/whisper's ``transcribe`` does).

**Prompts.** Previous text goes before ``<|startoftranscript|>`` as ``<|startofprev|>`` followed by
the tokens of ``" " + text`` (openai/whisper ``transcribe.py``, transformers ``get_prompt_ids``),
cut from the left to at most :data:`MAX_PROMPT_TOKENS` (``n_text_ctx // 2 - 1``). There is no loss
on a prompt in training (distil-whisper), and the no-speech probability is read at the
``<|startoftranscript|>`` position after it.

**Per-utterance draws in training** (:func:`draw`) come from ``random.Random`` seeded with a string of
(seed, epoch, row index, what): never the global RNG, so a run resumed from a checkpoint, with or
without background loader workers, draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

import random

TIME_PRECISION = 0.02  # seconds per timestamp token
MAX_TIMESTAMP = 30.0  # <|30.00|>, the last one
MAX_PROMPT_TOKENS = 223  # openai/whisper: n_text_ctx // 2 - 1 (the <|startofprev|> not counted)
PREV_TOKEN = "<|startofprev|>"
SOT_TOKEN = "<|startoftranscript|>"


def _vocab(tokenizer) -> dict[str, int]:
    from .nospeech import _vocab as vocab

    return vocab(tokenizer)


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, for a transformers tokenizer or a ``tokenizers.Tokenizer``."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(ids, "ids", ids))


def timestamp_begin(tokenizer) -> int:
    """Id of ``<|0.00|>``: the token after ``<|notimestamps|>``."""
    return _vocab(tokenizer)["<|notimestamps|>"] + 1


def timestamp_id(tokenizer, seconds: float) -> int:
    """Id of the timestamp token nearest ``seconds`` (clamped to 0..30 s)."""
    return timestamp_begin(tokenizer) + round(min(max(seconds, 0.0), MAX_TIMESTAMP) / TIME_PRECISION)


def prompt_ids(tokenizer, text: str | None, max_tokens: int = MAX_PROMPT_TOKENS) -> list[int]:
    """``<|startofprev|>`` and the last ``max_tokens`` tokens of ``" " + text``; ``[]`` for no text or no room."""
    if not text or not text.strip() or max_tokens <= 0:
        return []
    ids = _encode(tokenizer, " " + text.strip())[-min(max_tokens, MAX_PROMPT_TOKENS):]
    return [_vocab(tokenizer)[PREV_TOKEN], *ids]


def draw(seed: int, epoch: int, index: int, what: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, epoch, row index, what); independent of any global RNG."""
    return random.Random(f"{what}:{seed}:{epoch}:{index}").random()


def timestamp_segments(ids: list[int], begin: int, duration: float, eot: int | None = None
                       ) -> list[tuple[float, float, list[int]]]:
    """``(start, end, text ids)`` segments of a timestamped decoding (ids after the prompt), as
    openai/whisper reads them: a timestamp opens a segment, the next one closes it; text after a
    closing timestamp opens one there; a segment left open ends at ``duration``. Times are clamped
    into ``0..duration`` and made monotonic; segments without text are left out."""
    segments, start, text, last = [], None, [], 0.0
    for t in ids:
        if eot is not None and t == eot:
            break
        if t >= begin:
            time = min((t - begin) * TIME_PRECISION, duration)
            if start is None:
                start = time
            else:
                if text:
                    segments.append((start, time, text))
                start, text = None, []
            last = time
        else:
            if start is None:
                start = last
            text.append(t)
    if start is not None and text:
        segments.append((start, duration, text))
    out, previous_end = [], 0.0
    for a, b, t in segments:
        a = max(a, previous_end)
        b = max(b, a)
        out.append((round(a, 3), round(b, 3), t))
        previous_end = b
    return out
