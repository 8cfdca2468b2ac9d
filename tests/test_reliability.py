"""What happens when things go wrong, on the tiny model: kill -9 at any moment, a full disk or a
missing permission, files that go bad mid-run, NaN/inf, untrusted files, reruns.

One uninterrupted 6-step run (``reference``) is the yardstick: interrupted, failed and repeated
runs must reproduce its per-step losses. The sha256 check of the bundled base before conversion is
tested in ``test_convert.py::test_corrupted_part_is_refused``.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from asr_lora.config import ConfigError, LoraConfig, ModelConfig, load_recipe, to_dict
from asr_lora.errors import UserError
from asr_lora.runfolder import TRAINER_STATE, checkpoint_steps, latest_checkpoint
from asr_lora.train import (
    TEST_PAUSE_ENV,
    TEST_PAUSE_MARKER,
    Trainer,
    TrainingError,
    resolve_mixed_precision,
    run_training,
)

from .conftest import DEMO, REPO, write_manifest
from .test_train import lora_weights, losses, recipe, small_data  # noqa: F401 (fixture)

# 8 train rows in batches of 2: one epoch is 4 steps. A checkpoint every step, CER every 3; one dev
# row per eval batch, so that a test can stop the run between two eval batches.
TRIMMED = "model.audio_context=trimmed"  # pad batches to their longest clip: several times faster
ARGS = [TRIMMED, "train.max_steps=6", "train.batch_size=2", "train.eval_every=3",
        "train.save_every=1", "train.keep_last=2", "eval.batch_size=1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocesses (OMP_NUM_THREADS=1): the tiny model gains
    nothing from more, and on a busy 2-core CI machine spinning OpenMP threads make steps ~10x slower.
    The same thread count everywhere also keeps the compared losses bit-comparable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_whisper, small_data, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run: its metrics.jsonl is what every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_training(recipe(tiny_whisper, small_data, out, *ARGS), progress=False)
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def eval_steps(out: Path) -> list[int]:
    return [r["step"] for r in records(out) if "cer" in r]


def train_with(cfg, after_setup=None, resume=None) -> Trainer:
    """``run_training`` with a callback between setup and training (to install a test hook)."""
    trainer = Trainer(cfg, resume=resume, progress=False)
    try:
        trainer.setup()
        if after_setup is not None:
            after_setup(trainer)
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


def cli(*argv: str) -> int:
    from asr_lora.cli import main

    return main(["train", *argv, "--no-progress"])


# --------------------------------------------------------------------------- 1. kill at any moment


def start_and_kill(recipe_file: Path, out: Path, pause: str, log: Path, *flags: str) -> str:
    """Run ``asr-lora train`` in a subprocess until it reaches ``pause`` (the test hook), SIGKILL it,
    return its output."""
    env = {**os.environ, TEST_PAUSE_ENV: pause, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    marker = out / TEST_PAUSE_MARKER
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "asr_lora.cli", "train", str(recipe_file), "--no-progress",
                                 *flags], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        paused = marker.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    assert paused, f"the run never reached {pause}:\n{text[-3000:]}"
    marker.unlink()
    return text


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_matches_uninterrupted(tiny_whisper, small_data, reference, tmp_path):
    """SIGKILL in the middle of a step, while a checkpoint is half written and in the middle of an
    evaluation: each --resume continues from the newest complete checkpoint, cleans up and says so,
    and the finished run has exactly the reference's losses, evals and weights."""
    out = tmp_path / "run"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(to_dict(recipe(tiny_whisper, small_data, out, *ARGS))))

    # 1. killed in the middle of step 2 (after the backward pass, before the update)
    start_and_kill(recipe_file, out, "step@2", tmp_path / "1.log")
    assert checkpoint_steps(out) == [1]

    # 2. resumed, killed while writing step 3's checkpoint (optimizer.pt written, the rest not)
    log = start_and_kill(recipe_file, out, "checkpoint@3", tmp_path / "2.log", "--resume")
    assert f"resumed from {out / 'step-000001'} (step 1)" in log
    assert checkpoint_steps(out) == [1, 2]
    (partial,) = out.glob(".step-000003.tmp-*")
    assert (partial / "optimizer.pt").is_file() and not (partial / "trainer_state.json").exists()

    # 3. resumed, killed in the middle of step 3's evaluation (after 1 of 3 dev batches)
    log = start_and_kill(recipe_file, out, "eval@3", tmp_path / "3.log", "--resume")
    assert f"removed an unfinished checkpoint write: {partial.name}" in log
    assert f"resumed from {out / 'step-000002'} (step 2)" in log
    assert checkpoint_steps(out) == [1, 2] and not list(out.glob(".*.tmp-*"))
    assert [r["step"] for r in records(out) if "loss" in r][-1] == 3  # a record past the checkpoint...

    # 4. a kill in the middle of a metrics line leaves half a line
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "lo')

    # 5. resumed to the end, in this process (the CLI again)
    assert cli(str(recipe_file), "--resume") == 0
    assert losses(out) == pytest.approx(losses(reference), rel=1e-6, abs=1e-7)
    assert list(losses(out)) == [1, 2, 3, 4, 5, 6]  # ...was replaced: one record per step
    assert eval_steps(out) == eval_steps(reference) == [3, 6]
    for key, value in lora_weights(reference, "final").items():
        assert torch.allclose(value, lora_weights(out, "final")[key], atol=1e-6)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]


def test_replace_interrupted_between_renames_is_repaired(tiny_whisper, small_data, reference, tmp_path, capsys):
    """A kill between the two renames that replace ``best/`` leaves only ``.best.old``: the next run
    puts it back. A kill while deleting an old checkpoint leaves a hidden temporary: removed."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    *older, newest = checkpoint_steps(out)
    os.rename(out / "best", out / ".best.old")
    os.rename(out / f"step-{newest:06d}", out / f".step-{newest:06d}.tmp-delete")  # rotation renames, then deletes
    cfg = recipe(tiny_whisper, small_data, out, *ARGS)
    trainer = Trainer(cfg, progress=False)
    try:
        trainer.setup()
    finally:
        trainer.cleanup()
    err = capsys.readouterr().err
    assert "restored best/ from .best.old" in err
    assert f"removed an unfinished checkpoint write: .step-{newest:06d}.tmp-delete" in err
    assert (out / "best" / "adapter_model.safetensors").is_file()
    assert trainer.state.step == older[-1]  # the newest complete checkpoint left


def test_fresh_sets_the_previous_run_aside(tiny_whisper, small_data, reference, tmp_path, capsys):
    """--fresh on a folder holding a 6-step run: that run moves to previous-*/ intact; the new run's
    checkpoints are the only ones resume or rotation can see (the old step-000006 would otherwise
    outrank them), and its losses are those of a run from step 0."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    train_with(recipe(tiny_whisper, small_data, out, *ARGS, "train.max_steps=2"), resume=False)
    aside = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and "--fresh: moved the previous run" in capsys.readouterr().err
    assert sorted(p.name for p in aside[0].glob("step-*")) == ["step-000005", "step-000006"]
    assert (aside[0] / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert latest_checkpoint(out) == out / "step-000002"
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001", "step-000002"]
    assert json.loads((out / "final" / TRAINER_STATE).read_text())["step"] == 2
    new = losses(out)
    assert sorted(new) == [1, 2] and all(abs(new[s] - losses(reference)[s]) < 1e-6 for s in new)


def test_one_run_per_folder(tiny_whisper, small_data, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainingError, match="in use by another 'asr-lora train'"):
            run_training(recipe(tiny_whisper, small_data, out, *ARGS), progress=False)


# --------------------------------------------------------------------------- 2. no room, no permission


def fail_in_step_4_checkpoint(monkeypatch, kind: str) -> None:
    """Make the write of step 4's checkpoint fail like a full disk (ENOSPC, in torch.save) or a
    folder we may not write in (EACCES, creating the temporary folder). Tests run as root, where
    chmod does not stop writes, so the failure is injected."""
    if kind == "ENOSPC":
        save = torch.save

        def full_disk(obj, f, *args, **kwargs):
            if ".step-000004.tmp-" in str(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", full_disk)
    else:
        mkdtemp = tempfile.mkdtemp

        def no_permission(*args, prefix=None, dir=None, **kwargs):
            if prefix and prefix.startswith(".step-000004"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return mkdtemp(*args, prefix=prefix, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", no_permission)


@pytest.mark.parametrize("kind", ["ENOSPC", "EACCES"])
def test_failed_checkpoint_write_stops_cleanly(kind, tiny_whisper, small_data, reference, tmp_path, monkeypatch,
                                               capsys):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    from asr_lora.model import load_adapter_model

    out = tmp_path / "run"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(to_dict(recipe(tiny_whisper, small_data, out, *ARGS))))
    fail_in_step_4_checkpoint(monkeypatch, kind)
    assert cli(str(recipe_file)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the last line is the error, and only one line
    reason = os.strerror(errno.ENOSPC if kind == "ENOSPC" else errno.EACCES)
    assert err.startswith(f"asr-lora train: error: could not write checkpoint {out / 'step-000004'}: {reason}.")
    assert f"Earlier checkpoints in {out} are intact" in err and "--resume" in err
    monkeypatch.undo()

    # nothing half-written, and the earlier checkpoints and best/ load
    assert checkpoint_steps(out) == [2, 3] and not list(out.glob(".*.tmp-*"))
    for folder in (out / "step-000002", out / "step-000003", out / "best"):
        assert len(load_adapter_model(folder).peft_config) == 1
        PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(tiny_whisper), folder)
    if kind == "ENOSPC":  # and the run resumes from it to the reference's numbers
        run_training(recipe(tiny_whisper, small_data, out, *ARGS), resume=True, progress=False)
        assert losses(out) == pytest.approx(losses(reference), rel=1e-6, abs=1e-7)


def test_failed_metrics_write_is_a_training_error(tiny_whisper, small_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_open = open

    def full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(TrainingError, match=r"could not write .*metrics\.jsonl: No space left on device"):
        run_training(recipe(tiny_whisper, small_data, out, *ARGS), progress=False)


# --------------------------------------------------------------------------- 3. bad data mid-run


@pytest.fixture
def fragile_data(tmp_path):
    """8 train and 3 dev rows whose audio is a private copy (so a test can break it)."""
    def take(split, n):
        rows = [json.loads(line) for line in (DEMO / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()][:n]
        for r in rows:
            copy = tmp_path / "audio" / Path(r["audio"]).name
            copy.parent.mkdir(exist_ok=True)
            shutil.copy(DEMO / r["audio"], copy)
            r["audio"] = str(copy)
        return rows

    train, dev = take("train", 8), take("dev", 3)
    return (write_manifest(tmp_path / "train.jsonl", train), write_manifest(tmp_path / "dev.jsonl", dev)), train, dev


def break_files(train: list[dict], dev: list[dict]) -> dict[str, str]:
    """Delete one train clip, truncate another mid-stream, delete one dev clip; ``{id: what}``."""
    Path(train[1]["audio"]).unlink()
    with open(train[5]["audio"], "r+b") as fh:
        fh.truncate(2000)
    Path(dev[0]["audio"]).unlink()
    return {train[1]["id"]: "file not found", train[5]["id"]: "cannot decode"}


def test_files_broken_after_preparation_are_skipped_and_counted(tiny_whisper, fragile_data, tmp_path, capsys):
    data, train, dev = fragile_data
    broken = break_files(train, dev)
    out = tmp_path / "run"
    trainer = run_training(recipe(tiny_whisper, data, out, TRIMMED, "train.max_steps=4", "train.batch_size=2",
                                  "train.eval_every=4", "train.save_every=4"), progress=False)
    assert trainer.state.step == 4 and trainer.state.bad_rows == 2  # the run went on
    err = capsys.readouterr().err
    for uid, what in broken.items():
        assert re.search(rf"skipped row {uid}: .*{what}", err), err
    steps = [r for r in records(out) if "loss" in r]
    skipped = {s["id"]: s["reason"] for r in steps for s in r.get("skipped_rows", [])}
    assert skipped.keys() == broken.keys()
    first_bad = min(r["step"] for r in steps if "skipped_rows" in r)
    assert [r.get("bad_rows", 0) > 0 for r in steps] == [r["step"] >= first_bad for r in steps]
    assert steps[-1]["bad_rows"] == 2
    (evaluation,) = [r for r in records(out) if "cer" in r]
    assert evaluation["bad_rows"] == 2 and evaluation["eval_skipped"] == 1 and evaluation["eval_n"] == 2


def test_too_many_bad_rows_stop_the_run(tiny_whisper, fragile_data, tmp_path):
    data, train, dev = fragile_data
    break_files(train, dev)
    cfg = recipe(tiny_whisper, data, tmp_path / "run", TRIMMED, "train.max_steps=4", "train.batch_size=2",
                 "train.max_bad_rows=1")
    with pytest.raises(TrainingError, match=r"2 of 8 training rows are unreadable or invalid "
                                            r"\(limit train.max_bad_rows=1\); first: .*'asr-lora prepare manifest"):
        run_training(cfg, progress=False)


def test_no_readable_row_at_all_stops_the_run(tiny_whisper, fragile_data, tmp_path):
    data, train, dev = fragile_data
    for row in train:
        Path(row["audio"]).unlink()
    cfg = recipe(tiny_whisper, data, tmp_path / "run", TRIMMED, "train.max_steps=8", "train.batch_size=2")
    with pytest.raises(TrainingError, match="8 of 8 training rows are unreadable"):
        run_training(cfg, progress=False)


# --------------------------------------------------------------------------- 4. numerics


def poison_gradients(steps: set[int]):
    """After setup: a hook that turns one LoRA gradient to inf while computing the given steps."""
    def install(trainer: Trainer) -> None:
        name, param = next((n, p) for n, p in trainer.model.named_parameters() if "lora_B" in n)
        param.register_hook(lambda g: torch.full_like(g, math.inf) if trainer.state.step + 1 in steps else g)
    return install


def test_inf_gradient_skips_the_update_and_training_goes_on(tiny_whisper, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = recipe(tiny_whisper, small_data, out, TRIMMED, "train.max_steps=3", "train.batch_size=2",
                 "train.save_every=1", "train.eval_every=3", "train.keep_last=5", "train.max_bad_steps=2")
    trainer = train_with(cfg, poison_gradients({2}))
    assert trainer.state.step == 3 and trainer.state.skipped_updates == 1
    assert "step 2: non-finite gradients, update skipped (batch ids [[" in capsys.readouterr().err
    steps = {r["step"]: r for r in records(out) if "loss" in r}
    assert steps[2]["update_skipped"] and steps[2]["skip_reason"] == "non-finite gradients"
    assert math.isfinite(steps[2]["loss"]) and "update_skipped" not in steps[1] | steps[3]
    # step 2 changed nothing, steps 1 and 3 did
    w = {s: lora_weights(out, f"step-{s:06d}") for s in (1, 2, 3)}
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])
    assert not all(torch.equal(w[2][k], w[3][k]) for k in w[1])
    (evaluation,) = [r for r in records(out) if "cer" in r]
    assert evaluation["skipped_updates"] == 1


def test_inf_gradients_in_a_row_stop_the_run_naming_step_and_batch(tiny_whisper, small_data, tmp_path):
    cfg = recipe(tiny_whisper, small_data, tmp_path / "run", TRIMMED, "train.max_steps=6", "train.batch_size=2",
                 "train.max_bad_steps=2")
    with pytest.raises(TrainingError, match=r"^2 non-finite steps in a row at step 3; last batch ids \[\['demo-"):
        train_with(cfg, poison_gradients({2, 3, 4, 5, 6}))


def test_fp16_loss_scaler_owns_overflow(tiny_whisper, small_data, tmp_path, monkeypatch):
    """fp16's GradScaler wiring (what accelerate sets up on a GPU), reproduced on CPU with torch's CPU
    GradScaler: an overflow is skipped by the scaler (counted once, never towards max_bad_steps while
    the scale is > 1), gradients are unscaled before clipping, and the scale goes into checkpoints."""
    from accelerate.optimizer import AcceleratedOptimizer

    out = tmp_path / "run"
    cfg = recipe(tiny_whisper, small_data, out, TRIMMED, "train.max_steps=3", "train.batch_size=2",
                 "train.save_every=1", "train.eval_every=3", "train.keep_last=5", "train.max_bad_steps=1")
    seen_scale = []

    def fp16_scaler(trainer: Trainer) -> None:
        acc = trainer.accelerator
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, device_placement=False, scaler=scaler)
        acc.scaler, trainer.optimizer, trainer.scheduler.optimizers = scaler, optimizer, [optimizer]
        unscale = scaler.unscale_

        def unscale_gradients(optimizer=None):
            seen_scale.append(scaler.get_scale())  # called by clip_grad_norm_, before clipping
            unscale(trainer.optimizer.optimizer)

        monkeypatch.setattr(acc, "unscale_gradients", unscale_gradients)
        poison_gradients({2})(trainer)

    trainer = train_with(cfg, fp16_scaler)
    assert trainer.state.step == 3 and trainer.state.skipped_updates == 1  # max_bad_steps=1 did not stop it
    assert seen_scale == [1024.0, 1024.0, 512.0]  # halved after the overflow at step 2
    steps = {r["step"]: r for r in records(out) if "loss" in r}
    assert steps[2]["skip_reason"] == "loss scaler found inf/NaN gradients at scale 1024"
    w = {s: lora_weights(out, f"step-{s:06d}") for s in (1, 2)}
    assert all(torch.equal(w[1][k], w[2][k]) for k in w[1])
    assert torch.load(out / "step-000003" / "scaler.pt", weights_only=True)["scale"] == 512.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_gpu(precision, tiny_whisper, small_data, tmp_path):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        with pytest.raises(ConfigError, match="no native bf16"):
            run_training(recipe(tiny_whisper, small_data, tmp_path / "run", TRIMMED, "train.mixed_precision=bf16"),
                         progress=False)
        return
    out = tmp_path / "run"
    trainer = run_training(recipe(tiny_whisper, small_data, out, TRIMMED, "train.mixed_precision=" + precision,
                                  "train.max_steps=3", "train.batch_size=2", "train.save_every=3",
                                  "train.eval_every=3"), progress=False)
    assert trainer.state.step == 3
    assert all(math.isfinite(loss) for loss in losses(out).values())
    assert (out / "final" / "scaler.pt").is_file() == (precision == "fp16")
    assert json.loads((out / "run_info.json").read_text())["mixed_precision"] == precision


def test_mixed_precision_choices():
    assert resolve_mixed_precision("no", cuda=True) == ("no", None)
    for precision in ("fp16", "bf16"):  # no GPU: full precision, with a warning
        mode, warning = resolve_mixed_precision(precision, cuda=False)
        assert mode == "no" and f"train.mixed_precision={precision} needs a GPU" in warning
    assert resolve_mixed_precision("fp16", cuda=True) == ("fp16", None)
    assert resolve_mixed_precision("bf16", cuda=True, bf16_native=True) == ("bf16", None)
    with pytest.raises(ConfigError, match=r"train.mixed_precision=bf16: .* has no native bf16 .* use "
                                          r"train.mixed_precision=fp16"):
        resolve_mixed_precision("bf16", cuda=True, bf16_native=False)


def test_fp16_recipe_on_cpu_falls_back_with_a_warning(tiny_whisper, small_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    out = tmp_path / "run"
    run_training(recipe(tiny_whisper, small_data, out, TRIMMED, "train.mixed_precision=fp16", "train.max_steps=1",
                        "train.batch_size=2"), progress=False)
    assert "warning: train.mixed_precision=fp16 needs a GPU" in capsys.readouterr().err
    assert json.loads((out / "run_info.json").read_text())["mixed_precision"] == "no"
    assert load_recipe(out / "recipe.yaml").train.mixed_precision == "fp16"  # the recipe as asked


# --------------------------------------------------------------------------- 6. load nothing executable


def test_no_trust_remote_code_and_no_unsafe_torch_load():
    source = {p: p.read_text(encoding="utf-8") for p in (REPO / "asr_lora").rglob("*.py")}
    assert not [p for p, text in source.items() if re.search(r"trust_remote_code\s*=\s*True", text)]
    assert not [p for p, text in source.items() if re.search(r"weights_only\s*=\s*False", text)]
    for path, text in source.items():
        for m in re.finditer(r"torch\.load\(", text):
            assert "weights_only=True" in text[m.start():m.start() + 200], f"{path}: torch.load without weights_only"


class WritesAFile:
    """A pickle payload: unpickling it creates a folder (standing in for any code)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_malicious_optimizer_state_is_refused_and_not_run(tiny_whisper, small_data, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    marker = tmp_path / "pwned"
    target = out / "step-000006" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "x": WritesAFile(str(marker))}, target)
    with pytest.raises(TrainingError, match=rf"cannot resume from {re.escape(str(out / 'step-000006'))}: "
                                            rf"{re.escape(str(target))} holds more than tensors and was not loaded"):
        run_training(recipe(tiny_whisper, small_data, out, *ARGS), resume=True, progress=False)
    assert not marker.exists()
    torch.load(target, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.is_dir()


def pickle_only_copy(tiny_whisper: Path, folder: Path) -> Path:
    """The tiny model with its weights in pytorch_model.bin (a pickle) instead of safetensors."""
    from safetensors.torch import load_file

    shutil.copytree(tiny_whisper, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_need_allow_pickle(tiny_whisper, tmp_path):
    from asr_lora.model import build_training_model, load_model

    folder = pickle_only_copy(tiny_whisper, tmp_path / "pickled")
    with pytest.raises(UserError, match=r"pytorch_model\.bin is a pickle checkpoint .* model\.allow_pickle=true"):
        load_model(str(folder))
    with pytest.raises(UserError, match="pytorch_model.bin is a pickle checkpoint"):
        build_training_model(ModelConfig(name=str(folder)), LoraConfig(r=2))
    assert load_model(str(folder), allow_pickle=True).config.d_model == 64
    model = build_training_model(ModelConfig(name=str(folder), allow_pickle=True), LoraConfig(r=2))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert load_recipe(None, ["model.allow_pickle=true"]).model.allow_pickle


def other_base(tiny_whisper: Path, folder: Path) -> Path:
    """A tiny Whisper with another width (d_model 32)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig.from_pretrained(tiny_whisper)
    config.d_model = 32
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    return folder


def test_adapter_for_another_base_is_refused_before_loading(tiny_whisper, reference, tmp_path, monkeypatch):
    import asr_lora.model as model_module

    other = other_base(tiny_whisper, tmp_path / "other")
    monkeypatch.setattr(model_module, "load_base_for_training",
                        lambda *a, **k: pytest.fail("weights were loaded before the adapter was checked"))
    adapter = reference / "final"
    with pytest.raises(UserError) as err:
        model_module.load_adapter_model(adapter, base=str(other))
    assert f"trained on base model {str(tiny_whisper)!r}, not {str(other)!r}" in str(err.value)

    # the recorded name edited to match: the shapes still give it away
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    with pytest.raises(UserError, match=rf"does not fit base model {re.escape(repr(str(other)))} .*lora_A\.weight "
                                        r"has shape \[4, 64\], the base's .* has in_features 32"):
        model_module.load_adapter_model(copy)


# --------------------------------------------------------------------------- 7. reproducible


def test_rerun_from_recorded_recipe_reproduces_losses(tiny_whisper, small_data, reference, tmp_path):
    """The run folder holds what it takes to rerun: recipe.yaml is a valid recipe equal to the one
    run, and `asr-lora train <run>/recipe.yaml` in a fresh folder gives the same losses."""
    cfg = recipe(tiny_whisper, small_data, reference, *ARGS)
    recorded = reference / "recipe.yaml"
    assert recorded.read_text().startswith(f"# asr-lora train {recorded}\n")
    assert load_recipe(recorded) == cfg
    info = json.loads((reference / "run_info.json").read_text())
    assert {"command", "cwd", "seed", "git_revision", "git_dirty", "packages", "python", "platform", "hardware",
            "mixed_precision", "asr_lora"} <= info.keys()
    assert info["seed"] == cfg.train.seed and info["packages"]["torch"] == importlib.metadata.version("torch")

    again = tmp_path / "again"
    assert cli(str(recorded), f"train.output_dir={again}") == 0
    assert losses(again) == losses(reference)  # bit for bit (same machine, same thread count)
    assert load_recipe(again / "recipe.yaml") == recipe(tiny_whisper, small_data, again, *ARGS)
