"""Micro-batch plans (fixed size and duration budget) and the background loader over them."""

from __future__ import annotations

import json
import random
import statistics

import pytest
import torch

from asr_lora.data.loader import cpu_features, micro_batches, next_batches, resolve_num_workers
from asr_lora.data.samplers import (
    FULL_CONTEXT_SECONDS,
    BatchPlan,
    duration_batches,
    length_grouped_batches,
    padded_seconds,
)

from .conftest import DEMO, make_row


def kspon_like(n: int = 2000, seed: int = 0) -> list[float]:
    """Durations like KsponSpeech's: log-normal around 4.5 s, 1 to 20 s (mean about 5.5 s)."""
    rng = random.Random(seed)
    return [round(min(20.0, max(1.0, rng.lognormvariate(1.5, 0.55))), 3) for _ in range(n)]


def test_duration_batches_deterministic_complete_and_within_budget():
    durations = kspon_like()
    a = duration_batches(durations, 60.0, seed=1, epoch=0)
    assert a == duration_batches(durations, 60.0, seed=1, epoch=0)
    assert a != duration_batches(durations, 60.0, seed=1, epoch=1)
    assert a != duration_batches(durations, 60.0, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(len(durations)))
    assert all(padded_seconds(b, durations) <= 60.0 for b in a)
    # short clips come many to a batch, long ones few
    sizes = {round(max(durations[i] for i in b)): len(b) for b in a}
    assert max(sizes.values()) >= 20 and min(sizes.values()) <= 4


def test_duration_batches_have_similar_cost_fixed_batches_do_not():
    """The point of a duration budget: every micro-batch costs about the same (padded seconds), where
    fixed batches of 8 swing with clip length."""
    durations = kspon_like()
    by_budget = [padded_seconds(b, durations) for b in duration_batches(durations, 80.0, seed=0, epoch=0)]
    fixed = [padded_seconds(b, durations) for b in length_grouped_batches(durations, 8, seed=0, epoch=0)]
    assert sum(c >= 0.8 * 80.0 for c in by_budget) >= 0.95 * len(by_budget)  # nearly all nearly full
    assert sum(c < 0.8 * 80.0 for c in by_budget) <= 30  # under-full: at most about one per bucket
    spread = lambda costs: statistics.pstdev(costs) / statistics.mean(costs)  # noqa: E731
    assert spread(by_budget) < 0.1 < 0.4 < spread(fixed)
    # padding stays small: the audio is most of the padded seconds
    audio = sum(durations)
    assert audio / sum(by_budget) > 0.9


def test_full_context_counts_every_clip_as_30_seconds():
    durations = kspon_like(203)
    batches = duration_batches(durations, 240.0, seed=0, epoch=0, floor_seconds=FULL_CONTEXT_SECONDS)
    assert sorted(len(b) for b in batches) == [3] + [8] * 25


def test_a_clip_longer_than_the_budget_is_a_batch_alone():
    durations = [2.0] * 20 + [25.0]
    batches = duration_batches(durations, 10.0, seed=0, epoch=0)
    assert [20] in batches
    assert all(len(b) <= 5 for b in batches)


def test_plan_take_crosses_epochs_and_ranks_get_equal_shares():
    durations = kspon_like(101)
    plan = BatchPlan(durations, seed=3, batch_seconds=50.0)
    e0, e1 = plan.epoch(0), plan.epoch(1)
    got, epoch, index = plan.take(0, len(e0) - 2, 5)
    assert got == e0[-2:] + e1[:3] and (epoch, index) == (1, 3)
    # 2 processes, accumulation 3: each step is the next 6 global micro-batches, 3 per process
    per_step, steps = 6, 7
    ranks = [list(plan.rank_batches(0, 0, per_step, steps, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3 * steps
    flat, _, _ = plan.take(0, 0, per_step * steps)
    for s in range(steps):
        step = flat[s * per_step:(s + 1) * per_step]
        assert ranks[0][s * 3:(s + 1) * 3] == step[0::2] and ranks[1][s * 3:(s + 1) * 3] == step[1::2]
    # resuming at step 4's position gives the tail of the uninterrupted order
    _, epoch, index = plan.take(0, 0, per_step * 4)
    assert list(plan.rank_batches(epoch, index, per_step, steps - 4, rank=1, world=2)) == ranks[1][12:]


def test_plan_for_rows_uses_the_recipe():
    from asr_lora.config import load_recipe

    rows = [make_row(f"r{i}", "x.wav", "가" * 10, duration=d) for i, d in enumerate(kspon_like(50))]
    fixed = BatchPlan.for_rows(rows, load_recipe(None, ["train.batch_size=4"]).train)
    assert sorted(len(b) for b in fixed.epoch(0)) == [2] + [4] * 12 and str(fixed) == "micro-batches of 4 clips"
    timed = BatchPlan.for_rows(rows, load_recipe(None, ["train.batch_seconds=40"]).train, "trimmed")
    assert all(padded_seconds(b, timed.durations) <= 40 for b in timed.epoch(0))
    full = BatchPlan.for_rows(rows, load_recipe(None, ["train.batch_seconds=60"]).train, "full")
    assert {len(b) for b in full.epoch(0)} == {2}


def test_num_workers_defaults(monkeypatch):
    assert resolve_num_workers(3, "cpu") == 3 and resolve_num_workers(0, "cuda") == 0
    assert resolve_num_workers(None, "cpu") == 0
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_num_workers(None, "cuda") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_num_workers(None, "cuda") == 1


# --------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def collator(tiny_whisper):
    from transformers import WhisperProcessor

    from asr_lora.data.collator import WhisperCollator

    tokenizer = WhisperProcessor.from_pretrained(tiny_whisper).tokenizer
    return WhisperCollator(tokenizer, padding="longest")


def demo_rows(n: int, broken: tuple[int, ...] = ()):
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text(encoding="utf-8").splitlines()][:n]
    return [make_row(r["id"], DEMO / r["audio"] if i not in broken else DEMO / "missing.flac", r["text"],
                     duration=r["duration"]) for i, r in enumerate(rows)]


def test_background_workers_give_the_batches_of_the_loop(collator):
    """2 worker processes produce, in order, the very batches (bit-identical features and labels) the
    collator gives in the loop; rows that cannot be read are reported in the batch that held them."""
    rows = demo_rows(12, broken=(5,))
    plan = BatchPlan([r.duration for r in rows], seed=0, batch_seconds=12.0)
    order = list(plan.rank_batches(0, 0, 1, 8))
    in_loop = list(micro_batches(rows, collator, order, len(order), num_workers=0))
    background = list(micro_batches(rows, collator, order, len(order), num_workers=2))
    assert [b["indices"] for b in background] == [b["indices"] for b in in_loop] == order
    for a, b in zip(in_loop, background):
        assert a["ids"] == b["ids"]
        assert torch.equal(a["input_features"], b["input_features"]) and torch.equal(a["labels"], b["labels"])
        assert [tuple(s) for s in a["skipped"]] == [tuple(s) for s in b["skipped"]]
    skipped = [tuple(s) for b in background for s in b["skipped"]]
    assert [uid for uid, _ in skipped] == [rows[5].id] * sum(5 in idx for idx in order)


def test_next_batches_checks_the_plan(collator):
    rows = demo_rows(4)
    loader = micro_batches(rows, collator, [[0, 1], [2, 3]], 2)
    assert [b["indices"] for b in next_batches(loader, [[0, 1]])] == [[0, 1]]
    with pytest.raises(RuntimeError, match="out of step"):
        next_batches(loader, [[3, 2]])


def test_workers_compute_features_on_the_cpu(collator):
    from dataclasses import replace

    on_gpu = replace(collator, feature_device="cuda")
    assert cpu_features(on_gpu).feature_device is None and on_gpu.feature_device == "cuda"
    assert cpu_features(collator) is collator
