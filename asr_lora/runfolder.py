"""A training run's folder: checkpoints, records and the lock, behind one narrow interface.

::

    recipe.yaml  run_info.json  metrics.jsonl  cer.png  tb/  eval/step-000100.jsonl
    step-000100/  (adapter, trainer state, optimizer... written by the trainer into a staged folder)
    best/  (lowest dev CER)   final/  (end of training)   previous-<time>/  (set aside by --fresh)

Every write is atomic (:mod:`asr_lora.atomic`): a checkpoint is staged in a hidden temporary folder
and renamed, so ``step-NNNNNN/`` is complete or absent; :meth:`RunFolder.open` removes what a killed
run left and puts back a folder caught half-way through a replace. A failed write raises
:class:`TrainingError` naming the folder and the reason, and says that earlier checkpoints are intact.
Only the main process of a distributed run uses this object.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from .atomic import (
    atomic_file,
    fsync_files,
    remove_dir,
    replace_dir,
    restore_replaced,
    staged_folder,
    write_json_atomic,
    write_text_atomic,
)
from .errors import TrainingError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.jsonl"
EVAL_DIR = "eval"  # eval/step-NNNNNN.jsonl: the dev utterances (ref, hyp, errors) of each evaluation
LOCK_FILE = ".lock"
# What a run writes into its folder besides step-NNNNNN/ (``--fresh`` sets these aside)
RUN_OUTPUTS = ("best", "final", METRICS, "tb", EVAL_DIR, "cer.png", "recipe.yaml", "run_info.json",
               "demo_summary.json", "report.html")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_steps(out: Path) -> list[int]:
    """Steps of the complete ``step-NNNNNN`` folders, ascending (temporaries are hidden and never match)."""
    if not out.is_dir():
        return []
    return sorted(int(m.group(1)) for p in out.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
                  and (p / TRAINER_STATE).is_file())


def latest_checkpoint(out: Path) -> Path | None:
    steps = checkpoint_steps(out)
    return out / step_name(max(steps)) if steps else None


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a JSON Lines file; lines that do not parse (cut by a kill) are left out."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_error(what: str, error: OSError, out: Path) -> str:
    """One line for a failed write: what, why, and that earlier checkpoints are intact."""
    reason = error.strerror or str(error)
    hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
            errno.EACCES: "fix the permissions", errno.EPERM: "fix the permissions",
            errno.EROFS: "choose a writable train.output_dir"}.get(error.errno, "fix the cause")
    return (f"could not write {what}: {reason}. Earlier checkpoints in {out} are intact; {hint}, then run "
            "the same command again with --resume")


class RunFolder:
    """The run folder of one training run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, log: Callable[[str], None] = print):
        self.path = Path(path)
        self.log = log
        self._lock = None

    # ---------------------------------------------------------------- open / close
    def open(self, fresh: bool) -> None:
        """Lock the folder (one run at a time), clean what an interrupted run left, and with ``fresh``
        move a previous run's outputs to ``previous-<time>/``."""
        self._lock_folder()
        self._clean_temporaries()
        if fresh:
            self._set_aside_previous_run()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _lock_folder(self) -> None:
        """An advisory lock the kernel drops if the process dies."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(write_error(f"run folder {self.path}", e, self.path)) from e
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            return
        self._lock = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise TrainingError(f"{self.path} is in use by another 'asr-lora train' (lock {self.path / LOCK_FILE}); "
                                "wait for it or choose another train.output_dir") from None

    def _clean_temporaries(self) -> None:
        """Remove what an interrupted run left (temporaries, folders half-way through a replace) and say so."""
        for tmp in sorted(self.path.glob(".*.tmp-*")):
            shutil.rmtree(tmp, ignore_errors=True)
            self.log(f"removed an unfinished checkpoint write: {tmp.name}")
        for old in sorted(p for p in self.path.glob(".*.old") if p.is_dir()):
            self.log(restore_replaced(old))

    def _set_aside_previous_run(self) -> None:
        """Move a previous run's outputs into ``previous-<time>/`` (nothing is deleted), so its
        checkpoints can neither be resumed into nor outrank and rotate away the new run's."""
        old = [p for p in self.path.iterdir() if p.name in RUN_OUTPUTS or STEP_DIR.match(p.name)]
        if not old:
            return
        stamp, k = time.strftime("previous-%Y%m%d-%H%M%S"), 1
        aside = self.path / stamp
        while aside.exists():
            k += 1
            aside = self.path / f"{stamp}-{k}"
        aside.mkdir()
        for path in sorted(old):
            os.rename(path, aside / path.name)
        self.log(f"--fresh: moved the previous run in {self.path} ({len(old)} entries) to {aside.name}/")

    # ---------------------------------------------------------------- checkpoints
    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def save_step(self, step: int, write: Callable[[Path], None], *, best: bool, keep_last: int,
                  protect: int | None) -> Path:
        """``step-NNNNNN/`` from ``write(folder)``, atomically; copied to ``best/`` when ``best``; then
        all but the last ``keep_last`` checkpoints are removed, except step ``protect`` (the best)."""
        target = self.path / step_name(step)
        try:
            with staged_folder(target) as tmp:
                write(tmp)
                fsync_files(tmp)
                replace_dir(tmp, target)
            if best:
                self._copy(target, self.path / "best")
            steps = checkpoint_steps(self.path)
            for old in steps[:-keep_last] if keep_last > 0 else steps:
                if old != protect:
                    remove_dir(self.path / step_name(old))
        except OSError as e:
            raise TrainingError(write_error(f"checkpoint {target}", e, self.path)) from e
        return target

    def finalize(self, step: int) -> None:
        """Copy ``step-NNNNNN/`` to ``final/``."""
        try:
            self._copy(self.path / step_name(step), self.path / "final")
        except OSError as e:
            raise TrainingError(write_error(str(self.path / "final"), e, self.path)) from e

    def _copy(self, src: Path, dst: Path) -> None:
        with staged_folder(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            replace_dir(tmp, dst)

    # ---------------------------------------------------------------- records
    def append_metrics(self, record: dict) -> None:
        path = self.path / METRICS
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as e:
            raise TrainingError(write_error(str(path), e, self.path)) from e

    def truncate_metrics(self, step: int) -> None:
        """After a resume, drop records past the checkpoint (they will be written again) and any line
        cut short by a kill."""
        path = self.path / METRICS
        if not path.exists():
            return
        records = read_records(path)
        dropped = len([line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                       if line.strip()]) - len(records)
        if dropped:
            self.log(f"dropped {dropped} unreadable line(s) of {path} (cut short by an interrupted run)")
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))

    def eval_records(self) -> list[dict]:
        path = self.path / METRICS
        return [r for r in read_records(path) if "cer" in r] if path.exists() else []

    def write_eval_utterances(self, step: int, utterances: list[dict], prefix: str = "") -> None:
        """``eval/step-NNNNNN.jsonl``: one line per dev utterance of the evaluation at ``step``
        (``eval/<prefix>step-NNNNNN.jsonl`` for another set: ``guard-`` for data.guard)."""
        folder = self.path / EVAL_DIR
        try:
            folder.mkdir(exist_ok=True)
            with atomic_file(folder / f"{prefix}{step_name(step)}.jsonl") as fh:
                for u in utterances:
                    fh.write(json.dumps(u, ensure_ascii=False) + "\n")
        except OSError as e:
            raise TrainingError(write_error(f"evaluation records in {folder}", e, self.path)) from e

    def write_run_info(self, recipe_text: str, info: dict) -> None:
        """``recipe.yaml`` (the resolved recipe, itself runnable) and ``run_info.json``."""
        try:
            write_text_atomic(self.path / "recipe.yaml", recipe_text)
            write_json_atomic(self.path / "run_info.json", info)
        except OSError as e:
            raise TrainingError(write_error(f"run records in {self.path}", e, self.path)) from e

    def plot_cer(self) -> None:
        """``cer.png``: dev CER (with and without spaces) per checkpoint, and the long-form probe's CERs
        when it is scored; with a guard set, its WER and CER in a second panel."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.eval_records()
        guarded = [r for r in records if r.get("guard_wer") is not None]
        fig, axes = plt.subplots(1, 2 if guarded else 1, figsize=(11 if guarded else 6, 3.5), squeeze=False)
        ax = axes[0][0]
        ax.plot([r["step"] for r in records], [r["cer"] for r in records], marker="o", label="CER")
        ax.plot([r["step"] for r in records], [r["cer_nospace"] for r in records], marker=".", label="CER (no spaces)")
        for key, label in (("longform_cer", "long-form CER (20-30 s inputs)"), ("longfile_cer", "long-form file CER")):
            probe = [r for r in records if r.get(key) is not None]
            if probe:  # the long-form probe: joined dev rows, and one file cut as transcribe cuts it
                ax.plot([r["step"] for r in probe], [r[key] for r in probe], marker="^", linestyle=":", label=label)
        shares = [r for r in records if r.get("nonspeech_share") is not None]
        if shares:  # the non-speech dev clips that got any output
            ax.plot([r["step"] for r in shares], [r["nonspeech_share"] for r in shares], marker="s", linestyle="--",
                    label="non-speech clips with output")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("dev error rate / share")
        ax.set_title("dev CER per checkpoint")
        ax.grid(alpha=0.3)
        ax.legend()
        if guarded:  # the second language: how much of it the model forgets
            plot_guard(axes[0][1], guarded)
        fig.tight_layout()
        with atomic_file(self.path / "cer.png", "wb") as fh:
            fig.savefig(fh, format="png", dpi=100)
        plt.close(fig)


def plot_guard(ax, records: list[dict]) -> None:
    """The guard set's WER and CER per checkpoint (``data.guard``) on ``ax``."""
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["guard_wer"] for r in records], marker="o", color="C3", label="guard WER")
    ax.plot(steps, [r.get("guard_cer") for r in records], marker=".", color="C4", label="guard CER")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("guard error rate")
    ax.set_title("guard set (second language) per checkpoint")
    ax.grid(alpha=0.3)
    ax.legend()
