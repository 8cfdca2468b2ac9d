"""Multi-utterance training inputs: consecutive rows heard as one input, as Whisper itself was trained.

A model trained only on single sentences learns to end after one sentence, and transcription then
loses every sentence after the first of a longer piece. Whisper was trained on 30 s windows holding
several timestamped segments, distil-whisper on consecutive segments packed to 30 s. Here a training
row, drawn with ``data.concat_probability`` (per row and epoch, :func:`asr_lora.prompting.draw`), is
joined with the rows after it into one input of at most ``data.concat_max_seconds``:

- **which rows:** the next rows of the same ``session`` (a manifest field; ``prepare kspon`` writes the
  recording folder) in manifest order; rows without a session are joined with their neighbours in an
  order shuffled per (seed, epoch). Intended non-speech rows are never joined.
- **how long:** a target length drawn uniformly up to the maximum; rows are added while the input stays
  within the target, and at least one when it fits the maximum (a drawn row is joined whenever it can be).
- **between them:** a pause of silence drawn from ``data.concat_pause`` seconds.
- **label:** the texts joined by a space; with a timestamp draw one ``<|start|> text <|end|>`` pair per
  utterance at its place in the input, Whisper's own multi-segment format (the collator).

Every draw is fixed by (seed, epoch, row index): a resumed run, background workers and every DDP
process build the same inputs, and the batch plan costs each input at its joined length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..audio import SAMPLE_RATE
from ..prompting import draw
from .manifest import ManifestRow, length_hint, load_row_audio

SESSION_KEY = "session"  # the manifest field that names a row's recording session


@dataclass(frozen=True)
class JoinedRow:
    """Rows heard one after the other as one input: each part's audio, then ``pauses[k]`` seconds of
    silence after part ``k`` (one pause fewer than parts)."""

    parts: tuple[ManifestRow, ...]
    pauses: tuple[float, ...]

    @property
    def id(self) -> str:
        return "+".join(str(p.id) for p in self.parts)

    @property
    def text(self) -> str:
        return " ".join(self.texts)

    @property
    def texts(self) -> list[str]:
        return [p.text.strip() for p in self.parts]

    @property
    def nonspeech(self) -> bool:
        return False

    @property
    def prompt(self) -> str | None:
        return self.parts[0].prompt

    @property
    def extra(self) -> dict:
        return self.parts[0].extra

    @property
    def audio(self) -> str:
        """The first part's file (where a report links the input)."""
        return self.parts[0].audio

    offset = None  # a joined input is no segment of one file
    end = None

    @property
    def duration(self) -> float:
        """Seconds of the joined input, from the parts' lengths (:func:`length_hint`) and the pauses."""
        return sum(length_hint(p) for p in self.parts) + sum(self.pauses)


def load_input(row: ManifestRow | JoinedRow, max_seconds: float | None = None) -> np.ndarray:
    """The waveform of a row or a joined input (16 kHz float32); an ``AudioError`` naming the file."""
    if isinstance(row, JoinedRow):
        audio = join_audio(row, max_seconds)[0]
        if max_seconds is not None and len(audio) > max_seconds * SAMPLE_RATE:
            from ..audio import AudioError

            raise AudioError(row.audio, f"joined input longer than {max_seconds:g} s ({len(audio) / SAMPLE_RATE:.1f} s)")
        return audio
    return load_row_audio(row, max_seconds=max_seconds)


def joined(rows: Sequence[ManifestRow], pause: float) -> JoinedRow:
    """``rows`` heard one after the other with ``pause`` seconds of silence between them."""
    return JoinedRow(tuple(rows), (pause,) * (len(rows) - 1))


def group_rows(rows: Sequence[ManifestRow], min_seconds: float, max_seconds: float, pause: float) -> list[list[ManifestRow]]:
    """``rows`` in order, cut into consecutive groups of ``min_seconds`` to ``max_seconds`` when joined with
    ``pause`` between them (a group closes once it reaches ``min_seconds``; the rows left at the end join
    the last group when they fit, else form a shorter group of their own)."""
    groups: list[list[ManifestRow]] = []
    current, seconds = [], 0.0
    for row in rows:
        length = length_hint(row)
        longer = seconds + (pause if current else 0.0) + length
        if current and longer > max_seconds:
            groups.append(current)
            current, longer = [], length
        current.append(row)
        seconds = longer
        if seconds >= min_seconds:
            groups.append(current)
            current, seconds = [], 0.0
    if current:
        tail = sum(length_hint(r) + pause for r in current)
        if groups and sum(length_hint(r) + pause for r in groups[-1]) + tail <= max_seconds:
            groups[-1] += current
        else:
            groups.append(current)
    return groups


def join_audio(row: JoinedRow, max_seconds: float | None = None) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The joined waveform (16 kHz float32) and each part's ``(start, end)`` in it, in seconds. A part that
    cannot be read raises its ``AudioError`` (naming that part's file)."""
    pieces, spans, position = [], [], 0
    for k, part in enumerate(row.parts):
        audio = load_row_audio(part, max_seconds=max_seconds)
        spans.append((position / SAMPLE_RATE, (position + len(audio)) / SAMPLE_RATE))
        pieces.append(audio)
        position += len(audio)
        if k < len(row.pauses):
            gap = int(round(row.pauses[k] * SAMPLE_RATE))
            pieces.append(np.zeros(gap, dtype=np.float32))
            position += gap
    return np.concatenate(pieces).astype(np.float32, copy=False), spans


class Concatenation:
    """Which rows make the input at each (epoch, row index): see the module docstring."""

    def __init__(self, rows: Sequence[ManifestRow], probability: float, max_seconds: float,
                 pause: tuple[float, float] = (0.2, 1.0), seed: int = 0):
        self.rows, self.probability, self.max_seconds = rows, probability, max_seconds
        self.pause, self.seed = (float(pause[0]), float(pause[1])), seed
        self.durations = [length_hint(r) for r in rows]
        self.eligible = [not r.nonspeech for r in rows]
        self.in_session: set[int] = set()
        self.next_in_session: dict[int, int] = {}
        last: dict[str, int] = {}
        for i, r in enumerate(rows):
            session = r.extra.get(SESSION_KEY)
            if session is None:
                continue
            self.in_session.add(i)
            if self.eligible[i]:
                if str(session) in last:
                    self.next_in_session[last[str(session)]] = i
                last[str(session)] = i
        self._orders: dict[int, tuple[list[int], dict[int, int]]] = {}
        self._epoch_parts: dict[int, list[tuple[list[int], list[float]]]] = {}

    def _shuffled(self, epoch: int) -> tuple[list[int], dict[int, int]]:
        """The epoch's order of the rows joined with neighbours (speech rows without a session)."""
        if epoch not in self._orders:
            order = [i for i in range(len(self.rows)) if self.eligible[i] and i not in self.in_session]
            random.Random(f"concat-order:{self.seed}:{epoch}").shuffle(order)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = (order, {i: k for k, i in enumerate(order)})
        return self._orders[epoch]

    def _candidates(self, epoch: int, i: int):
        """The rows that may follow row ``i``, in the order they would be joined."""
        if i in self.in_session:
            j = self.next_in_session.get(i)
            while j is not None:
                yield j
                j = self.next_in_session.get(j)
            return
        order, position = self._shuffled(epoch)
        for k in range(1, len(order)):
            yield order[(position[i] + k) % len(order)]

    def parts(self, epoch: int, i: int) -> tuple[list[int], list[float]]:
        """Row indices joined into the input of row ``i`` at ``epoch`` (``[i]`` when not joined) and the
        pauses between them."""
        if self.probability <= 0 or not self.eligible[i] or draw(self.seed, epoch, i, "concat") >= self.probability:
            return [i], []
        target = draw(self.seed, epoch, i, "concat_seconds") * self.max_seconds
        lo, hi = self.pause
        indices, pauses, total = [i], [], self.durations[i]
        for j in self._candidates(epoch, i):
            pause = lo + (hi - lo) * draw(self.seed, epoch, i, f"concat_pause{len(pauses)}")
            longer = total + pause + self.durations[j]
            if longer > self.max_seconds or (len(indices) > 1 and longer > target):
                break
            indices.append(j)
            pauses.append(round(pause, 3))
            total = longer
        return indices, pauses

    def row(self, epoch: int, i: int) -> ManifestRow | JoinedRow:
        """The input of row ``i`` at ``epoch``: the row itself, or a :class:`JoinedRow`."""
        indices, pauses = self.parts(epoch, i)
        if len(indices) == 1:
            return self.rows[i]
        return JoinedRow(tuple(self.rows[j] for j in indices), tuple(pauses))

    def epoch_parts(self, epoch: int) -> list[tuple[list[int], list[float]]]:
        """:meth:`parts` of every row at ``epoch`` (the last two epochs asked for are kept)."""
        if epoch not in self._epoch_parts:
            self._epoch_parts = {e: p for e, p in self._epoch_parts.items() if e == epoch - 1}
            self._epoch_parts[epoch] = [self.parts(epoch, i) for i in range(len(self.rows))]
        return self._epoch_parts[epoch]

    def epoch_durations(self, epoch: int) -> list[float]:
        """Seconds of every row's input at ``epoch`` (for the batch plan's costs)."""
        return [sum(self.durations[j] for j in indices) + sum(pauses) for indices, pauses in self.epoch_parts(epoch)]


def concatenation(rows: Sequence[ManifestRow], data, seed: int) -> Concatenation | None:
    """The recipe's concatenation (``DataConfig``: concat_probability, concat_max_seconds, concat_pause),
    or None when it is off."""
    if data.concat_probability <= 0:
        return None
    return Concatenation(rows, data.concat_probability, data.concat_max_seconds, tuple(data.concat_pause), seed)


def trained_on(rows: Sequence[ManifestRow], concat: Concatenation | None):
    """The :class:`~asr_lora.settings.TrainedOn` record of training on ``rows`` (speech rows only): the
    shortest and longest input (``data.concat_max_seconds`` when inputs are joined), the speaking rate
    in non-space characters per second of input (median, 5th percentile), and the most utterances an
    input held (1 without joining; with it, the most of epoch 0)."""
    from ..settings import TrainedOn

    speech = [r for r in rows if not r.nonspeech]
    seconds = [length_hint(r) for r in speech]
    if not speech or max(seconds) <= 0:
        return None
    rates = [len("".join(r.text.split())) / s for r, s in zip(speech, seconds) if s > 0]
    longest = max(max(seconds), concat.max_seconds if concat is not None else 0.0)
    most = 1 if concat is None else max(len(indices) for indices, _ in concat.epoch_parts(0))
    return TrainedOn(min(seconds), longest, float(np.median(rates)), float(np.percentile(rates, 5)), most)
