"""Corpus preparation, manifests, collation."""

from __future__ import annotations

from typing import Iterable, Iterator


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last may be shorter), streaming (``itertools.batched`` is 3.12+)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
