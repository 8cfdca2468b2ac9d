"""Transcription speed: HF merged vs CTranslate2 int8, trimmed audio context vs 30 s windows.

Takes two LoRA checkpoints of the same base, one trained with ``model.audio_context=trimmed`` and one
with ``full`` (``bench_training.py`` leaves both in its work folder), merges each (``asr-lora merge``,
parity-checked), exports each to CTranslate2 int8 (``asr-lora export-ct2``, parity-checked), then
decodes the same manifest with all four and reports real-time speed (audio seconds per decode
second, features + decoding, audio loading excluded) and CER. Each model runs in the audio context
it was trained in, as every asr-lora command runs it; CTranslate2 is fed trimmed features for the
trimmed model (it accepts mel input shorter than 3000 frames). One decode pass warms up first.

    python benchmarks/bench_transcribe.py --trimmed RUN/final --full RUN30/final --write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(adapter: Path, work: Path, tag: str, data: Path) -> tuple[Path, Path, dict]:
    from asr_lora.export import export_ct2, merge_adapter

    merged, ct2 = work / f"{tag}-merged", work / f"{tag}-ct2-int8"
    times = {}
    if not merged.exists():
        t0 = time.perf_counter()
        merge_adapter(adapter, merged, data=data, log=lambda *a: None)
        times["merge_seconds"] = time.perf_counter() - t0
    if not ct2.exists():
        t0 = time.perf_counter()
        export_ct2(merged, ct2, quantization="int8", data=data, log=lambda *a: None)
        times["export_seconds"] = time.perf_counter() - t0
    return merged, ct2, times


def measure(kind: str, folder: Path, manifest: Path, batch_size: int) -> dict:
    from asr_lora.backends import DecodeOptions
    from asr_lora.evaluate import evaluate_manifest
    from asr_lora.sources import ModelSource, load_transcriber

    transcriber = load_transcriber(ModelSource(kind, str(folder)), DecodeOptions(max_new_tokens=128))
    evaluate_manifest(transcriber, manifest, batch_size=batch_size, limit=batch_size, progress=False)  # warm-up
    result = evaluate_manifest(transcriber, manifest, batch_size=batch_size, progress=False)
    summary = result.summary()
    return {"backend": "HF merged (fp32)" if kind == "merged" else "CTranslate2 int8",
            "audio_context": transcriber.settings.audio_context, "n": summary["n"], "cer": summary["cer"],
            "decode_seconds": result.decode_seconds, "audio_seconds": result.audio_seconds,
            "speed_x_realtime": result.audio_seconds / result.decode_seconds}


def markdown(results: dict) -> str:
    rows = results["runs"]
    base = next(r for r in rows if r["backend"].startswith("HF") and r["audio_context"] == "full")
    lines = [
        f"Measured {results['date']} on {results['device']} (torch threads: {results['threads']}), "
        f"{results['n']} test clips ({results['audio_seconds']:.0f} s of audio) of {results['manifest']}, "
        f"batch {results['batch_size']}, greedy decoding capped at 128 tokens. Speed is audio seconds per "
        "decode second (features + decoding; audio loading excluded).",
        "",
        "| backend | audio context | speed (x real time) | vs HF 30 s | decode s | test CER |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['backend']} | {'trimmed' if r['audio_context'] == 'trimmed' else '30 s'} | "
                     f"{r['speed_x_realtime']:.1f} | {r['speed_x_realtime'] / base['speed_x_realtime']:.1f}x | "
                     f"{r['decode_seconds']:.1f} | {r['cer']:.4f} |")
    lines += ["", "Each model is the bench_training.py budget run trained in that audio context, merged and "
              "exported by asr-lora (both parity checks passed). Numbers from one run."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trimmed", required=True, type=Path, help="LoRA checkpoint trained with audio_context=trimmed")
    parser.add_argument("--full", required=True, type=Path, help="LoRA checkpoint trained with audio_context=full")
    parser.add_argument("--data", type=Path, default=REPO / "data/demo/test.jsonl", help="manifest to transcribe")
    parser.add_argument("--parity-data", type=Path, default=REPO / "data/demo/dev.jsonl")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_training import device_name, write_benchmarks_md

    work = args.workdir or Path(tempfile.mkdtemp(prefix="asr-lora-bench-tx-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "threads": torch.get_num_threads(),
               "manifest": str(args.data.relative_to(REPO) if args.data.is_relative_to(REPO) else args.data),
               "batch_size": args.batch_size, "build": {}, "runs": []}
    for tag, adapter in (("full", args.full), ("trimmed", args.trimmed)):
        print(f"# merge + export: {tag}", file=sys.stderr, flush=True)
        merged, ct2, results["build"][tag] = build(adapter, work, tag, args.parity_data)
        for kind, folder in (("merged", merged), ("ct2", ct2)):
            print(f"# transcribe: {tag} {kind}", file=sys.stderr, flush=True)
            results["runs"].append(measure(kind, folder, args.data, args.batch_size))
    results["n"] = results["runs"][0]["n"]
    results["audio_seconds"] = results["runs"][0]["audio_seconds"]
    print(json.dumps(results, indent=2))
    if args.write:
        write_benchmarks_md(markdown(results), "transcription",
                            "Transcription: HF merged vs CTranslate2 int8, trimmed vs 30 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
