"""The training recipe: setup / train / evaluate / save_checkpoint / cleanup.

An explicit loop on ``accelerate``. Steps are optimizer steps; evaluation and checkpoints are keyed
to them. The loss of one optimizer step is the sum of token losses over all its micro-batches (and
all processes) divided by the total label-token count, so (batch 8, accum 1) and (batch 2, accum 4)
give the same update.

Run folder (``train.output_dir``)::

    recipe.yaml  run_info.json  metrics.jsonl  cer.png  tb/
    step-000100/  adapter_model.safetensors adapter_config.json trainer_state.json optimizer.pt
                  scheduler.pt rng.pt (scaler.pt with fp16) metrics.json asr_lora.json
    best/  (lowest dev CER)   final/  (end of training)

A checkpoint is written to a temporary folder and renamed, so a crash never leaves a half
checkpoint that looks complete; resume picks the newest ``step-*`` folder.

What happens when things go wrong (each promise has a test in ``tests/test_reliability.py``):

* killed at any moment (``kill -9``): ``--resume`` continues from the newest complete checkpoint
  with the losses of an uninterrupted run; unfinished temporaries are removed and reported, and
  ``metrics.jsonl`` lines past the checkpoint (or cut in half) are dropped.
* a checkpoint write that fails (full disk, no permission) ends the run with a ``TrainingError``
  naming the folder; earlier checkpoints stay intact.
* a row that became unreadable after preparation is skipped, logged and counted (distinct rows)
  in ``metrics.jsonl``; more than ``train.max_bad_rows`` of them, or no readable training row at
  all, stops the run.
* a non-finite loss or gradient skips the update (counted); ``train.max_bad_steps`` steps in a row
  without an update stop the run naming the step and the batch ids. With fp16 on a GPU the loss
  scaler owns overflow: it skips the step and lowers its scale (counted once, and only counted
  towards ``max_bad_steps`` once the scale is at or below 1, where an overflow is no longer a
  scaling problem). Gradients are unscaled before clipping (``accelerator.clip_grad_norm_``);
  accelerate also holds the LR schedule back on a step the scaler skipped; the scale is saved in
  checkpoints. fp16/bf16 without a GPU fall back to fp32 with a warning; bf16 on a GPU without
  native bf16 is refused (:func:`resolve_mixed_precision`).
* optimizer, scheduler and RNG states are read with ``torch.load(weights_only=True)``: a pickle
  that would run code is refused with a message naming the file.
* one run per folder at a time (an advisory lock on ``.lock``); ``--fresh`` on a folder holding a
  run moves that run's outputs to ``previous-<time>/`` first (its higher-numbered checkpoints
  would otherwise be resumed into, and would outrank the new ones in rotation).

``ASR_LORA_TEST_PAUSE=POINT@STEP`` (POINT: ``step``, ``eval``, ``checkpoint``) is a test-only hook:
the run writes ``<output_dir>/.test-paused`` and sleeps there, so a test can kill it at that point.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .config import ConfigError, RecipeConfig, to_dict
from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
RUN_META = "asr_lora.json"
LOCK_FILE = ".lock"
# What a run writes into its folder besides step-NNNNNN/ (``--fresh`` sets these aside)
RUN_OUTPUTS = ("best", "final", "metrics.jsonl", "tb", "cer.png", "recipe.yaml", "run_info.json", "demo_summary.json")
TEST_PAUSE_ENV = "ASR_LORA_TEST_PAUSE"  # test-only: "POINT@STEP", see the module docstring
TEST_PAUSE_MARKER = ".test-paused"


class TrainingError(UserError):
    """Training cannot go on (non-finite losses, too many bad rows, a failed checkpoint write)."""


@dataclass
class TrainerState:
    """What a checkpoint needs besides weights and optimizer to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global micro-batch index within the epoch's batch list
    best_cer: float = math.inf
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_updates: int = 0
    bad_rows: int = 0  # distinct training rows found unreadable or invalid so far
    bad_row_ids: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- data order


def length_grouped_batches(durations: list[float], batch_size: int, seed: int, epoch: int,
                           group: int = 50) -> list[list[int]]:
    """Shuffle, then sort by duration inside windows of ``group`` batches, then shuffle the batches.

    Similar lengths share a batch (little padding) while the order stays random. Deterministic
    in (seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(durations)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: durations[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def read_rows(path: str | Path) -> list[dict]:
    """Manifest rows for training/eval, audio made absolute; malformed lines are an error here
    (run ``asr-lora prepare manifest`` first to clean a manifest)."""
    from .data.manifest import BadRow, read_manifest

    rows, bad = [], []
    for row in read_manifest(path):
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        rows.append({"id": row.id or f"{Path(path).stem}-{row.line}", "audio": row.audio, "text": row.text,
                     "duration": row.duration, "offset": row.offset, "end": row.end})
    if bad:
        first = bad[0]
        raise UserError(f"{path}: {len(bad)} bad row(s), first at line {first.line}: {first.reason} "
                        f"{first.detail}; clean it with 'asr-lora prepare manifest {path} --out DIR'")
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def resolve_mixed_precision(requested: str, cuda: bool | None = None,
                            bf16_native: bool | None = None) -> tuple[str, str | None]:
    """``(mode to train in, warning or None)`` for ``train.mixed_precision`` on this machine.

    fp16 and bf16 are GPU modes: without CUDA the run falls back to full precision with a warning,
    so a GPU recipe still runs as a CPU smoke test. bf16 on a GPU without native bf16 (before
    Ampere) is refused: torch would emulate it, slower than fp32; fp16 (with a loss scaler) fits there.
    """
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "no":
        return "no", None
    if not cuda:
        return "no", (f"train.mixed_precision={requested} needs a GPU; no CUDA device here, training in "
                      "full precision (fp32) instead")
    if requested == "bf16":
        if bf16_native is None:
            bf16_native = torch.cuda.is_bf16_supported(including_emulation=False)
        if not bf16_native:
            gpu = f"this GPU ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "this GPU"
            raise ConfigError(f"train.mixed_precision=bf16: {gpu} has no native bf16 (Ampere or newer needed); "
                              "use train.mixed_precision=fp16 (loss-scaled) or no")
    return requested, None


# --------------------------------------------------------------------------- the recipe


class Trainer:
    """LoRA fine-tuning of Whisper with CER evaluation every ``eval_every`` steps."""

    def __init__(self, cfg: RecipeConfig, resume: bool | None = None, progress: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.out = Path(cfg.train.output_dir)
        self.state = TrainerState()
        self._last_saved_step: int | None = None
        self._lock = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from transformers import WhisperProcessor, get_linear_schedule_with_warmup

        from .bundled import resolve_model
        from .data.collator import WhisperCollator
        from .model import build_training_model
        from .trimmed import COLLATOR_PADDING, apply_audio_context

        cfg = self.cfg
        self.mixed_precision, precision_warning = resolve_mixed_precision(cfg.train.mixed_precision)
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=not torch.cuda.is_available())
        acc = self.accelerator
        if precision_warning:
            self.log(f"warning: {precision_warning}")
        if acc.is_main_process:
            self._lock_run_folder()
        self._seed_everything(cfg.train.seed)
        self.train_rows = read_rows(cfg.data.train)
        self.dev_rows = read_rows(cfg.data.dev)
        if cfg.eval.max_samples and cfg.eval.max_samples < len(self.dev_rows):
            pick = sorted(random.Random(cfg.train.seed).sample(range(len(self.dev_rows)), cfg.eval.max_samples))
            self.dev_rows = [self.dev_rows[i] for i in pick]  # fixed subset, same every eval
        self.durations = [r["duration"] or 0.0 for r in self.train_rows]

        model_path = resolve_model(cfg.model.name) if acc.is_main_process else None
        acc.wait_for_everyone()
        model_path = resolve_model(cfg.model.name)
        self.processor = WhisperProcessor.from_pretrained(model_path)
        self.tokenizer = self.processor.tokenizer
        device_map = {"": acc.local_process_index} if cfg.model.quant != "none" and torch.cuda.is_available() else None
        model = build_training_model(cfg.model, cfg.lora, device_map=device_map)  # safetensors only, unless asked
        apply_audio_context(model, cfg.model.audio_context)
        self.n_mels = model.config.num_mel_bins if hasattr(model, "config") else 80
        self.collator = WhisperCollator(self.tokenizer, n_mels=self.n_mels,
                                        padding=COLLATOR_PADDING[cfg.model.audio_context],
                                        max_label_tokens=cfg.data.max_label_tokens,
                                        language=cfg.model.language, task=cfg.model.task,
                                        # log-mel on the GPU, in the data path (never precomputed)
                                        feature_device=acc.device if acc.device.type == "cuda" else None)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, cfg.train.warmup_steps, cfg.train.max_steps)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.trainable = sum(p.numel() for p in params)
        self.total_params = sum(p.numel() for p in model.parameters())

        if acc.is_main_process:
            self._clean_temporaries()
            if self.resume is False:
                self._set_aside_previous_run()
        acc.wait_for_everyone()
        latest = latest_checkpoint(self.out)
        if latest is not None and self.resume is not False:
            self._load_checkpoint(latest)
        elif latest is None and self.resume:
            self.log(f"--resume: no checkpoint in {self.out}; starting from step 0")
        self._resumed_step = self.state.step
        if acc.is_main_process:
            self._write_run_info()
            self._truncate_metrics(self.state.step)
        self.log(f"trainable params: {self.trainable:,} of {self.total_params:,} "
                 f"({100 * self.trainable / self.total_params:.2f}%); {len(self.train_rows)} train rows, "
                 f"{len(self.dev_rows)} dev rows; world size {acc.num_processes}")

    # ---------------------------------------------------------------- train
    def train(self) -> TrainerState:
        from tqdm import tqdm

        cfg, acc, st = self.cfg, self.accelerator, self.state
        accum, world = cfg.train.grad_accum, acc.num_processes
        per_step = accum * world
        bar = tqdm(total=cfg.train.max_steps, initial=st.step, desc="train", unit="step",
                   disable=not (self.progress and acc.is_main_process), dynamic_ncols=True)
        bad_in_a_row = 0
        self.model.train()
        while st.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            micro = self._next_micro_batches(per_step)
            mine = micro[acc.process_index::world]
            batches = [self.collator([self.train_rows[i] for i in idx]) for idx in mine]
            skipped_rows = self._count_bad_rows(batches)
            n_tokens = torch.tensor(sum(int((b["labels"] != -100).sum()) for b in batches if "labels" in b),
                                    device=acc.device)
            total_tokens = int(acc.reduce(n_tokens, reduction="sum")) if world > 1 else int(n_tokens)
            loss_sum = torch.zeros((), device=acc.device)
            for b in batches:
                if "labels" not in b:
                    continue
                loss_sum += self._backward(b, total_tokens, world)
            self._test_pause("step", st.step + 1)
            if world > 1:
                loss_sum = acc.reduce(loss_sum, reduction="sum")
            loss = float(loss_sum) / total_tokens if total_tokens else None
            skip_reason, counts_as_bad = self._update(loss)
            batch_ids = [b["ids"] for b in batches]
            if skip_reason is None:
                bad_in_a_row = 0
            else:
                st.skipped_updates += 1
                bad_in_a_row += counts_as_bad  # a loss-scaler skip at scale > 1 is neither good nor bad
                self.log(f"step {st.step + 1}: {skip_reason}, update skipped (batch ids {batch_ids})")
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    what = "steps with no readable rows" if loss is None else "non-finite steps"
                    raise TrainingError(f"{bad_in_a_row} {what} in a row at step {st.step + 1}; last batch ids "
                                        f"{batch_ids}. Lower train.lr or check the data")
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            st.step += 1
            record = {"step": st.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                      "tokens": total_tokens, "step_seconds": round(time.perf_counter() - t0, 3)}
            if skip_reason is not None:
                record.update(update_skipped=True, skip_reason=skip_reason, skipped_updates=st.skipped_updates)
            if st.bad_rows:
                record["bad_rows"] = st.bad_rows
            if skipped_rows:
                record["skipped_rows"] = [{"id": uid, "reason": reason} for uid, reason in skipped_rows]
            st.history.append({"step": st.step, "loss": loss})
            bar.set_postfix(loss=f"{loss if loss is not None else math.nan:.4f}", lr=f"{record['lr']:.2e}",
                            s_step=f"{record['step_seconds']:.1f}")
            bar.update(1)
            self._append_metrics(record)
            evaluated = None
            if st.step % cfg.train.eval_every == 0 or st.step == cfg.train.max_steps:
                evaluated = self.evaluate()
            if st.step % cfg.train.save_every == 0 or st.step == cfg.train.max_steps:
                self.save_checkpoint(evaluated)
            if evaluated and self._should_stop_early():
                self.log(f"early stopping: no CER improvement in {st.evals_without_improvement} evals")
                break
        bar.close()
        self._save_final()
        return st

    def _backward(self, batch: dict, total_tokens: int, world: int) -> torch.Tensor:
        from .evaluate import token_loss_sum

        acc = self.accelerator
        features = batch["input_features"].to(acc.device)
        labels = batch["labels"].to(acc.device)
        with acc.autocast():
            out = self.model(input_features=features, labels=labels, use_cache=False)
        loss_sum, _ = token_loss_sum(out.logits, labels)
        # DDP averages gradients over processes: scale by world so the result is sum / total tokens.
        acc.backward(loss_sum * world / max(total_tokens, 1))
        return loss_sum.detach()

    def _update(self, loss: float | None) -> tuple[str | None, bool]:
        """Clip and step the optimizer unless the step is bad; ``(reason the update was skipped or
        None, whether the skip counts towards train.max_bad_steps)``.

        Without a loss scaler (fp32, bf16) non-finite gradients are caught here before clipping.
        With fp16's scaler, gradients are scaled and overflow is the scaler's call:
        ``clip_grad_norm_`` unscales them first, and ``optimizer.step()`` skips the update and
        lowers the scale when they hold inf/NaN; we count that skip once, and only towards
        ``max_bad_steps`` when the scale was already <= 1 (then the gradients themselves are bad).
        """
        acc, max_norm = self.accelerator, self.cfg.train.max_grad_norm
        if loss is None:
            return "no readable rows in this step", True
        if not math.isfinite(loss):
            return "non-finite loss", True
        scaler = getattr(acc, "scaler", None)
        if scaler is None:
            if not self._grads_finite():
                return "non-finite gradients", True
            if max_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), max_norm)
            self.optimizer.step()
            return None, False
        scale = float(scaler.get_scale())
        if max_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), max_norm)  # unscales first
        self.optimizer.step()  # scaler.step + scaler.update
        if self.optimizer.step_was_skipped:
            return f"loss scaler found inf/NaN gradients at scale {scale:g}", scale <= 1.0
        return None, False

    def _grads_finite(self) -> bool:
        for p in self.model.parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return False
        return True

    def _next_micro_batches(self, n: int) -> list[list[int]]:
        """The next ``n`` micro-batches of the deterministic epoch order (crossing epochs)."""
        st, out = self.state, []
        while len(out) < n:
            batches = self._epoch_batches(st.epoch)
            take = batches[st.batch_in_epoch:st.batch_in_epoch + n - len(out)]
            out.extend(take)
            st.batch_in_epoch += len(take)
            if st.batch_in_epoch >= len(batches):
                st.epoch += 1
                st.batch_in_epoch = 0
        return out

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        cached = getattr(self, "_batches_cache", None)
        if cached is None or cached[0] != epoch:
            self._batches_cache = (epoch, length_grouped_batches(self.durations, self.cfg.train.batch_size,
                                                                 self.cfg.train.seed, epoch))
        return self._batches_cache[1]

    def _count_bad_rows(self, batches: list[dict]) -> list[tuple[str, str]]:
        """Log and count (once per distinct row) the rows the collator left out; stop past the limit.

        Returns this step's skipped ``(id, reason)`` pairs, from all processes."""
        from accelerate.utils import gather_object

        st, acc = self.state, self.accelerator
        skipped = [tuple(s) for b in batches for s in b["skipped"]]
        if acc.num_processes > 1:  # every process takes the same decisions
            skipped = [tuple(s) for s in gather_object(skipped)]
        known = set(st.bad_row_ids)
        for uid, reason in skipped:
            if uid not in known:
                known.add(uid)
                st.bad_row_ids.append(uid)
                self.log(f"skipped row {uid}: {reason}")
        st.bad_rows = len(st.bad_row_ids)
        limit = self.cfg.train.max_bad_rows
        if st.bad_rows > limit or st.bad_rows >= len(self.train_rows):
            first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
            raise TrainingError(f"{st.bad_rows} of {len(self.train_rows)} training rows are unreadable or invalid "
                                f"(limit train.max_bad_rows={limit}){first}. Fix the data with "
                                f"'asr-lora prepare manifest {self.cfg.data.train} --out DIR'")
        return skipped

    # ---------------------------------------------------------------- evaluate
    def evaluate(self) -> dict:
        """CER/WER/sWER/eval loss on the dev rows (sharded over processes), logged and plotted."""
        from accelerate.utils import gather_object

        from .evaluate import evaluate_rows

        cfg, acc, st = self.cfg, self.accelerator, self.state
        model = acc.unwrap_model(self.model)
        shard = self.dev_rows[acc.process_index::acc.num_processes]
        read = []  # rows the collator could read, per batch

        def collate(rows: list[dict]) -> dict:
            if len(read) == 1:
                self._test_pause("eval", st.step)  # after the first batch: mid-evaluation
            batch = self.collator(rows)
            read.append(len(batch["ids"]))
            return batch

        start, why = time.perf_counter(), "no dev rows"
        try:
            result = evaluate_rows(model, self.tokenizer, collate, shard, batch_size=cfg.eval.batch_size,
                                   language=cfg.model.language, task=cfg.model.task,
                                   max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams,
                                   device=acc.device) if shard else None
        except ValueError as e:
            if sum(read):
                raise
            result, why = None, str(e)  # this shard was unreadable; others may not be: decide together
        if acc.num_processes > 1:
            from .evaluate import EvalResult
            from .metrics import score

            # every process takes part in the gathers, whatever its shard gave (else the others hang)
            mine = result or EvalResult(None, 0.0, time.perf_counter() - start, [], [], [], [])
            triples = gather_object(list(zip(mine.ids, mine.refs, mine.hyps)))
            losses = gather_object([(mine.eval_loss, len(mine.ids))])
            skipped = gather_object(list(mine.skipped) if result else [(str(r.get("id")), why) for r in shard])
            if not triples:
                raise TrainingError(f"step {st.step}: no dev row of {cfg.data.dev} could be read ({why})")
            mine.report = score([t[1] for t in triples], [t[2] for t in triples], ids=[t[0] for t in triples])
            mine.eval_loss = sum(l * n for l, n in losses) / max(sum(n for _, n in losses), 1)
            mine.skipped = skipped
            result = mine
        elif result is None:
            raise TrainingError(f"step {st.step}: no dev row of {cfg.data.dev} could be read ({why})")
        metrics = {"step": st.step, **result.metrics(), "bad_rows": st.bad_rows,
                   "skipped_updates": st.skipped_updates}
        if result.report.cer < st.best_cer:
            st.best_cer, st.best_step = result.report.cer, st.step
            st.evals_without_improvement = 0
        else:
            st.evals_without_improvement += 1
        if acc.is_main_process:
            self._append_metrics(metrics)
            self._print_eval_row(metrics)
            self._plot_cer()
            self._tensorboard(metrics)
        self._last_eval = metrics
        return metrics

    def _should_stop_early(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        return patience > 0 and self.state.evals_without_improvement >= patience

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, metrics: dict | None = None) -> Path | None:
        """Write ``step-NNNNNN/`` atomically, rotate old ones, refresh ``best/``."""
        acc, st = self.accelerator, self.state
        acc.wait_for_everyone()
        target = self.out / f"step-{st.step:06d}"
        error, cause = None, None
        if acc.is_main_process:
            try:
                self._write_checkpoint(target, metrics)
                if metrics is not None and st.best_step == st.step:
                    self._copy_atomic(target, self.out / "best")
                self._rotate()
            except OSError as e:
                error, cause = _write_error(f"checkpoint {target}", e, self.out), e
        self._raise_on_any_process(error, cause)
        self._last_saved_step = st.step
        return target

    def _raise_on_any_process(self, error: str | None, cause: BaseException | None = None) -> None:
        """Raise ``TrainingError(error)`` on every process when the main one failed (no DDP hang)."""
        acc = self.accelerator
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise TrainingError(error) from cause
        acc.wait_for_everyone()

    def _write_checkpoint(self, target: Path, metrics: dict | None) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=self.out))
        try:
            self.accelerator.unwrap_model(self.model).save_pretrained(tmp, safe_serialization=True)
            write_run_meta(tmp, self.cfg)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            self._test_pause("checkpoint", self.state.step)  # test-only: a kill here leaves a half temporary
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            if getattr(self.accelerator, "scaler", None) is not None:  # fp16: the loss scale goes on too
                torch.save(self.accelerator.scaler.state_dict(), tmp / "scaler.pt")
            state = {k: v for k, v in vars(self.state).items() if k != "history"}
            state["best_cer"] = None if math.isinf(state["best_cer"]) else state["best_cer"]
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            (tmp / "metrics.json").write_text(json.dumps(metrics or self._last_train_record(), indent=2))
            _fsync_dir(tmp)
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _copy_atomic(self, src: Path, dst: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=self.out))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            _replace_dir(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _rotate(self) -> None:
        keep = self.cfg.train.keep_last
        steps = sorted(checkpoint_steps(self.out))
        protected = {self.state.best_step}
        for step in steps[:-keep] if keep > 0 else steps:
            if step not in protected:
                _remove_dir(self.out / f"step-{step:06d}")

    def _save_final(self) -> None:
        """Copy the last checkpoint to ``final/`` (saving it first if the loop ended between saves)."""
        acc, st = self.accelerator, self.state
        if self._last_saved_step != st.step:  # e.g. early stopping; same decision on every process
            self.save_checkpoint(None)
        error, cause = None, None
        if acc.is_main_process:
            try:
                self._copy_atomic(self.out / f"step-{st.step:06d}", self.out / "final")
            except OSError as e:
                error, cause = _write_error(f"{self.out / 'final'}", e, self.out), e
        self._raise_on_any_process(error, cause)

    def _load_checkpoint(self, path: Path) -> None:
        """Adapter weights (safetensors), optimizer/scheduler/RNG states (tensors only: a pickle that
        would run code is refused) and trainer state; any failure names the checkpoint."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        try:
            model = self.accelerator.unwrap_model(self.model)
            weights = load_file(path / "adapter_model.safetensors", device=str(self.accelerator.device))
            set_peft_model_state_dict(model, weights)
            self.optimizer.load_state_dict(load_tensors(path / "optimizer.pt", map_location=self.accelerator.device))
            self.scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
            rng = load_tensors(path / "rng.pt")
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and (path / "scaler.pt").is_file():
                scaler.load_state_dict(load_tensors(path / "scaler.pt"))
            state = json.loads((path / TRAINER_STATE).read_text())
            state["best_cer"] = math.inf if state.get("best_cer") is None else state["best_cer"]
            self.state = TrainerState(**{**state, "history": []})
        except UserError as e:
            raise TrainingError(f"cannot resume from {path}: {e}") from e
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise TrainingError(f"cannot resume from {path}: {type(e).__name__}: {e}. Move that folder away to "
                                "resume from the one before it, or start over with --fresh") from e
        self._last_saved_step = self.state.step  # that checkpoint exists: a finished run is not saved again
        self.log(f"resumed from {path} (step {self.state.step})")

    def _set_aside_previous_run(self) -> None:
        """``--fresh`` on a folder that holds a run: move that run's outputs into ``previous-<time>/``
        (nothing is deleted), so its checkpoints can neither be resumed into nor outrank and rotate
        away the new run's."""
        old = [p for p in self.out.iterdir() if p.name in RUN_OUTPUTS or STEP_DIR.match(p.name)]
        if not old:
            return
        stamp, k = time.strftime("previous-%Y%m%d-%H%M%S"), 1
        aside = self.out / stamp
        while aside.exists():
            k += 1
            aside = self.out / f"{stamp}-{k}"
        aside.mkdir()
        for path in sorted(old):
            os.rename(path, aside / path.name)
        self.log(f"--fresh: moved the previous run in {self.out} ({len(old)} entries) to {aside.name}/")

    def _clean_temporaries(self) -> None:
        """Remove what an interrupted run left (temporaries, folders half-way through a replace) and say so."""
        for tmp in sorted(self.out.glob(".*.tmp-*")):
            shutil.rmtree(tmp, ignore_errors=True)
            self.log(f"removed an unfinished checkpoint write: {tmp.name}")
        for old in sorted(p for p in self.out.glob(".*.old") if p.is_dir()):
            live = self.out / old.name[1:-len(".old")]
            if live.exists():
                shutil.rmtree(old, ignore_errors=True)
                self.log(f"removed a replaced folder left by an interrupted run: {old.name}")
            else:  # killed between the two renames of _replace_dir: the old copy is the live one
                os.rename(old, live)
                self.log(f"restored {live.name}/ from {old.name} (an interrupted run was replacing it)")

    def _lock_run_folder(self) -> None:
        """One training run per output folder: an advisory lock the kernel drops if the process dies."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(_write_error(f"run folder {self.out}", e, self.out)) from e
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            return
        self._lock = open(self.out / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise TrainingError(f"{self.out} is in use by another 'asr-lora train' (lock {self.out / LOCK_FILE}); "
                                "wait for it or choose another train.output_dir") from None

    def _test_pause(self, point: str, step: int) -> None:
        """Test-only hook (``ASR_LORA_TEST_PAUSE=POINT@STEP``): mark the spot and wait to be killed."""
        if os.environ.get(TEST_PAUSE_ENV) == f"{point}@{step}" and self.accelerator.is_main_process:
            (self.out / TEST_PAUSE_MARKER).write_text(f"{point}@{step}\n")
            time.sleep(600)

    # ---------------------------------------------------------------- records
    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def _last_train_record(self) -> dict:
        return {"step": self.state.step, "loss": self.state.history[-1]["loss"] if self.state.history else None}

    def _append_metrics(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        path = self.out / "metrics.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as e:
            raise TrainingError(_write_error(str(path), e, self.out)) from e

    def _truncate_metrics(self, step: int) -> None:
        """After a resume, drop records past the checkpoint (they will be written again) and any line
        cut short by a kill."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        records = _metrics_records(path)
        dropped = len([line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                       if line.strip()]) - len(records)
        if dropped:
            self.log(f"dropped {dropped} unreadable line(s) of {path} (cut short by an interrupted run)")
        _write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))

    def eval_records(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return [r for r in _metrics_records(path) if "cer" in r] if path.exists() else []

    def _print_eval_row(self, m: dict) -> None:
        if not getattr(self, "_printed_header", False):
            self.log(f"{'step':>6} {'CER':>7} {'CER-ns':>7} {'WER':>7} {'sWER':>7} {'loss':>7} {'eval s':>7}")
            self._printed_header = True
        self.log(f"{m['step']:>6} {m['cer']:>7.4f} {m['cer_nospace']:>7.4f} {m['wer']:>7.4f} {m['swer']:>7.4f} "
                 f"{m['eval_loss']:>7.4f} {m['eval_seconds']:>7.1f}")

    def _plot_cer(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.eval_records()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in records], [r["cer"] for r in records], marker="o", label="CER")
        ax.plot([r["step"] for r in records], [r["cer_nospace"] for r in records], marker=".", label="CER (no spaces)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("dev error rate")
        ax.set_title("dev CER per checkpoint")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.out / ".cer.png.tmp"
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        os.replace(tmp, self.out / "cer.png")

    def _tensorboard(self, metrics: dict) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        if not hasattr(self, "_tb"):  # purge events past the step we resumed from
            self._tb = SummaryWriter(str(self.out / "tb"), purge_step=self._resumed_step + 1)
        for key in ("cer", "cer_nospace", "wer", "swer", "eval_loss"):
            self._tb.add_scalar(f"dev/{key}", metrics[key], metrics["step"])
        self._tb.flush()

    def _write_run_info(self) -> None:
        """``recipe.yaml`` (the resolved recipe, itself runnable) and ``run_info.json`` (how, where, with what)."""
        from . import __version__
        from .info import device_description, package_versions

        recipe = self.out / "recipe.yaml"
        header = (f"# asr-lora train {recipe}\n# resolved recipe of this run (defaults and overrides applied); "
                  f"relative paths are relative to {os.getcwd()}\n")
        revision, dirty = _git_revision()
        info = {"command": sys.argv, "cwd": os.getcwd(), "seed": self.cfg.train.seed,
                "mixed_precision": self.mixed_precision, "asr_lora": __version__,
                "git_revision": revision, "git_dirty": dirty, "packages": package_versions(),
                "python": platform.python_version(), "platform": platform.platform(),
                "hardware": device_description(), "world_size": self.accelerator.num_processes,
                "resumed_from_step": self.state.step,
                "trainable_parameters": self.trainable, "total_parameters": self.total_params}
        try:
            _write_text_atomic(recipe, header + yaml.safe_dump(to_dict(self.cfg), sort_keys=False, allow_unicode=True))
            _write_text_atomic(self.out / "run_info.json", json.dumps(info, indent=2))
        except OSError as e:
            raise TrainingError(_write_error(f"run records in {self.out}", e, self.out)) from e

    def _seed_everything(self, seed: int) -> None:
        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def cleanup(self) -> None:
        if hasattr(self, "_tb"):
            self._tb.close()
        if hasattr(self, "accelerator"):
            self.accelerator.end_training()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None


def write_run_meta(folder: Path, cfg: RecipeConfig) -> None:
    """``asr_lora.json`` beside the adapter: what later commands must apply without being told."""
    meta = {"base_model": cfg.model.name, "audio_context": cfg.model.audio_context,
            "language": cfg.model.language, "task": cfg.model.task, "quant": cfg.model.quant}
    (folder / RUN_META).write_text(json.dumps(meta, indent=2))


def checkpoint_steps(out: Path) -> list[int]:
    """Steps of the complete ``step-NNNNNN`` folders, ascending (temporaries are hidden and never match)."""
    if not out.is_dir():
        return []
    return sorted(int(m.group(1)) for p in out.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
                  and (p / TRAINER_STATE).is_file())


def latest_checkpoint(out: Path) -> Path | None:
    steps = checkpoint_steps(out)
    return out / f"step-{max(steps):06d}" if steps else None


def load_tensors(path: Path, map_location=None):
    """``torch.load`` that only accepts tensors and plain containers: a pickle that would build
    arbitrary objects (and so could run code) is refused with a ``UserError`` naming the file."""
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as e:  # torch's long message; keep the line that names the culprit
        lines = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        why = f": {lines[0].strip()}" if lines else ""
        raise UserError(f"{path} holds more than tensors and was not loaded (it could run code){why}") from None


def _metrics_records(path: Path) -> list[dict]:
    """The JSON objects of ``metrics.jsonl``; lines that do not parse (cut by a kill) are left out."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _write_error(what: str, error: OSError, out: Path) -> str:
    """One line for a failed write: what, why, and that earlier checkpoints are intact."""
    reason = error.strerror or str(error)
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EACCES: "fix the permissions", errno.EPERM: "fix the permissions",
            errno.EROFS: "choose a writable train.output_dir"}.get(error.errno, "fix the cause")
    return (f"could not write {what}: {reason}. Earlier checkpoints in {out} are intact; {hint}, then run "
            "the same command again with --resume")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing it: at every moment one complete copy exists under
    ``dst`` or ``.<dst>.old`` (which :meth:`Trainer._clean_temporaries` puts back after a kill)."""
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint folder so that a kill half-way never leaves a partial ``step-*``: rename it
    to a hidden temporary first."""
    doomed = path.with_name(f".{path.name}.tmp-delete")
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _git_revision() -> tuple[str | None, bool | None]:
    """``(commit, whether the package's working tree has uncommitted changes)``, or Nones outside git."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=here,
                              timeout=30).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def run_training(cfg: RecipeConfig, resume: bool | None = None, progress: bool = True) -> Trainer:
    """setup -> train -> cleanup; returns the trainer (state, output folder)."""
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer
