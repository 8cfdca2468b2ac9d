#!/usr/bin/env bash
# GPU throughput benchmarks (random-weight models of real shapes), each writing its table into
# BENCHMARKS.md. Usage: bash benchmarks/run_gpu.sh [FILES_FROM]
#   FILES_FROM: a folder with a Whisper config.json, generation_config.json, processor_config.json,
#   tokenizer.json and tokenizer_config.json (default: the bundled base, which needs asr-lora[bundled]).
set -euo pipefail
cd "$(dirname "$0")/.."
files=()
[ $# -gt 0 ] && files=(--files-from "$1")
work=$(mktemp -d)
run() { python3 benchmarks/bench_training.py "${files[@]}" --phases throughput --workdir "$work" --write "$@"; }
run --random-shape base --batch-size 32 --throughput-steps 10
run --random-shape base --batch-size 32 --throughput-steps 10 --concat 2
run --random-shape large-v3 --batch-size 8 --throughput-steps 6
run --random-shape large-v3 --batch-size 8 --throughput-steps 6 --concat 2
run --random-shape large-v3 --batch-size 8 --throughput-steps 6 --quant 8bit
