"""Background loading of training micro-batches: audio decoding and log-mel ahead of the loop.

A torch ``DataLoader`` with worker processes runs the collator over exactly the micro-batches the
loop will take (a :class:`~asr_lora.data.samplers.BatchPlan` from the trainer's position), in
order, ``PREFETCH`` batches per worker ahead, into pinned memory on a GPU. The loop still owns the
position (``TrainerState.epoch`` / ``batch_in_epoch``): each batch carries the row ``indices`` it was
made from, and the loop checks them against the plan, so a resumed run loads what an uninterrupted
one would. With ``num_workers=0`` the collator runs in the loop, one batch after the other.

Log-mel is computed where the batch is made: in a worker on the CPU (a forked worker must not touch
CUDA), in the loop on the collator's ``feature_device`` (the GPU when there is one).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Iterator, Sequence

import torch

from .manifest import ManifestRow

PREFETCH = 2  # batches each worker prepares ahead (torch's default prefetch_factor)
MAX_AUTO_WORKERS = 4  # per process on a GPU: enough to keep ahead of a step, few enough to leave cores


def resolve_num_workers(num_workers: int | None, device) -> int:
    """``train.num_workers``, or when it is None: on a GPU up to :data:`MAX_AUTO_WORKERS` per process,
    within the CPU cores of the node less one per process for the loop; on CPU none (the model's own
    threads use the cores; loading in the loop measured as fast there: BENCHMARKS.md)."""
    if num_workers is not None:
        return num_workers
    if torch.device(device).type != "cuda":
        return 0
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    return max(0, min(MAX_AUTO_WORKERS, (os.cpu_count() or 1) // per_node - 1))


def cpu_features(collator):
    """``collator`` computing log-mel on the CPU (a copy, when it computes it elsewhere): a forked
    worker process cannot use CUDA."""
    if getattr(collator, "feature_device", None) is None:
        return collator
    return dataclasses.replace(collator, feature_device=None)


def _keys(batch: list[int] | tuple[int, list[int]]) -> list[tuple[int | None, int]]:
    """A micro-batch as ``(epoch, row index)`` keys, from ``(epoch, [i, ...])`` or from ``[i, ...]``
    (epoch unknown: None)."""
    epoch, indices = batch if isinstance(batch, tuple) else (None, batch)
    return [(epoch, i) for i in indices]


class _Rows(torch.utils.data.Dataset):
    """Row ``i`` at key ``(epoch, i)`` as ``((epoch, i), row)``, so that a batch knows the rows it was
    made from, and where in training. With a :class:`~asr_lora.data.concat.Concatenation` the row is
    that epoch's input of row ``i``: itself, or joined with the rows after it."""

    def __init__(self, rows: Sequence[ManifestRow], concat=None):
        self.rows, self.concat = rows, concat

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int | None, int]) -> tuple[tuple[int | None, int], ManifestRow]:
        epoch, i = key
        if self.concat is not None and epoch is not None:
            return key, self.concat.row(epoch, i)
        return key, self.rows[i]


class _Collate:
    """The collator over ``((epoch, i), row)`` pairs; the batch gets ``indices`` (all rows asked for).
    With the epoch known, the collator gets the rows' positions (which seed waveform augmentation)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list[tuple[tuple[int | None, int], ManifestRow]]) -> dict:
        rows, keys = [row for _, row in items], [key for key, _ in items]
        batch = self.collator(rows, keys) if keys and keys[0][0] is not None else self.collator(rows)
        batch["indices"] = [i for (_, i), _ in items]
        return batch


class _Planned(torch.utils.data.Sampler):
    """A batch sampler over a fixed, lazily produced sequence of micro-batches."""

    def __init__(self, batches: Iterable[list[int] | tuple[int, list[int]]], n: int):
        self.batches, self.n = batches, n

    def __iter__(self) -> Iterator[list[tuple[int | None, int]]]:
        return (_keys(b) for b in self.batches)

    def __len__(self) -> int:
        return self.n


def micro_batches(rows: Sequence[ManifestRow], collator, batches: Iterable[list[int] | tuple[int, list[int]]],
                  n: int, num_workers: int = 0, pin_memory: bool = False, concat=None) -> Iterator[dict]:
    """The collated micro-batches ``batches`` (``n`` of them, lists of row indices, or ``(epoch,
    indices)`` pairs: then the collator gets each row's ``(epoch, index)``, the seed of its waveform
    augmentation, the same in the loop and in any worker), in order.

    ``num_workers > 0``: made in that many worker processes, ``PREFETCH`` each ahead of the loop,
    pinned when ``pin_memory`` (GPU), log-mel on the CPU (:func:`cpu_features`). The
    loader draws its worker seed from its own generator, never from the global RNG (whose state
    checkpoints save: dropout stays what it would be without background loading). ``concat``: a
    :class:`~asr_lora.data.concat.Concatenation` that joins rows into multi-utterance inputs.
    """
    dataset = _Rows(rows, concat)
    if num_workers == 0 or n == 0:  # in the loop (and no workers for a run with nothing left to do)
        collate = _Collate(collator)
        return (collate([dataset[key] for key in _keys(b)]) for b in batches)
    collate = _Collate(cpu_features(collator))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers; quiets the tokenizers warning
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_Planned(batches, n), collate_fn=collate, num_workers=num_workers,
        prefetch_factor=PREFETCH, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
    return iter(loader)


def next_batches(loader: Iterator[dict], expected: list[list[int]]) -> list[dict]:
    """The next ``len(expected)`` batches of ``loader``, checked to hold the rows ``expected`` (the
    trainer's plan) in that order."""
    batches = [next(loader) for _ in expected]
    if [b["indices"] for b in batches] != expected:
        raise RuntimeError(f"the training loader is out of step with the batch plan: got rows "
                           f"{[b['indices'] for b in batches]}, expected {expected}")
    return batches
