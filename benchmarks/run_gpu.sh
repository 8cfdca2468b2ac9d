#!/usr/bin/env bash
# The GPU check: fills BENCHMARKS.md's GPU section within 8 minutes on one GPU.
#   - throughput of a whisper-large-v3-shaped model with random weights in bf16, 4-bit and 8-bit:
#     asr-lora trimmed (background loading; bf16 also loading in the loop) vs 30 s vs the standard
#     recipe, on the KsponSpeech-like mix: utt/s, peak GPU memory, data wait per step (loader overlap);
#   - one real end-to-end run on the bundled whisper-base: train 50 steps, eval, merge, export-ct2,
#     transcribe.
# Whatever does not fit the time limit (450 s of work; `timeout` stops the rest at 480 s) reads
# "not measured" in the table, never an estimate.
#
# Usage: bash benchmarks/run_gpu.sh [--dry-run] [--files-from FOLDER]
#   --dry-run      the same code on CPU, a tiny random shape and 2 steps; writes WORKDIR/gpu.md only
#                  (prints WORKDIR), never BENCHMARKS.md
#   --files-from   a folder with a Whisper config.json, generation_config.json, processor_config.json,
#                  tokenizer.json and tokenizer_config.json (default: the bundled base)
set -euo pipefail
cd "$(dirname "$0")/.."
limit=480
for arg in "$@"; do [ "$arg" = "--dry-run" ] && limit=3600; done
exec timeout "$limit" python3 benchmarks/bench_training.py --gpu-check "$@"
