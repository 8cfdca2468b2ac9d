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

KsponSpeech-scale training (``--phases scale``), side by side on a KsponSpeech-like length mix (demo
clips joined into utterances of 2 to 15 s, mean 5.6 s, reproducibly): micro-batches of a fixed clip
count vs ``train.batch_seconds``, each loaded in the loop vs by background workers, and the standard
recipe on the same mix:

    python benchmarks/bench_training.py --phases scale --mix 200 --threads 1 --write

Evaluation speed (``--phases eval`` after ``budget``; ``--eval-batch-sizes``): asr-lora's evaluator at
several batch sizes, with where its time goes, vs the standard recipe's loops at ``--batch-size``:

    python benchmarks/bench_training.py --systems asr-lora-trimmed standard --eval-batch-sizes 8 16 50 --write

The GPU check (``benchmarks/run_gpu.sh``, ``--gpu-check``): large-v3-shaped random weights in bf16,
8-bit and 4-bit, trimmed vs 30 s vs the standard recipe, plus one real end-to-end run of the bundled
base; ``--dry-run`` runs the same code on a tiny shape on CPU, writing nothing into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL_REPEATS = 3  # asr-lora's dev passes per batch size (median); the stock loops run once (a minute or more each)
sys.path.insert(0, str(REPO))  # benchmark this checkout's asr_lora, whatever else is installed
SYSTEMS = ("asr-lora-trimmed", "asr-lora-30s", "standard")
MODEL = "bundled:whisper-base"
# Shapes of random-weight models for GPU throughput (the real checkpoints' configs).
SHAPES = {
    "tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                 vocab_size=51865),
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                 decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_mel_bins=80,
                 vocab_size=51865),
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                     decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128,
                     vocab_size=51866),
}
TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
# The KsponSpeech-like mix: target lengths log-normal (median e^1.8 = 6 s), kept within 2-15 s, each
# filled with whole demo clips: 200 utterances come out at a mean of 5.6 s (KsponSpeech: 5.6 s).
MIX_LOG_MEDIAN, MIX_LOG_SIGMA, MIX_RANGE = 1.8, 0.5, (2.0, 15.0)
GAP = 3200  # samples of silence (0.2 s) between joined clips


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


def mix_manifest(src: Path, n: int, out: Path, seed: int = 0) -> Path:
    """A KsponSpeech-like length mix: ``n`` utterances of 2 to 15 s, each the demo clips of ``src`` that
    follow in order (0.2 s of silence between) up to a length drawn from a log-normal (``MIX_*``),
    written as 16-bit wav files with a manifest (durations filled in). The same (src, n, seed), the
    same files."""
    import random

    import numpy as np
    import soundfile as sf

    from asr_lora.audio import SAMPLE_RATE, load_audio

    rows = read_manifest_rows(src)
    manifest = out / "train.jsonl"
    if manifest.is_file():
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    rng, k, lines = random.Random(seed), 0, []
    low, high = MIX_RANGE
    for u in range(n):
        target = min(high, max(low, rng.lognormvariate(MIX_LOG_MEDIAN, MIX_LOG_SIGMA)))
        group = [rows[k % len(rows)]]
        total = group[0]["duration"]
        k += 1
        while total < low or total + GAP / SAMPLE_RATE + rows[k % len(rows)]["duration"] <= target:
            group.append(rows[k % len(rows)])
            total += GAP / SAMPLE_RATE + group[-1]["duration"]
            k += 1
        gap = np.zeros(GAP, dtype=np.float32)
        audio = np.concatenate([x for r in group for x in (load_audio(r["audio"]), gap)][:-1])
        path = out / f"mix-{u:05d}.wav"
        sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
        lines.append(json.dumps({"id": path.stem, "audio": str(path), "text": " ".join(r["text"] for r in group),
                                 "duration": round(len(audio) / SAMPLE_RATE, 3)}, ensure_ascii=False))
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def durations_of(manifest: Path) -> list[float]:
    import soundfile as sf

    return [sf.info(r["audio"]).duration for r in read_manifest_rows(manifest)]


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
        "eval.zero_shot=false", "train.report_to=none",
        # like for like with the standard recipe: its LoRA, no non-speech rows, guard or timestamp labels
        "lora.target_modules=[q_proj,v_proj]", "data.nonspeech_rate=0", "data.nonspeech_dev=null", "data.guard=null",
        "train.timestamp_probability=0",
        *([f"train.batch_seconds={args.batch_seconds}"] if args.batch_seconds else []),
        *([f"train.num_workers={args.num_workers}"] if args.num_workers is not None else []),
    ])
    start = time.perf_counter()
    trainer = run_training(cfg, resume=False, progress=False)
    wall = time.perf_counter() - start
    from asr_lora.data.loader import resolve_num_workers
    from asr_lora.data.samplers import padded_seconds

    plan = trainer.plan  # the micro-batches each step took (one process, no accumulation)
    per_step = [len(b) for b in plan.take(0, 0, trainer.state.step)[0]]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_seconds" in r][1:]  # after the warm-up step
    seconds = sum(r["step_seconds"] for r in timed) or wall
    return {"wall_seconds": wall, "step_seconds": seconds / max(1, len(timed)),
            "utt_per_s": sum(per_step[r["step"] - 1] for r in timed) / seconds if timed else sum(per_step) / wall,
            "data_wait_seconds": sum(r["data_seconds"] for r in timed) / max(1, len(timed)),
            "largest_batch_seconds": max(padded_seconds(b, plan.durations, plan.floor_seconds) for b in plan.epoch(0)),
            "clips_per_batch": sum(map(len, plan.epoch(0))) / len(plan.epoch(0)),
            "workers": resolve_num_workers(cfg.train.num_workers, trainer.accelerator.device),
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
    hyps, steps, tokens = [], 0, 0
    with torch.no_grad():
        for i in range(0, len(ds), args.batch_size):
            batch = collator([ds[j] for j in range(i, min(i + args.batch_size, len(ds)))])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                out = model.generate(input_features=batch["input_features"].to(device), language="ko",
                                     task="transcribe", max_new_tokens=225)
            hyps += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
            steps, tokens = steps + decoder_steps(out, tokenizer), tokens + text_tokens(out, tokenizer)
    generate_seconds = time.perf_counter() - start
    return {"seconds": trainer_seconds, "cer": metrics["eval_cer"], "generate_only_seconds": generate_seconds,
            "generate_only_cer": score(refs, hyps).cer, "precompute_seconds": precompute,
            "generate_only_steps": steps, "generate_only_tokens": tokens}


def decoder_steps(ids, tokenizer) -> int:
    """Decoding steps a batch of output ids took: its length past the forced prompt."""
    prompt = sum(1 for t in ids[0].tolist() if t >= tokenizer.eos_token_id and t != tokenizer.eos_token_id) or 0
    return ids.shape[1] - prompt


def text_tokens(ids, tokenizer) -> int:
    """Text tokens decoded (special tokens, padding and end of text left out)."""
    return int((ids < tokenizer.eos_token_id).sum())


# --------------------------------------------------------------------------- scoring (same evaluator for all)


def eval_asr_lora(adapter: str, args) -> dict:
    """One dev pass with asr-lora's evaluator (``evaluate_rows``, training's decode options) at each of
    ``--eval-batch-sizes`` (the median of :data:`EVAL_REPEATS` passes), after a warm-up, and where the time of one more pass at the first size goes:
    the transcriber's encoder pass (features + encoder) and its greedy decoding, timed around its own
    methods (the decode path itself is untouched); the rest is audio loading, batching and scoring."""
    from asr_lora.backends import DecodeOptions
    from asr_lora.data.manifest import read_rows
    from asr_lora.evaluate import evaluate_rows
    from asr_lora.sources import ModelSource, load_transcriber

    # as training's dev evaluation: greedy once (no temperature fallback), capped by the references
    options = DecodeOptions(max_new_tokens=128, bound_by_reference=True, temperatures=(0.0,))
    transcriber = load_transcriber(ModelSource("adapter", adapter), options)
    rows = read_rows(REPO / "data/demo/dev.jsonl")[0]
    evaluate_rows(transcriber, rows[:4], batch_size=4)  # warm-up
    by_batch = {}
    for size in args.eval_batch_sizes:  # the median of three passes: a short pass is easily disturbed
        passes = [evaluate_rows(transcriber, rows, batch_size=size) for _ in range(EVAL_REPEATS)]
        by_batch[str(size)] = {"seconds": statistics.median(r.seconds for r in passes), "cer": passes[0].report.cer,
                               "passes": [round(r.seconds, 2) for r in passes]}
    spent = {"encode": 0.0, "decode": 0.0, "no_speech": 0.0, "steps": 0, "tokens": 0}
    encode, generate, first_step = transcriber.encode, transcriber._generate, transcriber._first_step

    def timed_encode(audios):
        t0 = time.perf_counter()
        out = encode(audios)
        spent["encode"] += time.perf_counter() - t0
        return out

    def timed_generate(*a, **k):  # every generate call of the decode path
        t0 = time.perf_counter()
        out = generate(*a, **k)
        spent["decode"] += time.perf_counter() - t0
        spent["steps"] += decoder_steps(out.sequences, transcriber.tokenizer)
        spent["tokens"] += text_tokens(out.sequences, transcriber.tokenizer)
        return out

    def timed_first_step(*a, **k):  # the decoder step that reads the no-speech probability (greedy goes on from it)
        t0 = time.perf_counter()
        out = first_step(*a, **k)
        spent["no_speech"] += time.perf_counter() - t0
        return out

    transcriber.encode, transcriber._generate, transcriber._first_step = timed_encode, timed_generate, timed_first_step
    result = evaluate_rows(transcriber, rows, batch_size=args.eval_batch_sizes[0])
    spent.update(total=result.seconds, batch_size=args.eval_batch_sizes[0])
    main = by_batch.get(str(args.batch_size), by_batch[str(args.eval_batch_sizes[0])])
    return {"seconds": main["seconds"], "cer": main["cer"], "by_batch": by_batch, "split": spent}


def score_adapter(adapter: str, manifest: Path, args) -> dict:
    from asr_lora.backends import DecodeOptions
    from asr_lora.data.manifest import read_rows
    from asr_lora.evaluate import evaluate_rows
    from asr_lora.sources import ModelSource, load_transcriber

    # as training's dev evaluation: greedy once (no temperature fallback), capped by the references
    options = DecodeOptions(max_new_tokens=128, bound_by_reference=True, temperatures=(0.0,))
    transcriber = load_transcriber(ModelSource("adapter", adapter), options)
    result = evaluate_rows(transcriber, read_rows(manifest)[0], batch_size=args.batch_size)
    return {"cer": result.report.cer, "seconds": result.seconds}


# --------------------------------------------------------------------------- orchestration


def child(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    variant = ((f"-{args.batch_seconds:g}s" if args.batch_seconds else "")
               + (f"-{args.num_workers}w" if args.num_workers is not None else "")
               + (f"-{args.quant}" if args.quant != "none" else ""))
    out = Path(args.workdir) / f"{args.system}-{args.phase}{variant}"
    steps = args.steps
    if args.phase == "eval":
        if args.system == "standard":
            result = standard_eval(args.adapter, args)
        else:
            result = eval_asr_lora(args.adapter, args)
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


def spawn(system: str, phase: str, steps: int, args, adapter: str | None = None, timeout: float | None = None,
          batch_seconds: float | None = None, num_workers: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--system", system, "--phase", phase, "--steps", str(steps),
           "--batch-size", str(args.batch_size), "--workdir", args.workdir, "--model", args.model,
           "--quant", args.quant, "--precision", args.precision, "--train", str(args.train),
           "--eval-batch-sizes", *map(str, args.eval_batch_sizes or [args.batch_size])]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if adapter:
        cmd += ["--adapter", adapter]
    if batch_seconds:
        cmd += ["--batch-seconds", str(batch_seconds)]
    if num_workers is not None:
        cmd += ["--num-workers", str(num_workers)]
    print(f"# {phase}: {system}, {steps} steps" + (f", batch_seconds {batch_seconds}" if batch_seconds else "")
          + (f", {num_workers} workers" if num_workers is not None else ""), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} {phase} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_average"] = os.getloadavg()[0]  # other work on the machine when it ended
    return result


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


STANDARD_SCALE_STEPS = 6
SCALE_VARIANTS = (("fixed", "loop"), ("fixed", "background"), ("seconds", "loop"), ("seconds", "background"))


def fixed_batch_seconds(manifest: Path, batch_size: int) -> float:
    """Mean padded seconds of the fixed-size micro-batches of an epoch: the ``batch_seconds`` that asks
    the same work per micro-batch on average (so the two compare at equal batch work)."""
    from asr_lora.data.samplers import length_grouped_batches, padded_seconds

    durations = durations_of(manifest)
    batches = length_grouped_batches(durations, batch_size, seed=42, epoch=0)
    return round(sum(padded_seconds(b, durations) for b in batches) / len(batches))


def run_scale(args, results: dict) -> None:
    """The four asr-lora variants (fixed clips / batch_seconds x in the loop / background) and the
    standard recipe, throughput on the mix, each in its own process."""
    seconds = args.batch_seconds or fixed_batch_seconds(Path(args.train), args.batch_size)
    workers = args.num_workers if args.num_workers is not None else (None if results["gpu"] else 1)
    results["scale_batch_seconds"], results["scale_workers"] = seconds, workers
    for batching, loading in SCALE_VARIANTS:
        results["scale"][f"{batching}-{loading}"] = spawn(
            "asr-lora-trimmed", "throughput", args.throughput_steps + 1, args,
            batch_seconds=seconds if batching == "seconds" else None, num_workers=0 if loading == "loop" else workers)
    # every clip of the standard recipe is 30 s of features: its steps cost the same whatever the mix,
    # so a few of them measure it (and it is by far the slowest)
    results["scale_standard_steps"] = min(args.throughput_steps, STANDARD_SCALE_STEPS)
    results["scale"]["standard"] = spawn("standard", "throughput", results["scale_standard_steps"] + 1, args)


def scale_markdown(results: dict) -> str:
    sc, mem = results["scale"], "peak GPU memory" if results["gpu"] else "peak memory (RSS)"
    base = sc["standard"]["utt_per_s"]
    workers = results["scale_workers"]
    loading = {"loop": "in the loop", "background": f"{workers if workers is not None else 'auto'} worker(s)"}
    lines = [setting_line(results).replace("batch ", "fixed batch ", 1), "",
             f"| system | micro-batch | loading | train utt/s | vs standard | step s | data wait per step | "
             f"largest micro-batch (padded audio) | {mem} |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for batching, how in SCALE_VARIANTS:
        r = sc[f"{batching}-{how}"]
        size = (f"{results['batch_size']} clips" if batching == "fixed" else
                f"<= {results['scale_batch_seconds']:g} s ({r['clips_per_batch']:.1f} clips on average)")
        lines.append(f"| asr-lora trimmed | {size} | {loading[how]} | {r['utt_per_s']:.2f} | {r['utt_per_s'] / base:.1f}x "
                     f"| {r['step_seconds']:.2f} | {1000 * r['data_wait_seconds']:.0f} ms | "
                     f"{r['largest_batch_seconds']:.0f} s | {r['peak_memory_mb'] / 1024:.1f} GB |")
    r = sc["standard"]
    lines.append(f"| standard (30 s features precomputed, `Seq2SeqTrainer`) | {results['batch_size']} clips | "
                 f"`datasets.map` before training ({r['precompute_seconds']:.0f} s) | {base:.2f} | 1.0x | "
                 f"{r['step_seconds']:.2f} | - | {30 * results['batch_size']} s | {r['peak_memory_mb'] / 1024:.1f} GB |")

    def overlap(batching: str) -> float:
        loop, background = sc[f"{batching}-loop"], sc[f"{batching}-background"]
        return 1 - background["data_wait_seconds"] / max(loop["data_wait_seconds"], 1e-9)

    loads = ", ".join(f"{r['load_average']:.1f}" for r in sc.values())
    lines += ["", f"Throughput over {results['throughput_steps']} optimizer steps after one warm-up step (the standard "
              f"recipe: {results.get('scale_standard_steps', results['throughput_steps'])}; its clips are all 30 s of "
              "features, so its steps cost the same on any mix), each system in "
              f"its own process, utterances counted per step from the batch plan. `batch_seconds` = "
              f"{results['scale_batch_seconds']:g} s is the mean padded audio of the fixed batches of "
              f"{results['batch_size']} on this mix (equal work per micro-batch on average). Data wait: the "
              "loop's time per step getting its micro-batches (`data_seconds` in metrics.jsonl): the whole "
              "collation (audio decoding, log-mel, labels) in the loop, only the wait for a batch not yet "
              f"ready with background workers: loader overlap {100 * overlap('fixed'):.0f}% (fixed) and "
              f"{100 * overlap('seconds'):.0f}% (batch_seconds) of the loading time hidden. Largest micro-batch: "
              "clips x longest clip over the epoch's plan. Memory: the training process"
              + ("" if results["gpu"] else " (workers are forks of it: their RSS is mostly its pages, shared "
                 "copy-on-write, and is not added)") + ". "
              f"Load average of the machine after each system: {loads}."]
    return "\n".join(lines)


def eval_markdown(results: dict) -> str:
    ev, bs = results["eval"], results["batch_size"]
    std, ours = ev["standard"], ev["asr-lora-trimmed"]
    stock = std["generate_only_seconds"]
    lines = [f"Measured {results['date']} on {results['device']} (torch threads: {results['threads']}), "
             f"{results['model_desc']}, one dev pass over data/demo/dev.jsonl (50 clips, mean 3.1 s), each "
             f"system on its own adapter, trained for {results['budget_seconds']:g} s in the same run "
             f"({results['budget']['asr-lora-trimmed']['steps']} steps trimmed, "
             f"{results['budget']['standard']['steps']} steps standard).", "",
             "| evaluation | features | batch | dev pass | vs stock loop | dev CER | decoding steps | text tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| stock loop (PEFT int8 example: `generate`, `max_new_tokens=225`) | 30 s, precomputed | {bs} | "
             f"{stock:.1f} s | 1.0x | {std['generate_only_cer']:.4f} | {std.get('generate_only_steps', '-')} | "
             f"{std.get('generate_only_tokens', '-')} |",
             f"| `Seq2SeqTrainer.evaluate` (HF blog: generate, then the loss) | 30 s, precomputed | {bs} | "
             f"{std['seconds']:.1f} s | {stock / std['seconds']:.1f}x | {std['cer']:.4f} | - | - |"]
    split = ours["split"]
    for size, r in ours["by_batch"].items():
        steps = f"{split['steps']} | {split['tokens']}" if int(size) == split["batch_size"] else "- | -"
        default = " (`eval.batch_size` default)" if int(size) == 16 else ""
        lines.append(f"| asr-lora (`evaluate_rows`, trimmed){default} | trimmed, from audio | {size} | {r['seconds']:.1f} s "
                     f"| **{stock / r['seconds']:.1f}x** | {r['cer']:.4f} | {steps} |")
    no_speech = split.get("no_speech", 0.0)
    rest = split["total"] - split["encode"] - split["decode"] - no_speech
    lines += ["", f"Where asr-lora's pass goes (one more pass at batch {split['batch_size']}, "
              f"{split['total']:.1f} s): greedy decoding {split['decode']:.1f} s "
              f"({100 * split['decode'] / split['total']:.0f}%), the no-speech probability step {no_speech:.1f} s "
              f"({100 * no_speech / split['total']:.0f}%), log-mel and encoder {split['encode']:.1f} s "
              f"({100 * split['encode'] / split['total']:.0f}%), audio loading, batching and scoring {rest:.1f} s "
              f"({100 * rest / split['total']:.0f}%). Decoding steps: summed over batches (a batch decodes until "
              "its last clip ends); text tokens: those of the hypotheses (end of text and padding left out). asr-lora's "
              "pass is `asr-lora eval`'s (in training it also computes the dev loss from the same encoder pass); its "
              f"dev pass is the median of {EVAL_REPEATS} passes (" + "; ".join(
                  f"batch {size}: {', '.join(f'{x:.1f}' for x in r['passes'])} s" for size, r in ours["by_batch"].items()
                  if r.get("passes")) + "), the stock loops ran once. The stock loop's features "
              f"(`datasets.map`, {std['precompute_seconds']:.1f} s) are not counted in its pass. Load average of "
              f"the machine after each system: {std['load_average']:.1f} (standard), {ours['load_average']:.1f} (asr-lora)."]
    return "\n".join(lines)


GPU_ROWS = (("bf16", "none", "asr-lora-trimmed", None), ("bf16", "none", "asr-lora-trimmed", 0),
            ("bf16", "none", "asr-lora-30s", None), ("bf16", "none", "standard", None),
            ("4-bit", "4bit", "asr-lora-trimmed", None), ("4-bit", "4bit", "asr-lora-30s", None),
            ("4-bit", "4bit", "standard", None), ("8-bit", "8bit", "asr-lora-trimmed", None),
            ("8-bit", "8bit", "asr-lora-30s", None), ("8-bit", "8bit", "standard", None))
E2E_STAGES = ("train", "eval", "merge", "export-ct2", "transcribe")


def gpu_markdown(check: dict) -> str:
    """BENCHMARKS.md's GPU section from the check's results; what did not run reads "not measured"."""
    rows, e2e = check.get("rows", {}), check.get("e2e", {})
    na = "not measured"
    if check.get("dry_run"):
        lines = [f"CPU dry run of `bash benchmarks/run_gpu.sh --dry-run` {check['date']} ({check['seconds']:.0f} s): a "
                 "tiny random shape, 2 steps, batch 4: these numbers check the script, they measure nothing."]
    elif check.get("device"):
        lines = [f"Measured {check['date']} on {check['device']} by `bash benchmarks/run_gpu.sh` "
                 f"({check['seconds']:.0f} s in all): whisper-large-v3-shaped model with random weights (speed "
                 "does not depend on the weight values; no CER), LoRA r=32 q_proj/v_proj, batch "
                 f"{check['batch_size']}, bf16 autocast, train clips: the KsponSpeech-like mix (mean "
                 f"{check['mean_seconds']:.1f} s); throughput over {check['steps']} steps after one warm-up step, "
                 "each system in its own process."]
    else:
        lines = ["Not measured: no GPU was lent to this work. `bash benchmarks/run_gpu.sh` (within 8 minutes on one "
                 "GPU) fills this section: whisper-large-v3-shaped random weights in bf16, 8-bit and 4-bit, "
                 "trimmed vs 30 s vs the standard recipe on the KsponSpeech-like mix, and one real end-to-end "
                 "run on the bundled base. Its CPU dry run (`bash benchmarks/run_gpu.sh --dry-run`: the same "
                 "code on a tiny random shape and 2 steps) is what has run."]
    memory = "peak memory (RSS)" if check.get("dry_run") else "peak GPU memory"
    lines += ["", f"| base | system | loading | train utt/s | vs standard | {memory} | data wait per step |",
              "|---|---|---|---:|---:|---:|---:|"]
    for label, quant, system, workers in GPU_ROWS:
        r = rows.get(gpu_key(quant, system, workers)) or {}
        std = rows.get(gpu_key(quant, "standard", None)) or {}
        loading = ("`datasets.map` before training" if system == "standard" else "in the loop"
                   if workers == 0 or r.get("workers") == 0 else f"{r.get('workers', 'auto')} background workers")
        if "utt_per_s" not in r:
            why = f" ({r['error']})" if r.get("error") else ""
            lines.append(f"| {label} | {system} | {loading} | {na}{why} | {na} | {na} | {na} |")
            continue
        ratio = f"{r['utt_per_s'] / std['utt_per_s']:.1f}x" if "utt_per_s" in std else na
        wait = f"{1000 * r['data_wait_seconds']:.0f} ms" if "data_wait_seconds" in r else "-"
        lines.append(f"| {label} | {system} | {loading} | {r['utt_per_s']:.2f} | {ratio} | "
                     f"{r['peak_memory_mb'] / 1024:.1f} GB | {wait} |")
    bg = rows.get(gpu_key("none", "asr-lora-trimmed", None), {})
    loop = rows.get(gpu_key("none", "asr-lora-trimmed", 0), {})
    if bg.get("workers") and "data_wait_seconds" in loop:
        hidden = 1 - bg["data_wait_seconds"] / max(loop["data_wait_seconds"], 1e-9)
        lines += ["", f"Loader overlap (bf16, trimmed): background workers hide {100 * hidden:.0f}% of the loading "
                  f"time the loop spends when it collates itself ({1000 * loop['data_wait_seconds']:.0f} ms per step)."]
    lines += ["", "End to end on the bundled whisper-base (real weights, demo corpus, the demo recipe on the GPU):", "",
              "| stage | seconds | result |", "|---|---:|---|"]
    for stage in E2E_STAGES:
        r = e2e.get(stage) or {}
        lines.append(f"| {r.get('what', stage)} | {r['seconds']:.1f} | {r['result']} |" if "seconds" in r else
                     f"| {stage} | {na} | {r.get('error', na)} |")
    return "\n".join(lines)


def gpu_key(quant: str, system: str, workers: int | None) -> str:
    return f"{quant}/{system}" + ("/loop" if workers == 0 else "")


def gpu_check(args) -> int:
    """benchmarks/run_gpu.sh: the GPU rows and the end-to-end run within ``--time-limit`` seconds (what
    does not fit reads "not measured"); writes BENCHMARKS.md's GPU section unless ``--dry-run`` (the
    same code on CPU with a tiny shape and 2 steps: the section goes to WORKDIR/gpu.md only)."""
    import torch

    from asr_lora.bundled import resolve_model

    start, dry = time.monotonic(), args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no GPU here: run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    work = Path(args.workdir)
    files_from = args.files_from or Path(resolve_model(MODEL))
    shape, steps = ("tiny", 2) if dry else ("large-v3", args.throughput_steps)
    args.model = str(make_random_model(shape, files_from, work / f"random-{shape}"))
    args.train = str(mix_manifest(REPO / "data/demo/train.jsonl", 24 if dry else 160, work / "mix"))
    args.batch_size = 4 if dry else args.batch_size
    check = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "dry_run": dry, "batch_size": args.batch_size,
             "steps": steps, "mean_seconds": mean_duration(Path(args.train)), "rows": {}, "e2e": {}}
    left = lambda: args.time_limit - (time.monotonic() - start)  # noqa: E731
    e2e_reserve = 150 if not dry else 0  # the end-to-end run goes after the bf16 rows: keep it room
    for i, (label, quant, system, workers) in enumerate(GPU_ROWS):
        if i == 4:
            end_to_end(args, check["e2e"], left)
        key = gpu_key(quant, system, workers)
        budget = left() - (e2e_reserve if i < 4 else 0)
        if budget < 20:
            check["rows"][key] = {"error": "out of time"}
            continue
        args.quant = quant
        try:
            # a dry run on CPU would load in the loop by default: give it a worker, to run that path too
            workers = 1 if dry and workers is None and system != "standard" else workers
            check["rows"][key] = spawn(system, "throughput", steps + 1, args, timeout=budget, num_workers=workers)
        except subprocess.TimeoutExpired:
            check["rows"][key] = {"error": "out of time"}
        except RuntimeError as e:
            check["rows"][key] = {"error": "failed: " + str(e).strip().splitlines()[-1][:120]}
        print(f"# {key}: {check['rows'][key]}", file=sys.stderr, flush=True)
    check["seconds"] = time.monotonic() - start
    (work / "gpu.json").write_text(json.dumps(check, indent=2))
    section = gpu_markdown(check)
    (work / "gpu.md").write_text(section + "\n")
    print(section)
    if not dry:
        write_benchmarks_md(section, "gpu", "GPU")
    failed = [k for k, r in check["rows"].items() if "failed" in r.get("error", "")]
    failed += [k for k, r in check["e2e"].items() if "error" in r]
    return 1 if failed else 0


def end_to_end(args, e2e: dict, left) -> None:
    """The bundled base through the CLI: train, eval, merge, export-ct2, transcribe (each timed)."""
    work, dry = Path(args.workdir), args.dry_run
    run, merged, ct2 = work / "e2e-run", work / "e2e-merged", work / "e2e-ct2"
    steps = 2 if dry else 50
    clips = sorted((REPO / "data/demo/audio/test").glob("*.flac"))[: 3 if dry else 10]
    small = ["--n-clips", "4", "--tolerance", "100"] if dry else []  # dry: a 2-step model, any CER goes
    stages = {
        "train": ([*cli("train"), str(REPO / "recipes/demo/whisper-base_lora.yaml"), f"train.max_steps={steps}",
                   f"train.eval_every={steps}", f"train.save_every={steps}", f"train.output_dir={run}",
                   "train.report_to=none", "eval.zero_shot=false", *(["eval.max_samples=4"] if dry else []),
                   "--fresh", "--no-progress"], f"train {steps} steps (trimmed, batch 8)"),
        "eval": ([*cli("eval"), "--adapter", str(run / "final"), "--data", str(REPO / "data/demo/test.jsonl"), "--out",
                  str(work / "e2e-eval"), *(["--limit", "8"] if dry else []), "--no-progress"], "eval on test"),
        "merge": ([*cli("merge"), str(run / "final"), "--out", str(merged), *small], "merge (parity check)"),
        "export-ct2": ([*cli("export-ct2"), str(merged), "--out", str(ct2), *small], "export-ct2 int8 (CER check)"),
        "transcribe": ([*cli("transcribe"), "--ct2", str(ct2), *map(str, clips), "--out", str(work / "e2e-tx"),
                        "--no-progress"], f"transcribe {len(clips)} test clips (CTranslate2)"),
    }
    for stage, (cmd, what) in stages.items():
        if left() < 15:
            e2e[stage] = {"error": "out of time"}
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left(), cwd=REPO)
        except subprocess.TimeoutExpired:
            e2e[stage] = {"error": "out of time"}
            continue
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1][:120] if proc.stderr.strip() else ""
            e2e[stage] = {"error": f"failed (exit {proc.returncode}): {last}"}
            continue
        e2e[stage] = {"seconds": seconds, "what": what, "result": e2e_result(stage, work, run)}
        print(f"# e2e {stage}: {e2e[stage]}", file=sys.stderr, flush=True)


def cli(command: str) -> list[str]:
    return [sys.executable, "-m", "asr_lora.cli", command]


def e2e_result(stage: str, work: Path, run: Path) -> str:
    if stage == "train":
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step_seconds"] for r in records if "step_seconds" in r][1:] or [0.0]
        cer = [r["cer"] for r in records if "cer" in r]
        return f"{sum(steps) / len(steps):.3f} s/step, dev CER {cer[-1]:.4f}" if cer else "no eval"
    if stage == "eval":
        summary = json.loads((work / "e2e-eval" / "summary.json").read_text())
        return f"test CER {summary['cer']:.4f} on {summary['n']} clips, decode {summary['decode_seconds']:.1f} s"
    if stage == "transcribe":
        return f"{len(list((work / 'e2e-tx').iterdir()))} transcripts written"
    return "check passed"


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
                        choices=["throughput", "budget", "eval", "scale"],
                        help="phases to run; a later phase alone reuses the earlier ones' results.json in --workdir; "
                        "scale: fixed batch vs batch_seconds, in the loop vs background workers, and the standard "
                        "recipe, on the KsponSpeech-like mix (--mix)")
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
    parser.add_argument("--mix", type=int, default=None, metavar="N",
                        help="train on N utterances of the KsponSpeech-like mix (2-15 s, mean 5.6 s at N=200; "
                        "default 200 for --phases scale)")
    parser.add_argument("--batch-seconds", type=float, default=None,
                        help="scale phase: train.batch_seconds (default: the mean padded audio of the fixed batches)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="scale phase: workers of the background variants (default: 1 on CPU, automatic on a GPU)")
    parser.add_argument("--eval-batch-sizes", type=int, nargs="+", default=None,
                        help="eval phase: asr-lora's batch sizes (default: --batch-size); the standard loops use --batch-size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every system (default: torch's)")
    parser.add_argument("--gpu-check", action="store_true", help="benchmarks/run_gpu.sh: the GPU section of BENCHMARKS.md")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu-check: a tiny shape on CPU, nothing written")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="with --gpu-check: seconds for the whole check (default 450; dry run 3000)")
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
    if args.gpu_check:
        args.time_limit = args.time_limit or (3000 if args.dry_run else 450)
        args.batch_size = 16 if args.batch_size == 8 and not args.dry_run else args.batch_size
        return gpu_check(args)
    if "scale" in args.phases and args.mix is None:
        args.mix = 200
    if args.random_shape:
        from asr_lora.bundled import resolve_model

        files_from = args.files_from or Path(resolve_model(MODEL))
        args.model = str(make_random_model(args.random_shape, files_from, work / f"random-{args.random_shape}"))
        model_desc = f"whisper-{args.random_shape}-shaped model with random weights"
        if set(args.phases) - {"throughput", "scale"}:
            parser.error("--random-shape measures throughput only (--phases throughput/scale): CER of random weights "
                         "means nothing")
    else:
        model_desc = "whisper-base (bundled)" if args.model == MODEL else args.model
    train = REPO / "data/demo/train.jsonl"
    args.train = str(concat_manifest(train, args.concat, work / f"concat{args.concat}") if args.concat > 1 else train)
    if args.mix:
        args.train = str(mix_manifest(train, args.mix, work / f"mix{args.mix}"))
    results = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "threads": args.threads or torch.get_num_threads(),
               "python": platform.python_version(), "batch_size": args.batch_size, "budget_seconds": args.budget,
               "gpu": gpu, "model": args.model, "random_shape": args.random_shape, "model_desc": model_desc + (f", {args.quant} base" if args.quant != "none" else ""),
               "precision_desc": {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[args.precision]
               + (", gradient checkpointing" if args.gradient_checkpointing else ""),
               "train_desc": (f"KsponSpeech-like mix of {args.mix} utterances of 2-15 s (median "
                              f"{statistics.median(durations_of(Path(args.train))):.1f} s), demo clips joined"
                              if args.mix else "demo corpus train split, 360 synthetic Korean clips" if args.concat == 1
                              else f"demo train clips joined {args.concat} at a time"),
               "mean_seconds": mean_duration(Path(args.train)), "throughput_steps": args.throughput_steps,
               "throughput": {}, "budget": {}, "eval": {}, "scale": {}}
    previous = work / "results.json"
    if "throughput" not in args.phases and previous.is_file():  # later phases on an earlier run's results
        earlier = json.loads(previous.read_text())
        results.update({k: earlier[k] for k in ("throughput", "budget", "date") if k in earlier})
    if "scale" in args.phases:
        run_scale(args, results)
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
    if args.write and results["scale"]:
        write_benchmarks_md(scale_markdown(results), "training-scale", "KsponSpeech-scale training: batch_seconds "
                            f"and background loading, {results['device']}")
    if args.write and {"asr-lora-trimmed", "standard"} <= set(results["eval"]):
        write_benchmarks_md(eval_markdown(results), "evaluation", "Evaluation: asr-lora's dev pass vs the stock "
                            "generate loop, one run")
    if args.write and set(args.systems) == set(SYSTEMS) and results["throughput"] and "scale" not in args.phases:
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
