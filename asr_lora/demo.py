"""``asr-lora demo``: zero-shot CER -> LoRA training with CER per checkpoint -> best checkpoint's test CER.

Runs the demo recipe (bundled Whisper base, synthetic Korean demo corpus) on CPU in about ten
minutes on 2 cores, end to end, and prints what a user would want to see.
"""

from __future__ import annotations

import time
from pathlib import Path

from .atomic import write_json_atomic
from .backends import DecodeOptions
from .config import load_recipe
from .data.manifest import read_rows
from .evaluate import EvalResult, evaluate_rows
from .sources import ModelSource, load_transcriber
from .report import write_report
from .train import LONGFORM_KEYS, run_training

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "demo" / "whisper-base_lora.yaml"


def _score(source: ModelSource, rows, cfg) -> EvalResult:
    """The test rows decoded as training's dev evaluation decodes (same options and batches)."""
    options = DecodeOptions(language=cfg.model.language, task=cfg.model.task, max_new_tokens=cfg.eval.max_new_tokens,
                            num_beams=cfg.eval.num_beams, bound_by_reference=True, temperatures=(0.0,))
    return evaluate_rows(load_transcriber(source, options), rows, batch_size=cfg.eval.batch_size, progress=True)


def run_demo(output_dir: str | None = None, overrides: list[str] = (), recipe: Path = DEMO_RECIPE) -> dict:
    overrides = list(overrides) + ([f"train.output_dir={output_dir}"] if output_dir else [])
    cfg = load_recipe(recipe, overrides)
    for split in ("train", "dev", "test", "nonspeech", "nonspeech_dev", "guard"):  # in the repository
        path = getattr(cfg.data, split)
        if path and not Path(path).is_absolute() and not Path(path).exists() and (REPO / path).exists():
            setattr(cfg.data, split, str(REPO / path))
    out = Path(cfg.train.output_dir)
    test_rows, _ = read_rows(cfg.data.test)

    t0 = time.perf_counter()
    print(f"[1/4] zero-shot: scoring {cfg.model.name} on {len(test_rows)} test clips ({cfg.data.test})", flush=True)
    # the untuned base is scored in its native 30 s context: trimmed input breaks it until LoRA adapts it
    base = _score(ModelSource("model", cfg.model.name), test_rows, cfg)
    print(f"      zero-shot test CER {base.report.cer:.4f} (CER without spaces {base.report.cer_nospace:.4f})", flush=True)

    print(f"[2/4] training LoRA: {cfg.train.max_steps} steps, batch {cfg.train.batch_size}, "
          f"CER on {cfg.eval.max_samples or 'all'} dev clips every {cfg.train.eval_every} steps -> {out}", flush=True)
    trainer = run_training(cfg)
    evals = trainer.eval_records()

    print(f"[3/4] scoring the best checkpoint (step {trainer.state.best_step}) on the test clips", flush=True)
    tuned = _score(ModelSource("adapter", str(out / "best")), test_rows, cfg)
    print("[4/4] two test clips transcribed with the best checkpoint:", flush=True)
    examples = []
    for ref, hyp, uid in list(zip(tuned.refs, tuned.hyps, tuned.ids))[:2]:
        examples.append({"id": uid, "ref": ref, "hyp": hyp})
        print(f"      {uid}\n        ref: {ref}\n        hyp: {hyp}")

    print("\ndev CER per checkpoint (non-sp: share of non-speech dev clips that got any output; "
          f"guard: WER on data.guard, {cfg.data.guard_language}; long: CER of dev rows joined into 20-30 s inputs; "
          "file: CER and deletion rate of one file of them cut as transcribe cuts it):")
    print(f"  {'step':>6} {'CER':>7} {'CER-ns':>7} {'WER':>7} {'sWER':>7} {'loss':>7} {'non-sp':>7} {'guard':>7} "
          f"{'long':>7} {'file':>7} {'file-del':>8}")

    def cell(m: dict, key: str, width: int = 7) -> str:
        return f"{m[key]:>{width}.4f}" if m.get(key) is not None else f"{'':>{width}}"

    for m in evals:
        step = "0 (base)" if m.get("zero_shot") else m["step"]
        print(f"  {step:>6} {m['cer']:>7.4f} {m['cer_nospace']:>7.4f} {m['wer']:>7.4f} {m['swer']:>7.4f} "
              f"{m['eval_loss']:>7.4f} {cell(m, 'nonspeech_share')} {cell(m, 'guard_wer')} {cell(m, 'longform_cer')} "
              f"{cell(m, 'longfile_cer')} {cell(m, 'longfile_deletion_rate', 8)}")
    minutes = (time.perf_counter() - t0) / 60
    summary = {"zero_shot_test_cer": base.report.cer, "best_step": trainer.state.best_step,
               "best_test_cer": tuned.report.cer, "best_test_cer_nospace": tuned.report.cer_nospace,
               "dev_cer_by_step": {m["step"]: m["cer"] for m in evals}, "examples": examples,
               "guard_wer_by_step": {m["step"]: m["guard_wer"] for m in evals if m.get("guard_wer") is not None},
               "longform_by_step": {m["step"]: {k: m[k] for k in LONGFORM_KEYS} for m in evals
                                    if m.get("longform_cer") is not None},
               "select_best": cfg.train.select_best,
               "minutes": round(minutes, 1), "output_dir": str(out)}
    write_json_atomic(out / "demo_summary.json", summary)
    print(f"report: {write_report([out])}")
    print(f"\ntest CER: zero-shot {base.report.cer:.4f} -> best checkpoint {tuned.report.cer:.4f} "
          f"(step {trainer.state.best_step}); {minutes:.1f} min; summary in {out / 'demo_summary.json'}")
    return summary
