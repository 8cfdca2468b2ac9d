"""What joined multi-utterance inputs (``data.concat_probability``) cost a training step.

Trains the demo recipe for the same number of steps with concatenation off and at the given settings,
one after the other in one process (evaluations, the zero-shot pass, the guard and the long-form probe
off; each run ends with its one dev evaluation, not timed), and prints per run: the mean step time
(first step left out), the audio and label tokens a step trains on, the throughput in audio seconds
and label tokens per second of training, and the process's peak memory so far (the runs go in order,
concatenation off first, so a later run's peak is its own only when it is higher).

    python benchmarks/bench_concat.py --steps 40 --settings 0.4:20 0.5:30
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asr_lora.config import load_recipe  # noqa: E402
from asr_lora.train import run_training  # noqa: E402

RECIPE = REPO / "recipes" / "demo" / "whisper-base_lora.yaml"


def run(steps: int, probability: float, max_seconds: float, out: Path) -> dict:
    cfg = load_recipe(RECIPE, [
        f"train.output_dir={out}", f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}",
        "eval.zero_shot=false", "eval.longform_rows=0", "data.guard=null", "data.nonspeech_dev=null",
        "train.report_to=none", f"data.concat_probability={probability}", f"data.concat_max_seconds={max_seconds}",
        f"data.train={REPO / 'data/demo/train.jsonl'}", f"data.dev={REPO / 'data/demo/dev.jsonl'}",
        f"data.nonspeech={REPO / 'data/demo/nonspeech_train.jsonl'}", "eval.max_samples=5"])
    trainer = run_training(cfg, resume=False, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "loss" in r][1:]  # the first step warms up
    taken, _, _ = trainer.plan.take_with_epochs(0, 0, steps * cfg.train.grad_accum)
    durations = {}
    audio = []
    for epoch, batch in taken:
        if epoch not in durations:
            durations[epoch] = trainer.plan.epoch_durations(epoch) if trainer.plan.epoch_durations else \
                trainer.plan.durations
        audio.append(sum(durations[epoch][i] for i in batch))
    seconds = statistics.mean(r["step_seconds"] for r in steps_)
    audio_per_step = statistics.mean(audio[1:])
    tokens_per_step = statistics.mean(r["tokens"] for r in steps_)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB; the process's peak so far
    return {"concat_probability": probability, "concat_max_seconds": max_seconds, "steps": steps,
            "peak_rss_mb_so_far": round(peak),
            "step_seconds": round(seconds, 3), "audio_seconds_per_step": round(audio_per_step, 1),
            "tokens_per_step": round(tokens_per_step, 1), "audio_seconds_per_second": round(audio_per_step / seconds, 2),
            "tokens_per_second": round(tokens_per_step / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--settings", nargs="+", default=["0.4:20"], metavar="P:MAX",
                        help="concat_probability:concat_max_seconds pairs to compare with off")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for k, setting in enumerate(["0:30", *args.settings]):
            p, m = (float(x) for x in setting.split(":"))
            rows.append(run(args.steps, p, m, Path(work) / f"run{k}"))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print("\n| concat | step s | audio s / step | tokens / step | audio s / s | tokens / s | step time vs off | "
          "peak RSS so far |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        what = "off" if r["concat_probability"] == 0 else f"{r['concat_probability']:g}, up to {r['concat_max_seconds']:g} s"
        print(f"| {what} | {r['step_seconds']:.2f} | {r['audio_seconds_per_step']:.1f} | {r['tokens_per_step']:.0f} | "
              f"{r['audio_seconds_per_second']:.2f} | {r['tokens_per_second']:.0f} | "
              f"{r['step_seconds'] / base['step_seconds']:.2f}x | {r['peak_rss_mb_so_far']} MB |")


if __name__ == "__main__":
    main()
