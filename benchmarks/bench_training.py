"""Training and evaluation speed: asr-lora (trimmed context), asr-lora (30 s) and the standard recipe.

The standard recipe is the one the PEFT Whisper int8 example and the HF fine-tune-whisper blog use:
log-mel features precomputed with ``datasets.map`` padded to 30 s, ``Seq2SeqTrainer``, the usual
``DataCollatorSpeechSeq2SeqWithPadding``. All three use the same base, LoRA (r=32 on q_proj/v_proj),
batch size, learning rate and precision (fp32 on CPU; the int8 base is slower on CPU, so none of
the three quantises here). Each system runs in its own process so that peak memory is its own.

Phases, all in one run on the same machine:
  throughput  utterances/s over a few optimizer steps (after one warm-up step) and peak memory;
  budget      train for the same wall-clock budget (steps = budget x measured throughput, so each
              gets a full warmup/decay schedule), then score dev and test CER with asr-lora's
              evaluator in the mode each model was trained in;
  eval        one CER pass over dev: asr-lora's evaluator (trimmed, bounded decoding) vs the
              standard recipe's (30 s features, generation_max_length 225).

Prints JSON and writes the table into BENCHMARKS.md (``--write``).

    python benchmarks/bench_training.py --budget 240 --write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("asr-lora-trimmed", "asr-lora-30s", "standard")
MODEL = "bundled:whisper-base"


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def read_manifest_rows(path: Path) -> list[dict]:
    from asr_lora.train import read_rows

    return read_rows(path)


# --------------------------------------------------------------------------- asr-lora


def run_asr_lora(mode: str, steps: int, out: Path, args) -> dict:
    from asr_lora.config import load_recipe
    from asr_lora.train import run_training

    cfg = load_recipe(REPO / "recipes" / "demo" / "whisper-base_lora.yaml", [
        f"model.audio_context={mode}", f"train.max_steps={steps}", f"train.batch_size={args.batch_size}",
        f"train.output_dir={out}", f"train.eval_every={steps}", f"train.save_every={steps}",
        f"train.warmup_steps={max(1, steps // 10)}", f"data.train={REPO / 'data/demo/train.jsonl'}",
        f"data.dev={REPO / 'data/demo/dev.jsonl'}", "eval.max_samples=2",  # dev is scored below, alike for all
    ])
    start = time.perf_counter()
    trainer = run_training(cfg, progress=False)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["step_seconds"] for r in records if "step_seconds" in r][1:] or [wall]
    evals = [r for r in records if "cer" in r]
    return {"wall_seconds": wall, "step_seconds": sum(step_times) / len(step_times),
            "utt_per_s": args.batch_size * len(step_times) / sum(step_times),
            "adapter": str(out / "final"), "steps": trainer.state.step}


# --------------------------------------------------------------------------- the standard recipe


class DataCollatorSpeechSeq2SeqWithPadding:
    """The collator of the HF fine-tune-whisper blog and the PEFT int8 example, as they write it."""

    def __init__(self, processor, decoder_start_token_id):
        self.processor = processor
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, features):
        input_features = [{"input_features": f["input_features"]} for f in features]
        batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")
        label_features = [{"input_ids": f["labels"]} for f in features]
        labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
        if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch


def standard_model_and_data(args):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from asr_lora.audio import load_audio
    from asr_lora.bundled import resolve_model

    path = resolve_model(MODEL)
    processor = WhisperProcessor.from_pretrained(path)
    processor.tokenizer.set_prefix_tokens(language="ko", task="transcribe")
    rows = read_manifest_rows(REPO / "data/demo/train.jsonl")
    t0 = time.perf_counter()

    def prepare_dataset(batch):
        audio = load_audio(batch["audio"])
        batch["input_features"] = processor.feature_extractor(audio, sampling_rate=16000).input_features[0]
        batch["labels"] = processor.tokenizer(batch["text"]).input_ids
        return batch

    ds = Dataset.from_list([{"audio": r["audio"], "text": r["text"]} for r in rows])
    ds = ds.map(prepare_dataset, remove_columns=["audio", "text"])
    precompute = time.perf_counter() - t0
    model = WhisperForConditionalGeneration.from_pretrained(path)
    model.config.forced_decoder_ids = None
    model.generation_config.language, model.generation_config.task = "ko", "transcribe"
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.05, bias="none"))
    return model, processor, ds, precompute


def run_standard(steps: int, out: Path, args) -> dict:
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    model, processor, ds, precompute = standard_model_and_data(args)
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    training_args = Seq2SeqTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, learning_rate=1e-3,
        warmup_steps=max(1, steps // 10), max_steps=steps, lr_scheduler_type="linear", save_strategy="no",
        logging_steps=1, report_to=[], remove_unused_columns=False, label_names=["labels"],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=42, disable_tqdm=True,
    )
    trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=ds,
                             data_collator=DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id),
                             callbacks=[StepTimer()])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start + precompute
    model.save_pretrained(out / "final")
    (out / "final" / "asr_lora.json").write_text(json.dumps({"audio_context": "full", "language": "ko",
                                                             "task": "transcribe", "base_model": MODEL}))
    times = step_times[1:] or step_times
    eval_seconds = standard_eval_pass(model, processor, args) if args.phase == "budget" else None
    return {"wall_seconds": wall, "precompute_seconds": precompute, "step_seconds": sum(times) / len(times),
            "utt_per_s": args.batch_size * len(times) / sum(times), "adapter": str(out / "final"),
            "steps": steps, "standard_eval_seconds": eval_seconds}


def standard_eval_pass(model, processor, args) -> float:
    """One dev pass the standard way: 30 s extractor features, generate with max length 225."""
    import torch

    from asr_lora.audio import load_audio

    rows = read_manifest_rows(REPO / "data/demo/dev.jsonl")
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(rows), args.batch_size):
            audio = [load_audio(r["audio"]) for r in rows[i:i + args.batch_size]]
            feats = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
            model.generate(input_features=feats, language="ko", task="transcribe", max_new_tokens=225)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- scoring (same evaluator for all)


def score_adapter(adapter: str, manifest: Path, args) -> dict:
    from transformers import WhisperProcessor

    from asr_lora.bundled import resolve_model
    from asr_lora.data.collator import WhisperCollator
    from asr_lora.evaluate import evaluate_rows
    from asr_lora.model import load_adapter_model
    from asr_lora.trimmed import COLLATOR_PADDING, audio_context_of

    model = load_adapter_model(adapter, base=MODEL)
    processor = WhisperProcessor.from_pretrained(resolve_model(MODEL))
    collator = WhisperCollator(processor.tokenizer, padding=COLLATOR_PADDING[audio_context_of(model)])
    result = evaluate_rows(model, processor.tokenizer, collator, read_manifest_rows(manifest),
                           batch_size=args.batch_size, max_new_tokens=128)
    return {"cer": result.report.cer, "seconds": result.seconds}


# --------------------------------------------------------------------------- orchestration


def child(args) -> dict:
    import torch

    torch.manual_seed(42)
    out = Path(args.workdir) / f"{args.system}-{args.phase}"
    steps = args.steps
    if args.system == "standard":
        result = run_standard(steps, out, args)
    else:
        result = run_asr_lora("trimmed" if args.system.endswith("trimmed") else "full", steps, out, args)
    if args.phase == "budget":
        result["test"] = score_adapter(result["adapter"], REPO / "data/demo/test.jsonl", args)
        result["dev"] = score_adapter(result["adapter"], REPO / "data/demo/dev.jsonl", args)
    result["peak_memory_mb"] = peak_memory_mb()
    return result


def spawn(system: str, phase: str, steps: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--system", system, "--phase", phase, "--steps", str(steps),
           "--batch-size", str(args.batch_size), "--workdir", args.workdir]
    print(f"# {phase}: {system}, {steps} steps", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} {phase} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: dict) -> str:
    tp, bud = results["throughput"], results["budget"]
    base = tp["standard"]["utt_per_s"]
    lines = [
        f"Measured {results['date']} on {results['device']} (torch threads: {results['threads']}), "
        f"whisper-base (bundled), LoRA r=32 q_proj/v_proj, batch {results['batch_size']}, fp32, demo corpus "
        f"(360 train / 50 dev / 50 test synthetic Korean clips, mean 3.1 s).",
        "",
        "| system | train utt/s | vs standard | peak memory | steps in budget | dev CER | test CER | dev eval pass | eval speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    std_eval = bud["standard"]["standard_eval_seconds"]
    for name in SYSTEMS:
        t, b = tp[name], bud[name]
        eval_s = std_eval if name == "standard" else b["dev"]["seconds"]
        lines.append(f"| {name} | {t['utt_per_s']:.2f} | {t['utt_per_s'] / base:.1f}x | {t['peak_memory_mb']:.0f} MB | "
                     f"{b['steps']} | {b['dev']['cer']:.4f} | {b['test']['cer']:.4f} | {eval_s:.1f} s | "
                     f"{std_eval / eval_s:.1f}x |")
    lines += ["", f"Budget: {results['budget_seconds']} s of training wall-clock per system (steps = budget x "
              "measured throughput; the standard recipe's feature precomputation counts in its budget). "
              "CER is scored with asr-lora's evaluator for all three, each in the audio context it was trained "
              "in. The standard eval pass is 30 s features with generation_max_length 225, as in the HF recipe."]
    return "\n".join(lines)


def write_benchmarks_md(section: str) -> None:
    path = REPO / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start, end = "<!-- training:start -->", "<!-- training:end -->"
    block = f"{start}\n## Training and evaluation: trimmed context vs 30 s vs the standard recipe\n\n{section}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240, help="training seconds per system (default %(default)s)")
    parser.add_argument("--throughput-steps", type=int, default=4, help="steps timed per system (+1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    import torch

    args.workdir = args.workdir or tempfile.mkdtemp(prefix="asr-lora-bench-")
    results = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "threads": torch.get_num_threads(),
               "python": platform.python_version(), "batch_size": args.batch_size, "budget_seconds": args.budget,
               "throughput": {}, "budget": {}}
    for system in args.systems:
        results["throughput"][system] = spawn(system, "throughput", args.throughput_steps + 1, args)
    for system in args.systems:
        tp = results["throughput"][system]
        spare = tp.get("precompute_seconds", 0.0)
        steps = max(2, int((args.budget - spare) / tp["step_seconds"]))
        results["budget"][system] = spawn(system, "budget", steps, args)
    print(json.dumps(results, indent=2))
    if args.write and set(args.systems) == set(SYSTEMS):
        write_benchmarks_md(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
