#!/usr/bin/env python3
"""Decoding with and without timestamp tokens and a prompt: CER, seconds, and whether cues fall in the clip.

A model (default: the bundled base; ``--adapter DIR`` for a tuned checkpoint) decodes the first N demo
test clips greedily, once (no fallback), in the one decode path: plain; ``timestamps`` (Whisper's
timestamp tokens, ``asr-lora transcribe --timestamps``); and ``prompt`` (the previous test clip's
reference text as ``<|startofprev|>`` prompt: a prompt that does not match the audio, to see whether it
derails the decoding). Prints one line per mode.

    python benchmarks/measure_timestamps.py --n 30           # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from asr_lora.audio import SAMPLE_RATE, load_audio  # noqa: E402
from asr_lora.backends import DecodeOptions  # noqa: E402
from asr_lora.metrics import score  # noqa: E402
from asr_lora.sources import ModelSource, load_transcriber  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="test clips (default: %(default)s)")
    parser.add_argument("--adapter", default=None, help="a LoRA checkpoint folder instead of the base")
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    manifest = REPO / "data" / "demo" / "test.jsonl"
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()][: args.n]
    audios = [load_audio(manifest.parent / r["audio"]) for r in rows]
    refs = [r["text"] for r in rows]
    source = ModelSource("adapter", args.adapter) if args.adapter else ModelSource("model", "bundled:whisper-base")
    print(f"{source}, {len(rows)} demo test clips, greedy once (no fallback)")
    for mode in ("plain", "timestamps", "prompt"):
        options = DecodeOptions(temperatures=(0.0,), timestamps=mode == "timestamps", max_new_tokens=96)
        transcriber = load_transcriber(source, options)
        prompts = [rows[i - 1]["text"] if i else None for i in range(len(rows))] if mode == "prompt" else None
        start, hyps = time.perf_counter(), []
        for i in range(0, len(audios), args.batch_size):
            part = prompts[i:i + args.batch_size] if prompts else None
            hyps += transcriber.decode(audios[i:i + args.batch_size], prompts=part)
        seconds = time.perf_counter() - start
        report = score(refs, [h.text for h in hyps])
        line = f"{mode:>10}: CER {report.cer:.4f}  {seconds:6.1f} s"
        if mode == "timestamps":
            inside = sum(all(0 <= c["start"] <= c["end"] <= len(a) / SAMPLE_RATE + 1e-3 for c in h.segments)
                         for h, a in zip(hyps, audios))
            cues = sum(len(h.segments) for h in hyps)
            line += f"  {cues} cues, clips whose cues all lie inside: {inside}/{len(hyps)}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
