"""The training recipe: setup / train / evaluate / save_checkpoint / cleanup.

An explicit loop on ``accelerate``. Steps are optimizer steps; evaluation and checkpoints are keyed
to them. The loss of one optimizer step is the sum of token losses over all its micro-batches (and
all processes) divided by the total label-token count, so (batch 8, accum 1) and (batch 2, accum 4)
give the same update.

The run folder (``train.output_dir``) is :class:`asr_lora.runfolder.RunFolder`; a checkpoint
``step-000100/`` holds adapter_model.safetensors, adapter_config.json, trainer_state.json,
optimizer.pt, scheduler.pt, rng.pt (scaler.pt with fp16), metrics.json and the settings file
(:mod:`asr_lora.settings`).
Metrics go to ``metrics.jsonl`` and to the trackers of ``train.report_to`` (accelerate's tracker
API; TensorBoard in ``tb/`` by default): training loss, learning rate, step seconds, tokens/s and
every evaluation metric.

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

import math
import os
import pickle
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .config import ConfigError, EvalConfig, RecipeConfig, TrainConfig, to_dict
from .data.augment import apply_spec_augment, host_rng_state, restore_host_rng_state, wave_augment
from .data.collator import UNSURE_INDEX, WhisperCollator
from .data.loader import next_batches
from .errors import TrainingError, UserError
from .runfolder import TRAINER_STATE, RunFolder, latest_checkpoint, step_name

TEST_PAUSE_ENV = "ASR_LORA_TEST_PAUSE"  # test-only: "POINT@STEP", see the module docstring
TEST_PAUSE_MARKER = ".test-paused"
BEST_KEYS = ("cer", "nonspeech_share", "guard_wer", "longform_cer", "longfile_cer")  # what train.select_best
# compares, kept in TrainerState
GUARD_PREFIX = "guard-"  # eval/guard-step-NNNNNN.jsonl: the guard set's utterances of each evaluation
LONGFORM_PREFIX = "longform-"  # eval/longform-step-NNNNNN.jsonl: the long-form probe's inputs and file
LONGFORM_KEYS = ("longform_cer", "longform_deletion_rate", "longfile_cer", "longfile_deletion_rate")
EVAL_HEADER = f"{'step':>6} {'CER':>7} {'CER-ns':>7} {'WER':>7} {'sWER':>7} {'loss':>7} {'eval s':>7}"


@dataclass
class TrainerState:
    """What a checkpoint needs besides weights and optimizer to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global micro-batch index within the epoch's batch list
    best_cer: float = math.inf
    best_step: int | None = None
    best_metrics: dict = field(default_factory=dict)  # the best checkpoint's BEST_KEYS (train.select_best)
    evals_without_improvement: int = 0
    skipped_updates: int = 0
    bad_rows: int = 0  # distinct training rows found unreadable or invalid so far
    bad_row_ids: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- loss


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over label tokens (-100 ignored) and the number of tokens counted. A label
    of ``UNSURE_INDEX`` targets the uniform distribution over the vocabulary (the cross-entropy to it is
    ``logsumexp(z) - mean(z)``): a forced non-speech row learns to be unsure of any text."""
    logits = logits.float()
    unsure = labels == UNSURE_INDEX
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels.masked_fill(unsure, -100).reshape(-1), ignore_index=-100,
                                             reduction="sum")
    if unsure.any():
        z = logits[unsure]
        loss = loss + (z.logsumexp(-1) - z.mean(-1)).sum()
    return loss, int((labels != -100).sum())


def resolve_mixed_precision(requested: str, cuda: bool | None = None,
                            bf16_native: bool | None = None) -> tuple[str, str | None]:
    """``(mode to train in, warning or None)`` for ``train.mixed_precision`` on this machine.

    fp16 and bf16 are GPU modes: without CUDA the run falls back to full precision with a warning,
    so a GPU recipe still runs as a CPU smoke test. bf16 on a GPU without native bf16 (before
    Ampere) is refused: torch would emulate it, slower than fp32; fp16 (with a loss scaler) fits there.
    """
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


def trackers(report_to: list[str], out: Path) -> list:
    """accelerate trackers for ``train.report_to``: TensorBoard writes to ``out/tb``."""
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker("tb", logging_dir=str(out)) if name == "tensorboard" else name
            for name in report_to if name != "none"]


# --------------------------------------------------------------------------- the recipe


class Trainer:
    """LoRA fine-tuning of Whisper with CER evaluation every ``eval_every`` steps."""

    def __init__(self, cfg: RecipeConfig, resume: bool | None = None, progress: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.out = Path(cfg.train.output_dir)
        self.run = RunFolder(self.out, log=self.log)
        self.state = TrainerState()
        self._last_saved_step: int | None = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from transformers import WhisperProcessor, get_linear_schedule_with_warmup

        from .backends import DecodeOptions
        from .bundled import resolve_model
        from dataclasses import replace

        from .data.concat import concatenation, trained_on
        from .data.manifest import read_rows, training_rows
        from .evaluate import LongformProbe
        from .model import build_training_model, trainable_parameters
        from .settings import settings_from_recipe
        from .trimmed import apply_audio_context, feature_padding

        cfg = self.cfg
        self.mixed_precision, precision_warning = resolve_mixed_precision(cfg.train.mixed_precision)
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=not torch.cuda.is_available(),
                                       log_with=trackers(cfg.train.report_to, self.out) or None)
        acc = self.accelerator
        if precision_warning:
            self.log(f"warning: {precision_warning}")
        if acc.is_main_process:
            self.run.open(fresh=self.resume is False)
        seed_everything(cfg.train.seed)
        self.train_rows, self.dev_rows = training_rows(cfg)
        self.guard_rows = read_rows(cfg.data.guard)[0] if cfg.data.guard else []
        self.longform = LongformProbe.from_rows(read_rows(cfg.data.dev)[0], cfg.eval.longform_rows,
                                                cfg.eval.longform_seconds, cfg.eval.longform_pause) \
            if cfg.eval.longform_rows else None

        model_path = resolve_model(cfg.model.name) if acc.is_main_process else None
        acc.wait_for_everyone()
        model_path = resolve_model(cfg.model.name)
        self.tokenizer = WhisperProcessor.from_pretrained(model_path).tokenizer
        device_map = {"": acc.local_process_index} if cfg.model.quant != "none" and torch.cuda.is_available() else None
        model = build_training_model(cfg.model, cfg.lora, device_map=device_map)  # safetensors only, unless asked
        apply_audio_context(model, cfg.model.audio_context)
        apply_spec_augment(model, cfg.augment)  # train mode only; eval/generation never mask
        self.concat = concatenation(self.train_rows, cfg.data, cfg.train.seed)  # multi-utterance inputs
        self.settings = replace(settings_from_recipe(cfg), trained_on=trained_on(self.train_rows, self.concat))
        self.eval_options = DecodeOptions(language=cfg.model.language, task=cfg.model.task,
                                          max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams,
                                          bound_by_reference=True, temperatures=(0.0,))
        padding, multiple = feature_padding(cfg.model.audio_context)
        self.collator = WhisperCollator(self.tokenizer, n_mels=model.config.num_mel_bins, padding=padding,
                                        pad_to_multiple_of=multiple, max_label_tokens=cfg.data.max_label_tokens,
                                        language=cfg.model.language, task=cfg.model.task, augment=wave_augment(cfg),
                                        # log-mel on the GPU, in the data path (never precomputed)
                                        feature_device=acc.device if acc.device.type == "cuda" else None,
                                        timestamp_probability=cfg.train.timestamp_probability,
                                        prompt_probability=cfg.train.prompt_probability,
                                        nonspeech_forced_probability=cfg.train.nonspeech_forced_probability,
                                        seed=cfg.train.seed)
        self.trainable, self.total_params = trainable_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, cfg.train.warmup_steps, cfg.train.max_steps)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)

        acc.wait_for_everyone()
        latest = latest_checkpoint(self.out)
        if latest is not None and self.resume is not False:
            self.state = restore_checkpoint(latest, acc, self.model, self.optimizer, self.scheduler)
            self._last_saved_step = self.state.step  # that checkpoint exists: a finished run is not saved again
            self.log(f"resumed from {latest} (step {self.state.step})")
        elif latest is None and self.resume:
            self.log(f"--resume: no checkpoint in {self.out}; starting from step 0")
        if acc.is_main_process:
            self.run.write_run_info(*run_records(cfg, self, self.out))
            self.run.truncate_metrics(self.state.step)
        for tracker in acc.log_with:  # events past the step we resumed from are replaced
            if getattr(tracker, "name", None) == "tensorboard":
                tracker.init_kwargs["purge_step"] = self.state.step + 1
        acc.init_trackers("asr-lora", config=flat_config(cfg), init_kwargs={"wandb": {"name": self.out.name}})
        if self.longform is not None:
            self.log(self.longform.describe())
        self.log(f"trainable params: {self.trainable:,} of {self.total_params:,} "
                 f"({100 * self.trainable / self.total_params:.2f}%); {len(self.train_rows)} train rows, "
                 f"{len(self.dev_rows)} dev rows; world size {acc.num_processes}")

    # ---------------------------------------------------------------- train
    def train(self) -> TrainerState:
        from tqdm import tqdm

        cfg, acc, st = self.cfg, self.accelerator, self.state
        accum, world = cfg.train.grad_accum, acc.num_processes
        bar = tqdm(total=cfg.train.max_steps, initial=st.step, desc="train", unit="step",
                   disable=not (self.progress and acc.is_main_process), dynamic_ncols=True)
        bad_in_a_row = 0
        if cfg.eval.zero_shot and st.step == 0:
            self.evaluate(zero_shot=True)
        self.model.train()
        loader = self._micro_batches()
        while st.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            step_batches, st.epoch, st.batch_in_epoch = self.plan.take(st.epoch, st.batch_in_epoch, accum * world)
            batches = next_batches(loader, step_batches[acc.process_index::world])
            data_seconds = time.perf_counter() - t0
            skipped_rows = self._count_bad_rows(batches)
            n_tokens = torch.tensor(sum(int((b["labels"] != -100).sum()) for b in batches if "labels" in b),
                                    device=acc.device)
            total_tokens = int(acc.reduce(n_tokens, reduction="sum")) if world > 1 else int(n_tokens)
            loss_sum = torch.zeros((), device=acc.device)
            with acc.no_sync(self.model):  # gradients stay local: one sync per step, below
                for b in batches:
                    if "labels" in b:
                        loss_sum += self._backward(b, total_tokens)
            self._test_pause("step", st.step + 1)
            if world > 1:
                sum_gradients(acc, self.model)
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
            seconds = time.perf_counter() - t0
            record = {"step": st.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                      "tokens": total_tokens, "step_seconds": round(seconds, 3), "data_seconds": round(data_seconds, 3)}
            if skip_reason is not None:
                record.update(update_skipped=True, skip_reason=skip_reason, skipped_updates=st.skipped_updates)
            if st.bad_rows:
                record["bad_rows"] = st.bad_rows
            if skipped_rows:
                record["skipped_rows"] = [{"id": uid, "reason": reason} for uid, reason in skipped_rows]
            st.history.append({"step": st.step, "loss": loss})
            bar.set_postfix(loss=f"{loss if loss is not None else math.nan:.4f}", lr=f"{record['lr']:.2e}",
                            s_step=f"{seconds:.1f}")
            bar.update(1)
            self._record(record, {"train/loss": loss, "train/lr": record["lr"], "train/step_seconds": seconds,
                                  "train/tokens_per_second": total_tokens / seconds})
            evaluated = None
            if st.step % cfg.train.eval_every == 0 or st.step == cfg.train.max_steps:
                evaluated = self.evaluate()
            if st.step % cfg.train.save_every == 0 or st.step == cfg.train.max_steps:
                self.save_checkpoint(evaluated)
            if evaluated and self._should_stop_early():
                self.log(f"early stopping: no new best checkpoint in {st.evals_without_improvement} evals")
                break
        bar.close()
        del loader  # stops its workers
        self._save_final()
        return st

    def _backward(self, batch: dict, total_tokens: int) -> torch.Tensor:
        acc = self.accelerator
        features = batch["input_features"].to(acc.device, non_blocking=True)  # pinned by the loader on a GPU
        labels = batch["labels"].to(acc.device, non_blocking=True)
        mask = batch["attention_mask"].to(acc.device, non_blocking=True)  # each clip's real frames, for SpecAugment
        with acc.autocast():
            out = self.model(input_features=features, attention_mask=mask, **decoder_inputs(batch, acc.device))
        loss_sum, _ = token_loss_sum(out.logits, labels)
        # sum_gradients adds up the processes' gradients: the result is sum / total tokens of the step
        acc.backward(loss_sum / max(total_tokens, 1))
        return loss_sum.detach()

    def _update(self, loss: float | None) -> tuple[str | None, bool]:
        """Clip and step unless the step is bad; ``(why the update was skipped or None, whether that
        counts towards train.max_bad_steps)``. Without a loss scaler (fp32, bf16) non-finite gradients
        are caught before clipping. With fp16's scaler overflow is the scaler's call (it skips the update
        and lowers the scale); that counts towards ``max_bad_steps`` only at a scale <= 1."""
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
        return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.model.parameters())

    def _micro_batches(self):
        """This process's collated micro-batches from the current position up to train.max_steps, made
        in the loop or by background workers (train.num_workers)."""
        from .data.loader import micro_batches, resolve_num_workers
        from .data.samplers import BatchPlan

        cfg, acc, st = self.cfg.train, self.accelerator, self.state
        self.plan = BatchPlan.for_rows(self.train_rows, cfg, self.cfg.model.audio_context, self.concat)
        workers, steps = resolve_num_workers(cfg.num_workers, acc.device), cfg.max_steps - st.step
        order = self.plan.rank_epoch_batches(st.epoch, st.batch_in_epoch, cfg.grad_accum * acc.num_processes, steps,
                                       acc.process_index, acc.num_processes)
        self.log(f"{self.plan}; loaded {f'by {workers} worker processes each' if workers else 'in the loop'}")
        return micro_batches(self.train_rows, self.collator, order, steps * cfg.grad_accum, workers,
                             pin_memory=acc.device.type == "cuda", concat=self.concat)

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
    @torch.no_grad()
    def evaluate(self, zero_shot: bool = False) -> dict:
        """CER/WER/sWER/dev loss on the dev rows (sharded over processes) through the same decode path
        as ``asr-lora eval``; recorded, printed, plotted and sent to the trackers. ``zero_shot``: the
        untouched base (LoRA starts as a no-op) in its native 30 s context, before any step."""
        from contextlib import nullcontext
        from dataclasses import replace

        from .backends import HFTranscriber, column_major_decoder
        from .evaluate import NothingToEvaluate, evaluate_rows
        from .trimmed import apply_audio_context

        cfg, acc, st = self.cfg, self.accelerator, self.state
        model, context = acc.unwrap_model(self.model), "full" if zero_shot else cfg.model.audio_context
        # zero-shot: the base, in its own 30 s context, trained on nothing of this run
        settings = replace(self.settings, audio_context=context, trained_on=None if zero_shot else
                           self.settings.trained_on)
        transcriber = HFTranscriber(apply_audio_context(model, context), self.tokenizer, settings,
                                    self.eval_options, "training")
        shard = self.dev_rows[acc.process_index::acc.num_processes]
        start, result, why = time.perf_counter(), None, "no dev rows"
        restore_layout = column_major_decoder(model)  # faster decoding steps on a CPU; training's layout after
        # zero-shot: the base itself, not the base plus adapters that add nothing yet (their cost, on 30 s input)
        base_only = model.disable_adapter() if zero_shot and hasattr(model, "disable_adapter") else nullcontext()
        try:
            with base_only:
                guard, guard_lines = evaluate_guard(transcriber, self.guard_rows, cfg.data.guard_language, acc,
                                                    cfg.eval)
                try:
                    result = evaluate_rows(transcriber, shard, batch_size=cfg.eval.batch_size, loss=self._eval_loss,
                                           before_batch=lambda k: k == 1 and self._test_pause("eval", st.step))
                except NothingToEvaluate as e:
                    why = str(e)  # this shard was unreadable; others may not be: decide together
                # every process, whatever its shard gave: the probe's metrics are broadcast to all
                longform, longform_lines = self._longform(transcriber)
        finally:
            restore_layout()
            apply_audio_context(model, cfg.model.audio_context)
        if acc.num_processes > 1:
            result = gather_results(result, shard, why)
        if result is None:
            raise TrainingError(f"step {st.step}: no dev row of {cfg.data.dev} could be read ({why})")
        result.seconds = time.perf_counter() - start
        metrics = {"step": st.step, **result.metrics(), **guard, **longform, "bad_rows": st.bad_rows,
                   "skipped_updates": st.skipped_updates}
        if zero_shot:
            metrics["zero_shot"] = True
        elif note := update_best(st, metrics, cfg.train):
            self.log(f"step {st.step}: {note}")
        self._record(metrics, {f"dev/{k}": metrics.get(k) for k in ("cer", "cer_nospace", "wer", "swer", "eval_loss",
                                                                    "nonspeech_share", "guard_wer", "guard_cer",
                                                                    *LONGFORM_KEYS)})
        if acc.is_main_process:
            self.run.write_eval_utterances(st.step, result.utterances())
            if guard_lines:
                self.run.write_eval_utterances(st.step, guard_lines, prefix=GUARD_PREFIX)
            if longform_lines:
                self.run.write_eval_utterances(st.step, longform_lines, prefix=LONGFORM_PREFIX)
            self._print_eval_row(metrics)
            self.run.plot_cer()
        return metrics

    def _longform(self, transcriber) -> tuple[dict, list[dict]]:
        """The long-form probe (``eval.longform_rows``) with the evaluation's model: each joined input
        decoded whole with the evaluation's options (a cap that fits the input), the file decoded as
        ``asr-lora transcribe`` decodes it (its options: fallback, silence rule, completeness guard).
        Decoded on the main process, the metrics sent to the others; ``({}, [])`` without a probe."""
        from dataclasses import replace

        from .backends import DecodeOptions, HFTranscriber
        from .defaults import TRANSCRIBE_MAX_NEW_TOKENS
        from .evaluate import score_longform

        acc, cfg = self.accelerator, self.cfg
        if self.longform is None:
            return {}, []
        out: list = [({}, [])]
        if acc.is_main_process:
            whole = HFTranscriber(transcriber.model, transcriber.tokenizer, transcriber.settings,
                                  replace(transcriber.options, max_new_tokens=TRANSCRIBE_MAX_NEW_TOKENS), "long-form")
            file = HFTranscriber(transcriber.model, transcriber.tokenizer, transcriber.settings,
                                 DecodeOptions(language=cfg.model.language, task=cfg.model.task), "long-form file")
            out = [score_longform(self.longform, whole, file)]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            out = broadcast_object_list(out)
        return out[0][0], (out[0][1] if acc.is_main_process else [])

    def _eval_loss(self, encoded, rows: list) -> tuple[torch.Tensor, int]:
        """Teacher-forced dev loss on the encoder outputs of one evaluation batch."""
        ids = [self.collator.row_label(r)[: self.cfg.data.max_label_tokens - 1] for r in rows]
        width = max(len(i) for i in ids)
        labels = torch.tensor([i + [-100] * (width - len(i)) for i in ids], device=self.accelerator.device)
        out = self.accelerator.unwrap_model(self.model)(encoder_outputs=encoded, labels=labels, use_cache=False)
        return token_loss_sum(out.logits, labels)

    def _should_stop_early(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        return patience > 0 and self.state.evals_without_improvement >= patience

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, metrics: dict | None = None) -> Path:
        """Write ``step-NNNNNN/`` atomically, rotate old ones, refresh ``best/``."""
        acc, st = self.accelerator, self.state
        acc.wait_for_everyone()
        error, cause = None, None
        if acc.is_main_process:
            try:
                self.run.save_step(st.step, lambda folder: self._write_checkpoint(folder, metrics),
                                   best=metrics is not None and st.best_step == st.step,
                                   keep_last=self.cfg.train.keep_last, protect=st.best_step)
            except TrainingError as e:
                error, cause = str(e), e
        self._raise_on_any_process(error, cause)
        self._last_saved_step = st.step
        return self.out / step_name(st.step)

    def _write_checkpoint(self, folder: Path, metrics: dict | None) -> None:
        from .atomic import write_json_atomic
        from .settings import write_settings

        # no embedding layers are trained: say so, or peft looks for the base's config to check the vocabulary
        self.accelerator.unwrap_model(self.model).save_pretrained(folder, safe_serialization=True,
                                                                   save_embedding_layers=False)
        write_settings(folder, self.settings)
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        self._test_pause("checkpoint", self.state.step)  # test-only: a kill here leaves a half temporary
        torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
        rng = {"torch": torch.get_rng_state(), **host_rng_state()}  # numpy's: SpecAugment's masks
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, folder / "rng.pt")
        if getattr(self.accelerator, "scaler", None) is not None:  # fp16: the loss scale goes on too
            torch.save(self.accelerator.scaler.state_dict(), folder / "scaler.pt")
        state = {k: v for k, v in vars(self.state).items() if k != "history"}
        state["best_cer"] = None if math.isinf(state["best_cer"]) else state["best_cer"]
        write_json_atomic(folder / TRAINER_STATE, state)
        last = self.state.history[-1]["loss"] if self.state.history else None
        write_json_atomic(folder / "metrics.json", metrics or {"step": self.state.step, "loss": last})

    def _save_final(self) -> None:
        """Copy the last checkpoint to ``final/`` (saving it first if the loop ended between saves)."""
        acc, st = self.accelerator, self.state
        if self._last_saved_step != st.step:  # e.g. early stopping; same decision on every process
            self.save_checkpoint(None)
        error, cause = None, None
        if acc.is_main_process:
            try:
                self.run.finalize(st.step)
            except TrainingError as e:
                error, cause = str(e), e
        self._raise_on_any_process(error, cause)

    def _raise_on_any_process(self, error: str | None, cause: BaseException | None = None) -> None:
        """Raise ``TrainingError(error)`` on every process when the main one failed (no DDP hang)."""
        acc = self.accelerator
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise TrainingError(error) from cause
        acc.wait_for_everyone()

    # ---------------------------------------------------------------- records
    def _record(self, record: dict, scalars: dict) -> None:
        """A metrics.jsonl line (main process) and the trackers' scalars (None values left out)."""
        if self.accelerator.is_main_process:
            self.run.append_metrics(record)
        self.accelerator.log({k: v for k, v in scalars.items() if v is not None}, step=record["step"])

    def eval_records(self) -> list[dict]:
        return self.run.eval_records()
    def _print_eval_row(self, m: dict) -> None:
        if not getattr(self, "_printed_header", False):
            self.log(EVAL_HEADER)
            self._printed_header = True
        self.log(f"{m['step']:>6} {m['cer']:>7.4f} {m['cer_nospace']:>7.4f} {m['wer']:>7.4f} {m['swer']:>7.4f} "
                 f"{m['eval_loss']:>7.4f} {m['eval_seconds']:>7.1f}")

    def log(self, message: str) -> None:
        if not hasattr(self, "accelerator") or self.accelerator.is_main_process:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def _test_pause(self, point: str, step: int) -> None:
        """Test-only hook (``ASR_LORA_TEST_PAUSE=POINT@STEP``): mark the spot and wait to be killed."""
        if os.environ.get(TEST_PAUSE_ENV) == f"{point}@{step}" and self.accelerator.is_main_process:
            (self.out / TEST_PAUSE_MARKER).write_text(f"{point}@{step}\n")
            time.sleep(600)

    def cleanup(self) -> None:
        if hasattr(self, "accelerator"):
            self.accelerator.end_training()
        self.run.close()


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Python's, numpy's (SpecAugment's masks) and torch's global RNGs."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def decoder_inputs(batch: dict, device) -> dict:
    """What the decoder reads: the batch's own ``decoder_input_ids`` where the collator gave them (a
    ``<|startofprev|>`` prompt, a forced non-speech row: the model's shift of the labels would differ),
    else the labels, which the model shifts right. The loss is always :func:`token_loss_sum`'s."""
    ids = batch.get("decoder_input_ids")
    if ids is None:
        return {"labels": batch["labels"].to(device, non_blocking=True), "use_cache": False}
    return {"decoder_input_ids": ids.to(device, non_blocking=True), "use_cache": False}


def sum_gradients(acc, model) -> None:
    """Sum the trainable gradients over all processes in one all-reduce: the step's one gradient sync
    (its backward passes ran under ``no_sync``). A process whose micro-batches were all unreadable
    adds zeros and still joins, so no process waits for another that skipped a backward pass."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TrainingError(f"multi-process training supports DDP (accelerate launch --multi_gpu, torchrun); "
                            f"got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    flat = acc.reduce(flat, reduction="sum")
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype)


def gather_results(result, shard: list, why: str):
    """The evaluation results of all processes, scored together (None when no process read a row).
    Every process joins the gathers, whatever its shard gave: one that skipped them would hang the rest."""
    from accelerate.utils import gather_object

    from .evaluate import NothingToEvaluate, scored

    utterances = gather_object(result.utterances_in + result.nonspeech if result else [])
    skipped = gather_object(result.skipped if result else [{"id": r.id, "reason": why} for r in shard])
    losses = gather_object([(result.eval_loss or 0.0, result.report.n) if result else (0.0, 0)])
    n = sum(k for _, k in losses)
    try:
        return scored(utterances, skipped, eval_loss=sum(l * k for l, k in losses) / max(n, 1))
    except NothingToEvaluate:
        return None


def evaluate_guard(transcriber, rows: list, language: str, acc, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """Decode the guard set (``data.guard``) with ``language`` forced, with the dev evaluation's model,
    audio context and decoding options, each process its shard (every process joins the gathers).

    Returns ``guard_wer``, ``guard_cer``, ``guard_n``, ``guard_skipped`` and the utterance lines, or
    ``({}, [])`` without guard rows. Scored by :func:`asr_lora.metrics.score` like dev: its normaliser
    (NFKC, lower case, punctuation and symbols removed, spaces collapsed) suits English WER too."""
    from dataclasses import replace

    from .backends import HFTranscriber
    from .evaluate import NothingToEvaluate, evaluate_rows

    if not rows:
        return {}, []
    guard = HFTranscriber(transcriber.model, transcriber.tokenizer, transcriber.settings,
                          replace(transcriber.options, language=language), f"guard ({language})")
    shard, result, why = rows[acc.process_index::acc.num_processes], None, "no guard rows"
    try:
        result = evaluate_rows(guard, shard, batch_size=cfg.batch_size)
    except NothingToEvaluate as e:
        why = str(e)
    if acc.num_processes > 1:
        result = gather_results(result, shard, why)
    if result is None:
        raise TrainingError(f"no row of the guard set (data.guard) could be read ({why})")
    r = result.report
    metrics = {"guard_wer": r.wer, "guard_cer": r.cer, "guard_n": r.n, "guard_skipped": len(result.skipped)}
    return metrics, result.utterances()


def limit_breaches(metrics: dict, cfg: TrainConfig) -> list[str]:
    """The limits of ``train.select_best=cer_guarded`` that an evaluation does not meet, as text. A
    limit applies to what was measured: without data.nonspeech_dev (data.guard) there is no
    nonspeech_share (guard_wer) and its limit does not apply."""
    out = []
    for key, limit in (("nonspeech_share", cfg.max_nonspeech_share), ("guard_wer", cfg.max_guard_wer)):
        value = metrics.get(key)
        if limit is not None and value is not None and value > limit:
            out.append(f"{key} {value:.4g} > {limit:g}")
    return out


def is_better(metrics: dict, best: dict, cfg: TrainConfig) -> bool:
    """Whether the evaluation ``metrics`` makes a better checkpoint than ``best`` (the best one's
    :data:`BEST_KEYS`; empty: there is none yet) under ``train.select_best``.

    ``cer``: a lower dev CER. ``cer_guarded``: within ``train.max_nonspeech_share`` and
    ``train.max_guard_wer`` beats outside them; then a lower dev CER; at equal CER a lower non-speech
    share. So while no checkpoint is within the limits the lowest CER is best, and the first one
    within them replaces it whatever its CER."""
    if not best:
        return True
    if cfg.select_best in ("cer", "longform"):
        return selected_cer(metrics, cfg) < selected_cer(best, cfg)

    def rank(m: dict) -> tuple:
        return bool(limit_breaches(m, cfg)), selected_cer(m, cfg), m.get("nonspeech_share") or 0.0

    return rank(metrics) < rank(best)


def selected_cer(metrics: dict, cfg: TrainConfig) -> float:
    """The CER ``train.select_best`` ranks by: dev CER, or for ``longform*`` the long-form probe's (the
    mean of ``longform_cer`` and ``longfile_cer``; dev CER for a record without them)."""
    probe = [metrics.get(k) for k in ("longform_cer", "longfile_cer") if metrics.get(k) is not None]
    if cfg.select_best.startswith("longform") and probe:
        return sum(probe) / len(probe)
    return metrics["cer"]


def update_best(st: TrainerState, metrics: dict, cfg: TrainConfig) -> str | None:
    """Make the evaluation ``metrics`` of step ``st.step`` the best checkpoint when :func:`is_better`,
    else count an evaluation without improvement (early stopping follows what best means). Returns
    a line to log when ``cer_guarded`` met an evaluation outside its limits, else None."""
    best = st.best_metrics or ({"cer": st.best_cer} if st.best_step is not None else {})  # older states: CER
    better = is_better(metrics, best, cfg)
    if better:
        st.best_cer, st.best_step, st.evals_without_improvement = metrics["cer"], st.step, 0
        st.best_metrics = {k: metrics.get(k) for k in BEST_KEYS}
    else:
        st.evals_without_improvement += 1
    breaches = limit_breaches(metrics, cfg) if cfg.select_best.endswith("_guarded") else []
    if not breaches:
        return None
    if better:
        return (f"no checkpoint within the limits yet ({', '.join(breaches)}): best/ is the lowest dev CER, "
                f"{metrics['cer']:.4f}")
    if metrics["cer"] < best["cer"]:
        return (f"dev CER {metrics['cer']:.4f} is below the best checkpoint's ({best['cer']:.4f}, step "
                f"{st.best_step}) but outside the limits ({', '.join(breaches)}): not best")
    return None


def restore_checkpoint(path: Path, acc, model, optimizer, scheduler) -> TrainerState:
    """Load a checkpoint into the prepared model/optimizer/scheduler: adapter weights (safetensors),
    optimizer/scheduler/RNG states (tensors only: a pickle that would run code is refused); returns
    its trainer state. Any failure is a ``TrainingError`` naming the checkpoint."""
    import json

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        weights = load_file(path / "adapter_model.safetensors", device=str(acc.device))
        set_peft_model_state_dict(acc.unwrap_model(model), weights)
        optimizer.load_state_dict(load_tensors(path / "optimizer.pt", map_location=acc.device))
        scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
        rng = load_tensors(path / "rng.pt")
        torch.set_rng_state(rng["torch"])
        restore_host_rng_state(rng)
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        scaler = getattr(acc, "scaler", None)
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(load_tensors(path / "scaler.pt"))
        state = json.loads((path / TRAINER_STATE).read_text())
        state["best_cer"] = math.inf if state.get("best_cer") is None else state["best_cer"]
        return TrainerState(**{**state, "history": []})
    except UserError as e:
        raise TrainingError(f"cannot resume from {path}: {e}") from e
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise TrainingError(f"cannot resume from {path}: {type(e).__name__}: {e}. Move that folder away to "
                            "resume from the one before it, or start over with --fresh") from e


def load_tensors(path: Path, map_location=None):
    """``torch.load`` that only accepts tensors and plain containers: a pickle that would build
    arbitrary objects (and so could run code) is refused with a ``UserError`` naming the file."""
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as e:  # torch's long message; keep the line that names the culprit
        lines = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        why = f": {lines[0].strip()}" if lines else ""
        raise UserError(f"{path} holds more than tensors and was not loaded (it could run code){why}") from None


def flat_config(cfg: RecipeConfig) -> dict:
    """The recipe as ``section.key`` scalars, for trackers' hyperparameter tables."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def run_records(cfg: RecipeConfig, trainer: Trainer, out: Path) -> tuple[str, dict]:
    """``recipe.yaml`` text (the resolved recipe, itself runnable) and ``run_info.json`` (how, where, with what)."""
    from . import __version__
    from .info import device_description, package_versions

    header = (f"# asr-lora train {out / 'recipe.yaml'}\n# resolved recipe of this run (defaults and overrides "
              f"applied); relative paths are relative to {os.getcwd()}\n")
    revision, dirty = git_revision()
    info = {"command": sys.argv, "cwd": os.getcwd(), "seed": cfg.train.seed,
            "mixed_precision": trainer.mixed_precision, "asr_lora": __version__,
            "git_revision": revision, "git_dirty": dirty, "packages": package_versions(),
            "python": platform.python_version(), "platform": platform.platform(),
            "hardware": device_description(), "world_size": trainer.accelerator.num_processes,
            "resumed_from_step": trainer.state.step,
            "trainable_parameters": trainer.trainable, "total_parameters": trainer.total_params}
    return header + yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), info


def git_revision() -> tuple[str | None, bool | None]:
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
