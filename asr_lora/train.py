"""The training recipe: setup / train / evaluate / save_checkpoint / cleanup.

An explicit loop on ``accelerate``. Steps are optimizer steps; evaluation and checkpoints are keyed
to them. The loss of one optimizer step is the sum of token losses over all its micro-batches (and
all processes) divided by the total label-token count, so (batch 8, accum 1) and (batch 2, accum 4)
give the same update.

Run folder (``train.output_dir``)::

    recipe.yaml  run_info.json  metrics.jsonl  cer.png  tb/
    step-000100/  adapter_model.safetensors adapter_config.json trainer_state.json optimizer.pt
                  scheduler.pt rng.pt metrics.json
    best/  (lowest dev CER)   final/  (end of training)

A checkpoint is written to a temporary folder and renamed, so a crash never leaves a half
checkpoint that looks complete; resume picks the newest ``step-*`` folder.
"""

from __future__ import annotations

import json
import math
import os
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

from .config import RecipeConfig, to_dict
from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
RUN_META = "asr_lora.json"


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
    bad_rows: int = 0
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

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from transformers import WhisperProcessor, get_linear_schedule_with_warmup

        from .bundled import resolve_model
        from .data.collator import WhisperCollator
        from .model import build_training_model
        from .trimmed import COLLATOR_PADDING, apply_audio_context

        cfg = self.cfg
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                       cpu=not torch.cuda.is_available())
        acc = self.accelerator
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
        model = build_training_model(cfg.model, cfg.lora, device_map=device_map)
        apply_audio_context(model, cfg.model.audio_context)
        self.n_mels = model.config.num_mel_bins if hasattr(model, "config") else 80
        self.collator = WhisperCollator(self.tokenizer, n_mels=self.n_mels,
                                        padding=COLLATOR_PADDING[cfg.model.audio_context],
                                        max_label_tokens=cfg.data.max_label_tokens,
                                        language=cfg.model.language, task=cfg.model.task)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, cfg.train.warmup_steps, cfg.train.max_steps)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.trainable = sum(p.numel() for p in params)
        self.total_params = sum(p.numel() for p in model.parameters())

        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self._clean_temporaries()
        acc.wait_for_everyone()
        latest = latest_checkpoint(self.out)
        if latest is not None and self.resume is not False:
            self._load_checkpoint(latest)
        elif latest is None and self.resume:
            self.log(f"--resume: no checkpoint in {self.out}; starting from step 0")
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
            self._count_bad_rows(batches)
            n_tokens = torch.tensor(sum(int((b["labels"] != -100).sum()) for b in batches if "labels" in b),
                                    device=acc.device)
            total_tokens = int(acc.reduce(n_tokens, reduction="sum")) if world > 1 else int(n_tokens)
            loss_sum = torch.zeros((), device=acc.device)
            for b in batches:
                if "labels" not in b:
                    continue
                loss_sum += self._backward(b, total_tokens, world)
            if world > 1:
                loss_sum = acc.reduce(loss_sum, reduction="sum")
            loss = float(loss_sum) / max(total_tokens, 1)
            finite = math.isfinite(loss) and total_tokens > 0 and self._grads_finite()
            if finite:
                if cfg.train.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.train.max_grad_norm)
                self.optimizer.step()
                bad_in_a_row = 0
            else:
                st.skipped_updates += 1
                bad_in_a_row += 1
                self.log(f"step {st.step + 1}: non-finite loss or gradients, update skipped "
                         f"(batch ids {[b['ids'] for b in batches]})")
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    raise TrainingError(f"{bad_in_a_row} non-finite steps in a row at step {st.step + 1}; "
                                        f"last batch ids {[b['ids'] for b in batches]}. Lower train.lr or check the data")
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            st.step += 1
            record = {"step": st.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                      "tokens": total_tokens, "step_seconds": round(time.perf_counter() - t0, 3)}
            st.history.append({"step": st.step, "loss": loss})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", s_step=f"{record['step_seconds']:.1f}")
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

    def _count_bad_rows(self, batches: list[dict]) -> None:
        for b in batches:
            for uid, reason in b["skipped"]:
                self.state.bad_rows += 1
                self.log(f"skipped row {uid}: {reason}")
        if self.state.bad_rows > self.cfg.train.max_bad_rows:
            raise TrainingError(f"{self.state.bad_rows} unreadable or invalid rows (limit train.max_bad_rows="
                                f"{self.cfg.train.max_bad_rows}); fix the data with 'asr-lora prepare manifest'")

    # ---------------------------------------------------------------- evaluate
    def evaluate(self) -> dict:
        """CER/WER/sWER/eval loss on the dev rows (sharded over processes), logged and plotted."""
        from accelerate.utils import gather_object

        from .evaluate import evaluate_rows

        cfg, acc, st = self.cfg, self.accelerator, self.state
        model = acc.unwrap_model(self.model)
        shard = self.dev_rows[acc.process_index::acc.num_processes]
        result = evaluate_rows(model, self.tokenizer, self.collator, shard, batch_size=cfg.eval.batch_size,
                               language=cfg.model.language, task=cfg.model.task,
                               max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams,
                               device=acc.device)
        if acc.num_processes > 1:
            from .metrics import score

            triples = gather_object(list(zip(result.ids, result.refs, result.hyps)))
            losses = gather_object([(result.eval_loss, len(result.ids))])
            result.report = score([t[1] for t in triples], [t[2] for t in triples], ids=[t[0] for t in triples])
            result.eval_loss = sum(l * n for l, n in losses) / max(sum(n for _, n in losses), 1)
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
        if acc.is_main_process:
            try:
                self._write_checkpoint(target, metrics)
                if metrics is not None and st.best_step == st.step:
                    self._copy_atomic(target, self.out / "best")
                self._rotate()
            except OSError as e:
                raise TrainingError(f"could not write checkpoint {target}: {e.strerror or e}. Earlier "
                                    f"checkpoints in {self.out} are intact; free space or fix permissions, "
                                    "then resume") from e
        acc.wait_for_everyone()
        self._last_saved_step = st.step
        return target

    def _write_checkpoint(self, target: Path, metrics: dict | None) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=self.out))
        try:
            self.accelerator.unwrap_model(self.model).save_pretrained(tmp, safe_serialization=True)
            write_run_meta(tmp, self.cfg)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, tmp / "rng.pt")
            state = {k: v for k, v in vars(self.state).items() if k != "history"}
            state["best_cer"] = None if math.isinf(state["best_cer"]) else state["best_cer"]
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            (tmp / "metrics.json").write_text(json.dumps(metrics or self._last_train_record(), indent=2))
            _fsync_dir(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _copy_atomic(self, src: Path, dst: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=self.out))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            old = dst.with_name(f".{dst.name}.old")
            if dst.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _rotate(self) -> None:
        keep = self.cfg.train.keep_last
        steps = sorted(checkpoint_steps(self.out))
        protected = {self.state.best_step}
        for step in steps[:-keep] if keep > 0 else steps:
            if step not in protected:
                shutil.rmtree(self.out / f"step-{step:06d}", ignore_errors=True)

    def _save_final(self) -> None:
        """Copy the last checkpoint to ``final/`` (saving it first if the loop ended between saves)."""
        acc, st = self.accelerator, self.state
        if self._last_saved_step != st.step:  # e.g. early stopping; same decision on every process
            self.save_checkpoint(None)
        if acc.is_main_process:
            self._copy_atomic(self.out / f"step-{st.step:06d}", self.out / "final")
        acc.wait_for_everyone()

    def _load_checkpoint(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(self.model)
        weights = load_file(path / "adapter_model.safetensors", device=str(self.accelerator.device))
        set_peft_model_state_dict(model, weights)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True,
                                                  map_location=self.accelerator.device))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        state = json.loads((path / TRAINER_STATE).read_text())
        state["best_cer"] = math.inf if state.get("best_cer") is None else state["best_cer"]
        self.state = TrainerState(**{**state, "history": []})
        self.log(f"resumed from {path} (step {self.state.step})")

    def _clean_temporaries(self) -> None:
        for tmp in self.out.glob(".*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
            self.log(f"removed an unfinished checkpoint write: {tmp.name}")

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
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """After a resume, drop records past the checkpoint: they will be written again."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    def eval_records(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r for r in rows if "cer" in r]

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
        if not hasattr(self, "_tb"):
            self._tb = SummaryWriter(str(self.out / "tb"))
        for key in ("cer", "cer_nospace", "wer", "swer", "eval_loss"):
            self._tb.add_scalar(f"dev/{key}", metrics[key], metrics["step"])
        self._tb.flush()

    def _write_run_info(self) -> None:
        from .info import device_description, package_versions

        (self.out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False, allow_unicode=True))
        info = {"command": sys.argv, "git_revision": _git_revision(), "packages": package_versions(),
                "python": platform.python_version(), "hardware": device_description(),
                "world_size": self.accelerator.num_processes, "resumed_from_step": self.state.step,
                "trainable_parameters": self.trainable, "total_parameters": self.total_params}
        (self.out / "run_info.json").write_text(json.dumps(info, indent=2))

    def _seed_everything(self, seed: int) -> None:
        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def cleanup(self) -> None:
        if hasattr(self, "_tb"):
            self._tb.close()
        self.accelerator.end_training()


def write_run_meta(folder: Path, cfg: RecipeConfig) -> None:
    """``asr_lora.json`` beside the adapter: what later commands must apply without being told."""
    meta = {"base_model": cfg.model.name, "audio_context": cfg.model.audio_context,
            "language": cfg.model.language, "task": cfg.model.task, "quant": cfg.model.quant}
    (folder / RUN_META).write_text(json.dumps(meta, indent=2))


def checkpoint_steps(out: Path) -> list[int]:
    """Steps of the complete ``step-NNNNNN`` folders (temporaries are hidden and never match)."""
    if not out.is_dir():
        return []
    return [int(m.group(1)) for p in out.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
            and (p / TRAINER_STATE).is_file()]


def latest_checkpoint(out: Path) -> Path | None:
    steps = checkpoint_steps(out)
    return out / f"step-{max(steps):06d}" if steps else None


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_training(cfg: RecipeConfig, resume: bool | None = None, progress: bool = True) -> Trainer:
    """setup -> train -> cleanup; returns the trainer (state, output folder)."""
    trainer = Trainer(cfg, resume=resume, progress=progress)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer
