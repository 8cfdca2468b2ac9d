"""Training recipe on the tiny model: token-normalised accumulation, checkpoints, exact resume, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asr_lora.config import load_recipe
from asr_lora.runfolder import latest_checkpoint
from asr_lora.data.samplers import length_grouped_batches
from asr_lora.train import Trainer, run_training

from .conftest import DEMO, REPO, demo_rows, write_manifest


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """8 train rows and 3 dev rows from the demo corpus, audio paths made absolute."""
    folder = tmp_path_factory.mktemp("data")

    return write_manifest(folder / "train.jsonl", demo_rows("train", 8)), write_manifest(folder / "dev.jsonl", demo_rows("dev", 3))


def recipe(tiny_whisper, small_data, out, *extra):
    train, dev = small_data
    return load_recipe(None, [
        f"model.name={tiny_whisper}", "model.gradient_checkpointing=false", "lora.r=4", "lora.alpha=8",
        "lora.dropout=0.0", f"data.train={train}", f"data.dev={dev}", f"train.output_dir={out}",
        "train.lr=1e-2", "train.warmup_steps=0", "eval.max_new_tokens=3", "eval.batch_size=3", *extra,
    ])


def lora_weights(out: Path, step_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / step_dir / "adapter_model.safetensors")


def losses(out: Path) -> dict[int, float]:
    """Training loss by step, from metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_length_grouped_batches_deterministic_and_complete():
    durations = [float(i % 7) for i in range(100)]
    a = length_grouped_batches(durations, 8, seed=1, epoch=0)
    assert a == length_grouped_batches(durations, 8, seed=1, epoch=0)
    assert a != length_grouped_batches(durations, 8, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(100))


def test_accumulation_matches_big_batch(tiny_whisper, small_data, tmp_path, monkeypatch):
    """batch 8 x accum 1 and batch 2 x accum 4 give the same loss and the same gradient."""
    grads: dict[str, dict[str, torch.Tensor]] = {}
    original = Trainer._grads_finite

    def snapshot(self):  # called once per optimizer step, right before clipping and the update
        grads[self.out.name] = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        return original(self)

    monkeypatch.setattr(Trainer, "_grads_finite", snapshot)
    common = ["train.max_steps=1", "train.eval_every=1", "train.save_every=1"]
    big = recipe(tiny_whisper, small_data, tmp_path / "big", "train.batch_size=8", "train.grad_accum=1", *common)
    small = recipe(tiny_whisper, small_data, tmp_path / "small", "train.batch_size=2", "train.grad_accum=4", *common)
    run_training(big, progress=False)
    run_training(small, progress=False)
    (loss_big,) = losses(tmp_path / "big").values()
    (loss_small,) = losses(tmp_path / "small").values()
    assert loss_big == pytest.approx(loss_small, rel=1e-5)
    gb, gs = grads["big"], grads["small"]
    assert gb.keys() == gs.keys() and len(gb) == 12 * 2  # A and B of 12 LoRA modules
    for key in gb:
        assert torch.allclose(gb[key], gs[key], rtol=1e-4, atol=1e-8), key
    assert any(g.abs().sum() > 0 for k, g in gb.items() if "lora_B" in k)  # a real gradient (B starts at 0)
    # and the update happened: B is no longer zero
    assert any(w.abs().sum() > 0 for k, w in lora_weights(tmp_path / "big", "final").items() if "lora_B" in k)


def test_run_folder_checkpoints_metrics_and_resume(tiny_whisper, small_data, tmp_path, monkeypatch):
    """Stop after step 4, resume to 8: losses equal a straight 8-step run; folders are as promised."""
    args = ["train.max_steps=8", "train.batch_size=2", "train.eval_every=2", "train.save_every=2",
            "train.keep_last=2"]
    straight = tmp_path / "straight"
    run_training(recipe(tiny_whisper, small_data, straight, *args), progress=False)

    interrupted = tmp_path / "interrupted"
    original = Trainer.save_checkpoint

    def stop_after_4(self, metrics=None):
        path = original(self, metrics)
        if self.state.step == 4:
            raise KeyboardInterrupt("simulated stop")
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", stop_after_4)
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe(tiny_whisper, small_data, interrupted, *args), progress=False)
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    assert latest_checkpoint(interrupted).name == "step-000004"
    trainer = run_training(recipe(tiny_whisper, small_data, interrupted, *args), resume=True, progress=False)
    assert trainer.state.step == 8

    assert losses(interrupted) == pytest.approx(losses(straight), rel=1e-5)
    assert list(losses(interrupted)) == list(range(1, 9))
    for key, value in lora_weights(straight, "final").items():
        assert torch.allclose(value, lora_weights(interrupted, "final")[key], atol=1e-6)

    # run folder contents
    names = {p.name for p in straight.iterdir()}
    assert {"recipe.yaml", "run_info.json", "metrics.jsonl", "cer.png", "best", "final"} <= names
    steps = sorted(n for n in names if n.startswith("step-"))
    best = json.loads((straight / "best" / "trainer_state.json").read_text())["step"]
    # keep the last 2 plus the best
    assert steps[-2:] == ["step-000006", "step-000008"] and len(steps) <= 3
    assert f"step-{best:06d}" in steps
    evals = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "cer" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    for r in evals:
        assert {"step", "cer", "cer_nospace", "wer", "swer", "eval_loss"} <= r.keys()
    assert min(r["cer"] for r in evals) == pytest.approx(
        [r["cer"] for r in evals if r["step"] == best][0])
    ckpt = straight / "step-000008"
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng.pt",
            "trainer_state.json", "metrics.json"} <= {p.name for p in ckpt.iterdir()}
    info = json.loads((straight / "run_info.json").read_text())
    assert {"git_revision", "packages", "hardware"} <= info.keys()
    assert not [p for p in straight.iterdir() if ".tmp-" in p.name]


def test_adapter_loads_with_peft(tiny_whisper, small_data, tmp_path):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    run_training(recipe(tiny_whisper, small_data, tmp_path / "r", "train.max_steps=1", "train.batch_size=4"),
                 progress=False)
    model = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(tiny_whisper),
                                      tmp_path / "r" / "final")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_non_finite_loss_stops_with_clear_error(tiny_whisper, small_data, tmp_path, monkeypatch):
    from asr_lora.train import TrainingError

    monkeypatch.setattr("asr_lora.train.token_loss_sum",
                        lambda logits, labels: (logits.sum() * float("nan"), int((labels != -100).sum())))
    cfg = recipe(tiny_whisper, small_data, tmp_path / "nan", "train.max_steps=5", "train.max_bad_steps=2",
                 "train.batch_size=2")
    with pytest.raises(TrainingError, match=r"2 non-finite steps in a row at step 2; last batch ids"):
        run_training(cfg, progress=False)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_validates(path):
    cfg = load_recipe(path)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# asr-lora train ") and str(path.relative_to(REPO)) in first
    if path.parent.name == "kspon":  # the product's Whisper-large recipes: LoRA on q_proj/v_proj, as the default
        assert cfg.lora.target_modules == ["q_proj", "v_proj"] == load_recipe(None).lora.target_modules
    else:  # the CPU demo on whisper-base adapts every projection (test CER 0.08 vs 0.13 on q/v only: README)
        assert path.parent.name == "demo" and {"q_proj", "v_proj"} <= set(cfg.lora.target_modules)


def test_recipes_exist():
    names = {str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes").rglob("*.yaml")}
    assert {"kspon/whisper-large-v2_lora-8bit.yaml", "kspon/whisper-large-v3_qlora-4bit.yaml",
            "demo/whisper-base_lora.yaml"} <= names


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AUGMENT_OFF = ["augment.spec_time_prob=0", "augment.spec_feature_prob=0", "augment.noise_prob=0",
               "augment.speed_prob=0", "augment.gain_prob=0"]


def run_ddp(overrides: list[str], timeout: int = 600, probe: Path | None = None):
    """``asr-lora train`` on the demo recipe with ``overrides`` in 2 gloo processes (torchrun);
    ``probe``: through :data:`PROBE` (collective counts written next to that path)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    target = ["-m", "asr_lora.cli"]
    if probe is not None:
        probe.with_suffix(".py").write_text(PROBE)
        target, env["PROBE_OUT"] = [str(probe.with_suffix(".py"))], str(probe)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         *target, "train", str(REPO / "recipes" / "demo" / "whisper-base_lora.yaml"),
         # the demo's zero-shot pass, non-speech clips, timestamped labels and augmentation are not what these
         # tests are about (SpecAugment draws from each process's own numpy RNG: 2 ranks mask other frames than 1)
         "eval.zero_shot=false", "data.nonspeech_rate=0", "data.nonspeech_dev=null", "train.timestamp_probability=0",
         "data.concat_probability=0", "eval.longform_rows=0",  # the demo's joined inputs and long-form probe
         *AUGMENT_OFF, "lora.target_modules=[q_proj,v_proj]",  # the default, as the single-process runs here
         *overrides, "--no-progress"],
        capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


# `asr-lora train` counting its collectives: every torch.distributed.all_reduce (element count of the
# tensor) and every gradient bucket DDP's own reducer all-reduces (a comm hook); one JSON per rank.
PROBE = """
import atexit, json, os, sys
import accelerate, torch, torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

counts = {"all_reduce": [], "ddp_buckets": 0}
plain_all_reduce, plain_prepare = dist.all_reduce, accelerate.Accelerator.prepare_model

def all_reduce(tensor, *args, **kwargs):
    counts["all_reduce"].append(tensor.numel())
    return plain_all_reduce(tensor, *args, **kwargs)

def counting_hook(state, bucket):
    counts["ddp_buckets"] += 1
    return allreduce_hook(state, bucket)

def prepare_model(self, model, *args, **kwargs):
    model = plain_prepare(self, model, *args, **kwargs)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.register_comm_hook(None, counting_hook)
    return model

dist.all_reduce, accelerate.Accelerator.prepare_model = all_reduce, prepare_model
out = os.environ["PROBE_OUT"] + f".rank{os.environ['RANK']}.json"
atexit.register(lambda: open(out, "w").write(json.dumps(counts)))
from asr_lora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ddp_rank_with_unreadable_dev_shard_does_not_hang(tiny_whisper, small_data, tmp_path):
    """3 dev rows over 2 processes: rank 1's only row is corrupt audio. Rank 1 has nothing to score;
    it must still take part in gathering the results (it used to raise alone: under gloo rank 0's
    gather failed and the run died; under NCCL rank 0 would wait forever). The eval line scores the
    2 readable rows and counts the bad one."""
    train, dev = small_data
    rows = [json.loads(line) for line in Path(dev).read_text(encoding="utf-8").splitlines()]
    bad = tmp_path / "corrupt.flac"
    bad.write_bytes(b"fLaC but not really" * 50)
    rows[1]["audio"] = str(bad)
    dev_bad = write_manifest(tmp_path / "dev.jsonl", rows)
    out = tmp_path / "ddp"
    proc = run_ddp([f"model.name={tiny_whisper}", "model.gradient_checkpointing=false", "lora.r=4", "lora.alpha=8",
                    f"data.train={train}", f"data.dev={dev_bad}", "eval.max_new_tokens=3", "eval.zero_shot=false",
                    "train.max_steps=1",
                    "train.batch_size=2", "train.eval_every=1", "train.save_every=1", f"train.output_dir={out}",
                    "eval.longform_rows=3"],  # the probe joins the corrupt row too: its keys are left out
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"cer"' in line]
    assert len(evals) == 1 and evals[0]["eval_n"] == 2 and evals[0]["eval_skipped"] == 1
    assert "longform_cer" not in evals[0] and "longfile_cer" not in evals[0]


def test_ddp_two_cpu_processes_match_accumulation(tiny_whisper, small_data, tmp_path):
    """DDP with 2 CPU processes (gloo; accelerate's multi-CPU mode, started by torchrun as
    `accelerate launch --multi_gpu` starts GPU ranks): same losses as one process accumulating the
    same micro-batches, so the ranks agree on the reduced loss and gradient; only rank 0 writes.
    Each process accumulates 2 micro-batches per step and syncs gradients once per step: one
    all-reduce of all LoRA gradients, none by DDP's reducer during the backward passes."""
    train, dev = small_data
    common = [f"model.name={tiny_whisper}", "model.audio_context=full", "model.gradient_checkpointing=false",
              "lora.r=4", "lora.alpha=8",
              "lora.dropout=0.0", f"data.train={train}", f"data.dev={dev}", "train.lr=1e-2",
              "train.warmup_steps=0", "eval.max_new_tokens=3", "train.max_steps=3", "train.batch_size=2",
              "train.eval_every=3", "train.save_every=3", "eval.zero_shot=false"]
    concat = ["data.concat_probability=0.5", "data.concat_max_seconds=12"]  # every process joins the same rows
    ddp = tmp_path / "ddp"
    proc = run_ddp([*common, *concat, "train.grad_accum=2", f"train.output_dir={ddp}"], probe=tmp_path / "probe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr
    single = tmp_path / "single"
    run_training(recipe(tiny_whisper, small_data, single, "train.max_steps=3", "train.batch_size=2",
                        "train.grad_accum=4", "train.eval_every=3", "train.save_every=3", *concat), progress=False)
    got, want = losses(ddp), losses(single)
    assert list(got) == [1, 2, 3]
    # steps 1-2 agree to float precision; later steps may drift by ~1e-3: the all-reduce sums in
    # another order, and Adam turns last-bit differences of near-zero gradients into full-size steps
    assert [got[1], got[2]] == pytest.approx([want[1], want[2]], rel=1e-5)
    assert got[3] == pytest.approx(want[3], rel=1e-2)
    # only rank 0 wrote: one metrics line per step plus one eval line, one checkpoint
    lines = (ddp / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert sorted(p.name for p in ddp.iterdir() if p.name.startswith("step-")) == ["step-000003"]
    # one gradient sync per optimizer step on each rank: 3 steps x 2 backward passes, 3 syncs
    lora = 12 * 2 * 4 * 64  # 12 LoRA modules, A (4 x 64) and B (64 x 4)
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"probe.rank{rank}.json").read_text())
        assert counts["ddp_buckets"] == 0
        assert [n for n in counts["all_reduce"] if n > 1] == [lora] * 3


def test_in_training_eval_equals_asr_lora_eval(tiny_whisper, small_data, tmp_path):
    """One decode path: the dev hypotheses a checkpoint got during training (eval/step-N.jsonl) are
    what `asr-lora eval --adapter step-N` gives on the same rows with the same options, and so are
    the CERs (trimmed context, so batch composition matters too)."""
    from asr_lora.cli import main

    out = tmp_path / "run"
    run_training(recipe(tiny_whisper, small_data, out, "model.audio_context=trimmed", "train.max_steps=2",
                        "train.batch_size=4", "train.eval_every=2", "train.save_every=2",
                        "eval.max_new_tokens=6", "eval.batch_size=2"), progress=False)
    during = [json.loads(line) for line in (out / "eval" / "step-000002.jsonl").read_text().splitlines()]
    record = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "cer" in r][-1]
    assert main(["eval", "--data", small_data[1], "--adapter", str(out / "step-000002"), "--out",
                 str(tmp_path / "eval"), "--max-new-tokens", "6", "--batch-size", "2", "--no-progress"]) == 0
    after = [json.loads(line) for line in (tmp_path / "eval" / "utterances.jsonl").read_text().splitlines()]
    assert [u["id"] for u in after] == [u["id"] for u in during] and len(after) == 3
    assert [u["hyp"] for u in after] == [u["hyp"] for u in during]
    assert any(u["hyp"] for u in after)  # something was decoded, not three empty strings
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["cer"] == pytest.approx(record["cer"])


@pytest.mark.parametrize("report_to", ["tensorboard", "none"])
def test_trackers_write_training_and_dev_scalars(tiny_whisper, small_data, tmp_path, report_to):
    """train.report_to goes through accelerate's trackers: TensorBoard events in tb/ hold the training
    loss, learning rate, step time, tokens/s and the dev metrics; report_to=none writes no tb/."""
    out = tmp_path / "run"
    run_training(recipe(tiny_whisper, small_data, out, "model.audio_context=trimmed", "train.max_steps=2",
                        "train.batch_size=4", "train.eval_every=2", "train.save_every=2",
                        f"train.report_to={report_to}"), progress=False)
    events = list((out / "tb").rglob("events.out.tfevents.*")) if (out / "tb").exists() else []
    if report_to == "none":
        assert events == []
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    assert {"train/loss", "train/lr", "train/step_seconds", "train/tokens_per_second", "dev/cer", "dev/cer_nospace",
            "dev/wer", "dev/swer", "dev/eval_loss"} <= set(scalars)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2] and [s for s, _ in scalars["dev/cer"]] == [2]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([losses(out)[1], losses(out)[2]], rel=1e-5)


def test_nonspeech_clips_are_mixed_in_and_scored_as_a_share(tiny_whisper, small_data, tmp_path):
    """data.nonspeech (a folder) is mixed into training at data.nonspeech_rate; data.nonspeech_dev clips
    are decoded every eval but scored apart from CER: nonspeech_share in metrics.jsonl and the eval file."""
    import shutil

    folder = tmp_path / "noise"
    folder.mkdir()
    for p in sorted((DEMO / "nonspeech" / "train").glob("*.ogg"))[:3]:
        shutil.copy(p, folder / p.name)
    dev_rows = [json.loads(line) for line in (DEMO / "nonspeech_dev.jsonl").read_text().splitlines()][:3]
    for r in dev_rows:
        r["audio"] = str(DEMO / r["audio"])
    nonspeech_dev = write_manifest(tmp_path / "nonspeech_dev.jsonl", dev_rows)
    out = tmp_path / "run"
    trainer = run_training(recipe(tiny_whisper, small_data, out, "model.audio_context=trimmed", "train.max_steps=2",
                                  "train.batch_size=4", "train.eval_every=2", "train.save_every=2",
                                  f"data.nonspeech={folder}", "data.nonspeech_rate=0.2",
                                  f"data.nonspeech_dev={nonspeech_dev}"), progress=False)
    mixed = [r for r in trainer.train_rows if r.nonspeech]
    assert len(trainer.train_rows) == 8 + 2 and len(mixed) == 2 and all(r.text == "" for r in mixed)
    assert {Path(r.audio).parent for r in mixed} == {folder.resolve()}
    record = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "cer" in r][-1]
    assert record["eval_n"] == 3 and record["nonspeech_n"] == 3 and 0.0 <= record["nonspeech_share"] <= 1.0
    lines = [json.loads(line) for line in (out / "eval" / "step-000002.jsonl").read_text().splitlines()]
    silent = [u for u in lines if u.get("nonspeech")]
    assert len(silent) == 3 and record["nonspeech_share"] == sum(bool(u["hyp"]) for u in silent) / 3


# --------------------------------------------------------------------------- batches by duration, background loading


AUGMENT = ["augment.spec_time_prob=0.2", "augment.spec_time_length=5", "augment.spec_feature_prob=0.1",
           f"augment.noise={DEMO / 'nonspeech_train.jsonl'}", "augment.noise_prob=0.5", "augment.speed_prob=0.5",
           "augment.gain_prob=0.5"]


# non-speech rows mixed in, half of them read after the forced prefix (UNSURE target), timestamp labels
DRAWN = [f"data.nonspeech={DEMO / 'nonspeech_train.jsonl'}", "data.nonspeech_rate=0.3",
         "train.nonspeech_forced_probability=0.5", "train.timestamp_probability=0.5",
         "data.concat_probability=0.5", "data.concat_max_seconds=12"]


@pytest.mark.parametrize("augment", [[], AUGMENT + DRAWN], ids=["plain", "augmented"])
def test_duration_batches_and_background_workers_resume_bit_identical(tiny_whisper, small_data, tmp_path,
                                                                     monkeypatch, augment):
    """train.batch_seconds with 2 background workers: stopped after step 3 and resumed, the run has
    exactly (bit for bit) the losses and weights of a straight run that loads in the loop, across
    an epoch boundary; also with SpecAugment (numpy's RNG saved and restored), waveform augmentation,
    non-speech rows (some forced), timestamp labels and joined multi-utterance inputs (all drawn per row
    and epoch) on."""
    args = ["train.max_steps=8", "train.batch_seconds=8", "train.eval_every=8", "train.save_every=1",
            "model.audio_context=trimmed", *augment]
    straight = tmp_path / "straight"
    run_training(recipe(tiny_whisper, small_data, straight, *args, "train.num_workers=0"), progress=False)
    interrupted = tmp_path / "interrupted"
    original = Trainer.save_checkpoint

    def stop_after_3(self, metrics=None):
        path = original(self, metrics)
        if self.state.step == 3:
            raise KeyboardInterrupt("simulated stop")
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", stop_after_3)
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe(tiny_whisper, small_data, interrupted, *args, "train.num_workers=2"), progress=False)
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    trainer = run_training(recipe(tiny_whisper, small_data, interrupted, *args, "train.num_workers=2"), resume=True,
                           progress=False)
    assert trainer.state.epoch >= 1  # the run crossed an epoch
    assert losses(interrupted) == losses(straight) and list(losses(straight)) == [1, 2, 3, 4, 5, 6, 7, 8]
    for key, value in lora_weights(straight, "final").items():
        assert torch.equal(value, lora_weights(interrupted, "final")[key]), key
    # micro-batches of several clips and of one, as the budget allows (8 s; clips of 1.4 to 7.4 s)
    plan = trainer.plan
    assert max(len(b) for b in plan.epoch(0)) > 1 and min(len(b) for b in plan.epoch(0)) >= 1
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data_seconds"] >= 0 for r in records if "loss" in r)


def test_background_workers_leave_the_dropout_rng_alone(tiny_whisper, small_data, tmp_path):
    """With LoRA dropout on, loading by workers gives the losses of loading in the loop, bit for bit:
    the DataLoader seeds its workers from its own generator, not from the RNG dropout draws from."""
    args = ["train.max_steps=3", "train.batch_size=2", "train.eval_every=3", "train.save_every=3",
            "lora.dropout=0.3", "model.audio_context=trimmed"]
    run_training(recipe(tiny_whisper, small_data, tmp_path / "loop", *args, "train.num_workers=0"), progress=False)
    run_training(recipe(tiny_whisper, small_data, tmp_path / "workers", *args, "train.num_workers=2"), progress=False)
    assert losses(tmp_path / "workers") == losses(tmp_path / "loop")


def test_background_workers_count_each_bad_row_once(tiny_whisper, small_data, tmp_path, capsys):
    """A training row whose audio is gone, met in 2 epochs by worker processes: skipped, logged and
    counted once."""
    train, dev = small_data
    rows = [json.loads(line) for line in Path(train).read_text(encoding="utf-8").splitlines()]
    rows[3]["audio"] = str(tmp_path / "gone.flac")
    data = (write_manifest(tmp_path / "train.jsonl", rows), dev)
    trainer = run_training(recipe(tiny_whisper, data, tmp_path / "run", "model.audio_context=trimmed",
                                  "train.max_steps=8", "train.batch_size=2", "train.eval_every=8",
                                  "train.save_every=8", "train.num_workers=2"), progress=False)
    assert trainer.state.step == 8 and trainer.state.epoch == 2
    assert trainer.state.bad_rows == 1 and trainer.state.bad_row_ids == [rows[3]["id"]]
    assert capsys.readouterr().err.count(f"skipped row {rows[3]['id']}") == 1


def test_two_nodes_through_torchrun_rendezvous(tiny_whisper, small_data, tmp_path):
    """2 nodes x 1 process, each started by its own torchrun that meets the other through the c10d
    rendezvous on 127.0.0.1 (how `accelerate launch --num_machines 2` / torchrun start real nodes),
    with micro-batches by duration and a background worker: the same losses as one process
    accumulating the two nodes' micro-batches."""
    import os
    import subprocess
    import sys
    import time

    train, dev = small_data
    common = [f"model.name={tiny_whisper}", "model.audio_context=trimmed", "model.gradient_checkpointing=false",
              "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", f"data.train={train}", f"data.dev={dev}",
              "train.lr=1e-2", "train.warmup_steps=0", "eval.max_new_tokens=3", "eval.zero_shot=false",
              "data.nonspeech_rate=0", "data.nonspeech_dev=null", "train.timestamp_probability=0", *AUGMENT_OFF,
              "data.concat_probability=0", "eval.longform_rows=0",
              "lora.target_modules=[q_proj,v_proj]", "train.max_steps=2", "train.batch_seconds=8", "train.eval_every=2", "train.save_every=2"]
    out, port = tmp_path / "nodes", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "asr-lora-test",
            "--rdzv_conf", "join_timeout=120", "--local_addr", "127.0.0.1", "--max_restarts", "0",
            "-m", "asr_lora.cli", "train", str(REPO / "recipes" / "demo" / "whisper-base_lora.yaml"), *common,
            "train.num_workers=1", f"train.output_dir={out}", "--no-progress"]
    procs = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
             for _ in range(2)]
    deadline = time.monotonic() + 400
    try:
        logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert any("world size 2" in log for log in logs)
    single = tmp_path / "single"
    run_training(recipe(tiny_whisper, small_data, single, "model.audio_context=trimmed", "train.max_steps=2",
                        "train.batch_seconds=8", "train.grad_accum=2", "train.eval_every=2", "train.save_every=2"),
                 progress=False)
    got, want = losses(out), losses(single)
    assert list(got) == [1, 2]
    assert got[1] == pytest.approx(want[1], rel=1e-5)
    assert got[2] == pytest.approx(want[2], rel=1e-2)
