"""Which training rows go together in a micro-batch, and in which order.

Two ways to fill a micro-batch, both deterministic in (seed, epoch), so that a resumed run sees
exactly the batches an uninterrupted run would:

* a fixed number of clips (``train.batch_size``): :func:`length_grouped_batches`;
* a duration budget (``train.batch_seconds``): :func:`duration_batches`, max-duration dynamic
  bucketing as in lhotse/icefall: rows sorted into length buckets, each micro-batch filled up to
  the budget from one bucket, so short clips come many to a batch and long ones few, and every
  batch costs about the same time and memory.

A :class:`BatchPlan` holds an epoch's micro-batches; a position in training is ``(epoch, index)``
into it (the trainer's ``TrainerState.epoch`` / ``batch_in_epoch``). Each optimizer step takes the
next ``grad_accum x world size`` micro-batches of the one global list and process ``r`` gets those
at ``r::world``, so every process runs the same number of steps with batches of similar cost.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Sequence

from .manifest import ManifestRow, length_hint

FULL_CONTEXT_SECONDS = 30.0  # what a clip costs the encoder in the 30 s (full) audio context
N_BUCKETS = 30  # length buckets of duration_batches (icefall's --num-buckets default for lhotse's sampler)
MIN_CLIP_SECONDS = 1.0  # a clip costs at least this much (labels and per-clip work do not shrink with it)


def _rng(seed: int, epoch: int) -> random.Random:
    return random.Random(seed * 1_000_003 + epoch)


def length_grouped_batches(durations: list[float], batch_size: int, seed: int, epoch: int,
                           group: int = 50) -> list[list[int]]:
    """Shuffle, then sort by duration inside windows of ``group`` batches, then shuffle the batches.

    Similar lengths share a batch (little padding) while the order stays random. Deterministic
    in (seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would.
    """
    rng = _rng(seed, epoch)
    order = list(range(len(durations)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: durations[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def duration_batches(durations: list[float], max_seconds: float, seed: int, epoch: int,
                     floor_seconds: float = 0.0, n_buckets: int = N_BUCKETS) -> list[list[int]]:
    """Micro-batches of at most ``max_seconds`` of padded audio each, from length buckets.

    The cost of a batch is what the encoder sees: its clip count times its longest clip
    (:func:`padded_seconds`), each clip counted as at least ``floor_seconds`` (30 in the full audio
    context, where every clip is padded to 30 s). Rows are sorted by duration into ``n_buckets``
    buckets of equal row count; each bucket is shuffled and cut into batches greedily up to the
    budget, and the rows that do not fill a last batch move on to the next (longer) bucket. A clip
    longer than the budget forms a batch alone. The batches are then shuffled. Deterministic in
    (seed, epoch); every row appears exactly once.
    """
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    rng = _rng(seed, epoch)
    cost = [clip_cost(d, floor_seconds) for d in durations]
    by_length = sorted(range(len(durations)), key=lambda i: (cost[i], i))
    size = max(1, -(-len(by_length) // max(1, n_buckets)))
    batches: list[list[int]] = []
    carry: list[int] = []
    for start in range(0, len(by_length), size):
        bucket = by_length[start:start + size]
        rng.shuffle(bucket)
        batch, longest = carry, max((cost[i] for i in carry), default=0.0)
        for i in bucket:
            wider = max(longest, cost[i])
            if batch and wider * (len(batch) + 1) > max_seconds:
                batches.append(batch)
                batch, wider = [], cost[i]
            batch.append(i)
            longest = wider
        carry = batch
    if carry:
        batches.append(carry)
    rng.shuffle(batches)
    return batches


def clip_cost(duration: float | None, floor_seconds: float = 0.0) -> float:
    """Seconds a clip counts for in a batch budget: its duration, at least ``floor_seconds`` and
    :data:`MIN_CLIP_SECONDS`."""
    return max(float(duration or 0.0), floor_seconds, MIN_CLIP_SECONDS)


def padded_seconds(batch: list[int], durations: list[float], floor_seconds: float = 0.0) -> float:
    """Clip count x longest clip (:func:`clip_cost`): what ``batch`` costs against ``batch_seconds``."""
    return len(batch) * max(clip_cost(durations[i], floor_seconds) for i in batch)


class BatchPlan:
    """The micro-batches of every epoch, built on demand and deterministic in (seed, epoch).

    ``batch_seconds`` set: :func:`duration_batches` (``batch_size`` unused); else
    :func:`length_grouped_batches` of ``batch_size`` clips.
    """

    def __init__(self, durations: list[float], seed: int, batch_size: int = 8, batch_seconds: float | None = None,
                 floor_seconds: float = 0.0, epoch_durations: Callable[[int], list[float]] | None = None):
        if not durations:
            raise ValueError("no rows to batch")
        self.durations = list(durations)
        self.epoch_durations = epoch_durations  # inputs whose length changes per epoch (joined rows)
        self.seed = seed
        self.batch_size = batch_size
        self.batch_seconds = batch_seconds
        self.floor_seconds = floor_seconds
        self._cache: dict[int, list[list[int]]] = {}

    @classmethod
    def for_rows(cls, rows: Sequence[ManifestRow], train, audio_context: str = "trimmed", concat=None) -> BatchPlan:
        """The plan of ``train`` (a ``TrainConfig``: seed, batch_size, batch_seconds) over ``rows``,
        their lengths from :func:`~asr_lora.data.manifest.length_hint` (with ``concat``, a
        :class:`~asr_lora.data.concat.Concatenation`, each epoch's joined lengths); in the ``full``
        audio context a clip costs 30 s of a ``batch_seconds`` budget."""
        return cls([length_hint(r) for r in rows], train.seed, train.batch_size, train.batch_seconds,
                   FULL_CONTEXT_SECONDS if audio_context == "full" else 0.0,
                   concat.epoch_durations if concat is not None else None)

    def __str__(self) -> str:
        if self.batch_seconds is None:
            return f"micro-batches of {self.batch_size} clips"
        return f"micro-batches of up to {self.batch_seconds:g} s of padded audio"

    def epoch(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s micro-batches (row indices). The last two epochs asked for are kept: the
        loader runs ahead of the loop and may already be in the next epoch."""
        if epoch not in self._cache:
            durations = self.epoch_durations(epoch) if self.epoch_durations is not None else self.durations
            if self.batch_seconds is not None:
                batches = duration_batches(durations, self.batch_seconds, self.seed, epoch, self.floor_seconds)
            else:
                batches = length_grouped_batches(durations, self.batch_size, self.seed, epoch)
            self._cache = {e: b for e, b in self._cache.items() if e == epoch - 1}
            self._cache[epoch] = batches
        return self._cache[epoch]

    def take(self, epoch: int, index: int, n: int) -> tuple[list[list[int]], int, int]:
        """The ``n`` micro-batches from position ``(epoch, index)`` on, crossing epochs, and the
        position after them."""
        out, epoch, index = self.take_with_epochs(epoch, index, n)
        return [batch for _, batch in out], epoch, index

    def take_with_epochs(self, epoch: int, index: int, n: int) -> tuple[list[tuple[int, list[int]]], int, int]:
        """:meth:`take` with each micro-batch's epoch: ``[(epoch, batch), ...]`` and the position after."""
        out: list[tuple[int, list[int]]] = []
        while len(out) < n:
            batches = self.epoch(epoch)
            chunk = batches[index:index + n - len(out)]
            out.extend((epoch, batch) for batch in chunk)
            index += len(chunk)
            if index >= len(batches):
                epoch, index = epoch + 1, 0
        return out, epoch, index

    def rank_batches(self, epoch: int, index: int, per_step: int, steps: int, rank: int = 0,
                     world: int = 1) -> Iterator[list[int]]:
        """Process ``rank``'s micro-batches for the next ``steps`` optimizer steps from ``(epoch,
        index)``, in the order the loop takes them: each step is the next ``per_step`` (grad_accum x
        world) micro-batches of the global order, of which ``rank`` gets those at ``rank::world``."""
        return (batch for _, batch in self.rank_epoch_batches(epoch, index, per_step, steps, rank, world))

    def rank_epoch_batches(self, epoch: int, index: int, per_step: int, steps: int, rank: int = 0,
                           world: int = 1) -> Iterator[tuple[int, list[int]]]:
        """:meth:`rank_batches` as ``(epoch, batch)`` pairs: the epoch seeds waveform augmentation."""
        for _ in range(steps):
            batches, epoch, index = self.take_with_epochs(epoch, index, per_step)
            yield from batches[rank::world]
