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

On a GPU, throughput only, on a model of a given shape with random weights (speed does not depend on
the weight values; CER would be meaningless, so no budget phase), features computed on the GPU:

    python benchmarks/bench_training.py --random-shape large-v3 --phases throughput --batch-size 16 --write

``--concat 2`` trains on pairs of demo clips joined (mean 6.3 s, near KsponSpeech's 5.6 s) instead
of single clips (mean 3.1 s): the trimmed context gains less on longer clips.
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
# Shapes of random-weight models for GPU throughput (the real checkpoints' configs).
SHAPES = {
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                 decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_mel_bins=80,
                 vocab_size=51865),
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                     decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128,
                     vocab_size=51866),
}
TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def read_manifest_rows(path: Path) -> list[dict]:
    """Rows as plain dicts (audio absolute), for the standard recipe's datasets."""
    from dataclasses import asdict

    from asr_lora.data.manifest import read_rows

    return [asdict(row) for row in read_rows(path)[0]]


def make_random_model(shape: str, files_from: Path, out: Path) -> Path:
    """A Whisper of ``shape`` with random weights (fp16 safetensors) and the tokenizer of ``files_from``."""
    import shutil

    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = WhisperConfig.from_pretrained(files_from)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = WhisperForConditionalGeneration(config)
    model.to(torch.float16).save_pretrained(out)
    for name in TOKENIZER_FILES[1:]:
        shutil.copy(files_from / name, out / name)
    processor = json.loads((files_from / "processor_config.json").read_text())
    processor["feature_extractor"]["feature_size"] = config.num_mel_bins
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return out


def concat_manifest(src: Path, n: int, out: Path) -> Path:
    """A manifest of the clips of ``src`` joined ``n`` at a time (0.2 s of silence between), as wav files."""
    import numpy as np
    import soundfile as sf

    from asr_lora.audio import load_audio

    rows = read_manifest_rows(src)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    gap = np.zeros(3200, dtype=np.float32)
    for i in range(0, len(rows) - n + 1, n):
        group = rows[i:i + n]
        audio = np.concatenate([x for r in group for x in (load_audio(r["audio"]), gap)][:-1])
        path = out / f"concat-{i:05d}.wav"
        sf.write(path, audio, 16000)
        lines.append(json.dumps({"id": path.stem, "audio": str(path), "text": " ".join(r["text"] for r in group)},
                                ensure_ascii=False))
    manifest = out / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def mean_duration(manifest: Path) -> float:
    import soundfile as sf

    rows = read_manifest_rows(manifest)
    return sum(sf.info(r["audio"]).duration for r in rows) / len(rows)


# --------------------------------------------------------------------------- asr-lora


def run_asr_lora(mode: str, steps: int, out: Path, args) -> dict:
    from asr_lora.config import load_recipe
    from asr_lora.train import run_training

    cfg = load_recipe(REPO / "recipes" / "demo" / "whisper-base_lora.yaml", [
        f"model.name={args.model}", f"model.quant={args.quant}", f"train.mixed_precision={args.precision}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"model.audio_context={mode}", f"train.max_steps={steps}", f"train.batch_size={args.batch_size}",
        f"train.output_dir={out}", f"train.eval_every={steps}", f"train.save_every={steps}",
        f"train.warmup_steps={max(1, steps // 10)}", f"data.train={args.train}",
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


def standard_features(processor, manifest: Path):
    """The HF recipe's data: ``datasets.map`` over the manifest, 30 s extractor features + label ids.
    Returns (dataset, seconds)."""
    from datasets import Dataset

    from asr_lora.audio import load_audio

    rows = read_manifest_rows(manifest)
    t0 = time.perf_counter()

    def prepare_dataset(batch):
        audio = load_audio(batch["audio"])
        batch["input_features"] = processor.feature_extractor(audio, sampling_rate=16000).input_features[0]
        batch["labels"] = processor.tokenizer(batch["text"]).input_ids
        return batch

    ds = Dataset.from_list([{"audio": r["audio"], "text": r["text"]} for r in rows])
    ds = ds.map(prepare_dataset, remove_columns=["audio", "text"])
    return ds, time.perf_counter() - t0


def standard_base(args):
    """(processor, base model) as the PEFT int8 example / HF blog load them."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration, WhisperProcessor

    from asr_lora.bundled import resolve_model

    path = resolve_model(args.model)
    processor = WhisperProcessor.from_pretrained(path)
    processor.tokenizer.set_prefix_tokens(language="ko", task="transcribe")
    if args.quant == "none":
        model = WhisperForConditionalGeneration.from_pretrained(path, dtype="float32")
    else:  # the PEFT int8 example: load_in_8bit, device_map="auto", prepare_model_for_kbit_training
        qconfig = (BitsAndBytesConfig(load_in_8bit=True) if args.quant == "8bit" else
                   BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype="bfloat16"))
        model = WhisperForConditionalGeneration.from_pretrained(path, dtype="float32", quantization_config=qconfig,
                                                                device_map="auto")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    if args.gradient_checkpointing and args.quant == "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.forced_decoder_ids = None
    model.generation_config.language, model.generation_config.task = "ko", "transcribe"
    return processor, model


def standard_model_and_data(args):
    from peft import LoraConfig, get_peft_model

    processor, model = standard_base(args)
    ds, precompute = standard_features(processor, Path(args.train))
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
        bf16=args.precision == "bf16", fp16=args.precision == "fp16",
    )
    trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=ds,
                             data_collator=DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id),
                             callbacks=[StepTimer()])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start + precompute
    model.save_pretrained(out / "final")
    (out / "final" / "asr_lora.json").write_text(json.dumps({"audio_context": "full", "language": "ko",
                                                             "task": "transcribe", "base_model": args.model}))
    times = step_times[1:] or step_times
    return {"wall_seconds": wall, "precompute_seconds": precompute, "step_seconds": sum(times) / len(times),
            "utt_per_s": args.batch_size * len(times) / sum(times), "adapter": str(out / "final"), "steps": steps}


def standard_eval(adapter: str, args) -> dict:
    """One dev CER pass the standard ways, on the standard run's adapter.

    ``Seq2SeqTrainer.evaluate`` with ``predict_with_generate`` and ``generation_max_length=225`` (the HF
    fine-tune-whisper recipe's CER every N steps: ``generate``, then a second full forward for the
    loss) and the PEFT int8 example's loop (``generate`` only, ``max_new_tokens=225``). Both on dev
    features precomputed with ``datasets.map`` (that time is reported apart, not counted).
    """
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from asr_lora.metrics import score

    processor, base = standard_base(args)
    model = PeftModel.from_pretrained(base, adapter).eval()
    if torch.cuda.is_available() and args.quant == "none":
        model = model.cuda()
    ds, precompute = standard_features(processor, REPO / "data/demo/dev.jsonl")
    refs = [r["text"] for r in read_manifest_rows(REPO / "data/demo/dev.jsonl")]
    tokenizer = processor.tokenizer
    collator = DataCollatorSpeechSeq2SeqWithPadding(processor, base.config.decoder_start_token_id)

    def compute_metrics(pred):
        ids = np.where(pred.predictions != -100, pred.predictions, tokenizer.pad_token_id)
        hyps = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return {"cer": score(refs, hyps).cer}

    eval_args = Seq2SeqTrainingArguments(
        output_dir=str(Path(args.workdir) / "standard-eval"), per_device_eval_batch_size=args.batch_size,
        predict_with_generate=True, generation_max_length=225, report_to=[], remove_unused_columns=False,
        label_names=["labels"], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=True, bf16_full_eval=False, bf16=args.precision == "bf16", fp16=args.precision == "fp16",
    )
    trainer = Seq2SeqTrainer(model=model, args=eval_args, eval_dataset=ds, data_collator=collator,
                             compute_metrics=compute_metrics)
    start = time.perf_counter()
    metrics = trainer.evaluate()
    trainer_seconds = time.perf_counter() - start

    device = next(model.parameters()).device
    start = time.perf_counter()
    hyps = []
    with torch.no_grad():
        for i in range(0, len(ds), args.batch_size):
            batch = collator([ds[j] for j in range(i, min(i + args.batch_size, len(ds)))])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                out = model.generate(input_features=batch["input_features"].to(device), language="ko",
                                     task="transcribe", max_new_tokens=225)
            hyps += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    generate_seconds = time.perf_counter() - start
    return {"seconds": trainer_seconds, "cer": metrics["eval_cer"], "generate_only_seconds": generate_seconds,
            "generate_only_cer": score(refs, hyps).cer, "precompute_seconds": precompute}


# --------------------------------------------------------------------------- scoring (same evaluator for all)


def score_adapter(adapter: str, manifest: Path, args) -> dict:
    from asr_lora.backends import DecodeOptions
    from asr_lora.data.manifest import read_rows
    from asr_lora.evaluate import evaluate_rows
    from asr_lora.sources import ModelSource, load_transcriber

    options = DecodeOptions(max_new_tokens=128, bound_by_reference=True)  # as training's dev evaluation
    transcriber = load_transcriber(ModelSource("adapter", adapter), options)
    result = evaluate_rows(transcriber, read_rows(manifest)[0], batch_size=args.batch_size)
    return {"cer": result.report.cer, "seconds": result.seconds}


# --------------------------------------------------------------------------- orchestration


def child(args) -> dict:
    import torch

    torch.manual_seed(42)
    out = Path(args.workdir) / f"{args.system}-{args.phase}"
    steps = args.steps
    if args.phase == "eval":
        if args.system == "standard":
            result = standard_eval(args.adapter, args)
        else:
            result = score_adapter(args.adapter, REPO / "data/demo/dev.jsonl", args)
        result["peak_memory_mb"] = peak_memory_mb()
        return result
    if args.system == "standard":
        result = run_standard(steps, out, args)
    else:
        result = run_asr_lora("trimmed" if args.system.endswith("trimmed") else "full", steps, out, args)
    if args.phase == "budget":
        result["test"] = score_adapter(result["adapter"], REPO / "data/demo/test.jsonl", args)
        result["dev"] = score_adapter(result["adapter"], REPO / "data/demo/dev.jsonl", args)
    result["peak_memory_mb"] = peak_memory_mb()
    return result


def spawn(system: str, phase: str, steps: int, args, adapter: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--system", system, "--phase", phase, "--steps", str(steps),
           "--batch-size", str(args.batch_size), "--workdir", args.workdir, "--model", args.model,
           "--quant", args.quant, "--precision", args.precision, "--train", str(args.train)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if adapter:
        cmd += ["--adapter", adapter]
    print(f"# {phase}: {system}, {steps} steps", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} {phase} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def setting_line(results: dict) -> str:
    return (f"Measured {results['date']} on {results['device']} (torch threads: {results['threads']}), "
            f"{results['model_desc']}, LoRA r=32 q_proj/v_proj, batch {results['batch_size']}, "
            f"{results['precision_desc']}, train clips: {results['train_desc']} (mean {results['mean_seconds']:.1f} s).")


def markdown(results: dict) -> str:
    tp, bud = results["throughput"], results.get("budget") or {}
    base = tp["standard"]["utt_per_s"]
    mem = "peak GPU memory" if results["gpu"] else "peak memory (RSS)"
    if not bud:
        lines = [setting_line(results), "",
                 f"| system | train utt/s | vs standard | step s | {mem} |", "|---|---:|---:|---:|---:|"]
        for name in SYSTEMS:
            t = tp[name]
            lines.append(f"| {name} | {t['utt_per_s']:.2f} | {t['utt_per_s'] / base:.1f}x | {t['step_seconds']:.3f} | "
                         f"{t['peak_memory_mb'] / 1024:.1f} GB |")
        lines += ["", f"Throughput over {results['throughput_steps']} optimizer steps after one warm-up step, each "
                  "system in its own process."]
        if results.get("random_shape"):
            lines[-1] += (" Random weights: speed does not depend on the weight values (the same shapes, kernels "
                          "and sequence lengths run), so no CER is given.")
        return "\n".join(lines)
    ev = results.get("eval") or {}
    lines = [
        setting_line(results), "",
        f"| system | train utt/s | vs standard | {mem} | steps in budget | dev CER | test CER | dev CER pass | eval speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    std_eval = ev["standard"]["seconds"] if ev else None
    for name in SYSTEMS:
        t, b = tp[name], bud[name]
        eval_cells = (f"{ev[name]['seconds']:.1f} s | {std_eval / ev[name]['seconds']:.1f}x" if ev else "- | -")
        lines.append(f"| {name} | {t['utt_per_s']:.2f} | {t['utt_per_s'] / base:.1f}x | {t['peak_memory_mb']:.0f} MB | "
                     f"{b['steps']} | {b['dev']['cer']:.4f} | {b['test']['cer']:.4f} | {eval_cells} |")
    lines += ["", f"Throughput over {results['throughput_steps']} optimizer steps after one warm-up step. "
              f"Budget: {results['budget_seconds']:g} s of training wall-clock per system (steps = budget x "
              "measured throughput, each with a full warmup/decay schedule; the standard recipe's feature "
              "precomputation counts in its budget). Dev and test CER of the budget runs are scored with "
              "asr-lora's evaluator for all three, each in the audio context it was trained in, so the "
              "comparison is of the models, not of the scorers."]
    if ev:
        gen = ev["standard"]
        lines += ["", "Dev CER pass (50 clips, batch as above, each system on its own budget-run adapter): "
                  "asr-lora's per-checkpoint evaluation (one encoder pass shared by the loss and greedy "
                  "decoding, decoding capped at 2 x the longest label + 8 tokens, batches sorted by length, "
                  "trimmed context in that mode) vs the standard recipe's `Seq2SeqTrainer.evaluate` with "
                  "`predict_with_generate` and `generation_max_length=225` (generate, then a second full "
                  f"forward pass for the loss), CER {gen['cer']:.4f}. The PEFT int8 example's loop (generate "
                  f"only, `max_new_tokens=225`) took {gen['generate_only_seconds']:.1f} s (CER "
                  f"{gen['generate_only_cer']:.4f}): asr-lora trimmed is "
                  f"{gen['generate_only_seconds'] / ev['asr-lora-trimmed']['seconds']:.1f}x faster than that. "
                  f"The standard recipe's dev features (precomputed with `datasets.map`, "
                  f"{gen['precompute_seconds']:.1f} s) are not counted in its pass."]
    lines += ["", "Each system runs in its own process; numbers from one run."]
    return "\n".join(lines)


def write_benchmarks_md(section: str, key: str, title: str) -> None:
    """Put ``section`` under ``## title`` between ``<!-- key:start -->`` and ``<!-- key:end -->`` in BENCHMARKS.md."""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n## {title}\n\n{section}\n{end}"
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
    parser.add_argument("--phases", nargs="+", default=["throughput", "budget", "eval"],
                        choices=["throughput", "budget", "eval"],
                        help="phases to run; a later phase alone reuses the earlier ones' results.json in --workdir")
    parser.add_argument("--model", default=MODEL, help="base model name or folder (default %(default)s)")
    parser.add_argument("--random-shape", choices=sorted(SHAPES),
                        help="instead of --model: a Whisper of this shape with random weights (throughput only)")
    parser.add_argument("--files-from", type=Path, default=None,
                        help="folder with config/tokenizer files for --random-shape (default: the bundled base)")
    parser.add_argument("--quant", default="none", choices=["none", "8bit", "4bit"], help="base quantisation, all systems")
    parser.add_argument("--precision", default=None, choices=["no", "bf16", "fp16"],
                        help="mixed precision, all systems (default: bf16 on a GPU, else no)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for all systems")
    parser.add_argument("--concat", type=int, default=1, help="train on N demo clips joined into one (default 1)")
    parser.add_argument("--train", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--section", default=None, help="BENCHMARKS.md section key (default from the settings)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    import torch

    gpu = torch.cuda.is_available()
    args.precision = args.precision or ("bf16" if gpu else "no")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="asr-lora-bench-")
    work = Path(args.workdir)
    if args.random_shape:
        from asr_lora.bundled import resolve_model

        files_from = args.files_from or Path(resolve_model(MODEL))
        args.model = str(make_random_model(args.random_shape, files_from, work / f"random-{args.random_shape}"))
        model_desc = f"whisper-{args.random_shape}-shaped model with random weights"
        if set(args.phases) - {"throughput"}:
            parser.error("--random-shape measures throughput only (--phases throughput): CER of random weights means nothing")
    else:
        model_desc = "whisper-base (bundled)" if args.model == MODEL else args.model
    train = REPO / "data/demo/train.jsonl"
    args.train = str(concat_manifest(train, args.concat, work / f"concat{args.concat}") if args.concat > 1 else train)
    results = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "threads": torch.get_num_threads(),
               "python": platform.python_version(), "batch_size": args.batch_size, "budget_seconds": args.budget,
               "gpu": gpu, "model": args.model, "random_shape": args.random_shape, "model_desc": model_desc + (f", {args.quant} base" if args.quant != "none" else ""),
               "precision_desc": {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[args.precision]
               + (", gradient checkpointing" if args.gradient_checkpointing else ""),
               "train_desc": ("demo corpus train split, 360 synthetic Korean clips" if args.concat == 1 else
                              f"demo train clips joined {args.concat} at a time"),
               "mean_seconds": mean_duration(Path(args.train)), "throughput_steps": args.throughput_steps,
               "throughput": {}, "budget": {}, "eval": {}}
    previous = work / "results.json"
    if "throughput" not in args.phases and previous.is_file():  # later phases on an earlier run's results
        earlier = json.loads(previous.read_text())
        results.update({k: earlier[k] for k in ("throughput", "budget", "date") if k in earlier})
    if "throughput" in args.phases:
        for system in args.systems:
            results["throughput"][system] = spawn(system, "throughput", args.throughput_steps + 1, args)
    if "budget" in args.phases:
        for system in args.systems:
            tp = results["throughput"][system]
            spare = tp.get("precompute_seconds", 0.0)
            steps = max(2, int((args.budget - spare) / tp["step_seconds"]))
            results["budget"][system] = spawn(system, "budget", steps, args)
    if "eval" in args.phases:
        if not results["budget"]:
            parser.error("the eval phase needs the budget phase's adapters (run it, or point --workdir at a run)")
        for system in args.systems:
            results["eval"][system] = spawn(system, "eval", 0, args, adapter=results["budget"][system]["adapter"])
    print(json.dumps(results, indent=2))
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if args.write and set(args.systems) == set(SYSTEMS) and results["throughput"]:
        key = args.section or ("training" if not gpu and args.random_shape is None and args.concat == 1 else
                               f"training-{'gpu' if gpu else 'cpu'}-{args.random_shape or 'model'}-{args.quant}"
                               f"-concat{args.concat}")
        title = ("Training and evaluation: trimmed context vs 30 s vs the standard recipe" if key == "training" else
                 f"Training throughput: {model_desc}, {'unquantised' if args.quant == 'none' else args.quant} base, "
                 f"{results['precision_desc']}, "
                 f"mean clip {results['mean_seconds']:.1f} s, {results['device']}")
        write_benchmarks_md(markdown(results), key, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
