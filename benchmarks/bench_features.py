"""Log-mel feature extraction speed: transformers' WhisperFeatureExtractor vs asr_lora.audio.

    python benchmarks/bench_features.py                      # 16 clips of 2-12 s, 80 mels
    python benchmarks/bench_features.py --n-mels 128 --min-seconds 30 --max-seconds 30

Clips are the real recordings in tests/assets, tiled to the requested lengths. Prints one JSON
object: median milliseconds per batch for each method, speedup ratios, and the max abs
difference between ours and the extractor on that batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asr_lora.audio import SAMPLE_RATE, load_audio, log_mel_spectrogram  # noqa: E402

ASSETS = REPO / "tests" / "assets"
SPEECH = ["ko_greeting.flac", "ko_finetune.flac", "en_fox.flac"]


def make_batch(batch: int, min_seconds: float, max_seconds: float, seed: int) -> list[np.ndarray]:
    """``batch`` clips with lengths drawn uniformly in [min, max] s, built from the test clips."""
    speech = np.concatenate([load_audio(ASSETS / name) for name in SPEECH])
    rng = np.random.default_rng(seed)
    lengths = rng.uniform(min_seconds, max_seconds, size=batch) * SAMPLE_RATE
    clips = []
    for i, n in enumerate(lengths.astype(int)):
        start = (i * 7919) % len(speech)
        tiled = np.tile(np.roll(speech, -start), int(np.ceil(n / len(speech))))
        clips.append(np.ascontiguousarray(tiled[:n]))
    return clips


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 2, cuda: bool = False) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000.0)
    return round(statistics.median(times), 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="clips per batch")
    parser.add_argument("--n-mels", type=int, default=80, choices=(80, 128))
    parser.add_argument("--min-seconds", type=float, default=2.0, help="shortest clip")
    parser.add_argument("--max-seconds", type=float, default=12.0, help="longest clip (<= 30)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per method (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA even if available")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import WhisperFeatureExtractor

    clips = make_batch(args.batch, args.min_seconds, args.max_seconds, args.seed)
    extractor = WhisperFeatureExtractor(feature_size=args.n_mels)
    n_mels, repeats = args.n_mels, args.repeats

    def hf(audio, **kwargs):
        return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", **kwargs).input_features

    ms = {
        "hf_per_clip_loop": time_ms(lambda: [hf(c) for c in clips], repeats),
        "hf_batched": time_ms(lambda: hf(clips), repeats),
        "ours_cpu_max_length": time_ms(lambda: log_mel_spectrogram(clips, n_mels), repeats),
        "ours_cpu_longest": time_ms(lambda: log_mel_spectrogram(clips, n_mels, padding="longest"), repeats),
    }
    ref = hf(clips)
    parity = {"cpu": (log_mel_spectrogram(clips, n_mels)[0] - ref).abs().max().item()}

    cuda = torch.cuda.is_available() and not args.no_cuda
    if cuda:
        ms["hf_batched_cuda"] = time_ms(lambda: hf(clips, device="cuda"), repeats, cuda=True)
        ms["ours_cuda_max_length"] = time_ms(
            lambda: log_mel_spectrogram(clips, n_mels, device="cuda"), repeats, cuda=True
        )
        ms["ours_cuda_longest"] = time_ms(
            lambda: log_mel_spectrogram(clips, n_mels, padding="longest", device="cuda"), repeats, cuda=True
        )
        parity["cuda"] = (log_mel_spectrogram(clips, n_mels, device="cuda")[0].cpu() - ref).abs().max().item()

    def ratio(slow: str, fast: str) -> float:
        return round(ms[slow] / ms[fast], 2)

    speedup = {
        "ours_cpu_max_length_vs_hf_per_clip_loop": ratio("hf_per_clip_loop", "ours_cpu_max_length"),
        "ours_cpu_max_length_vs_hf_batched": ratio("hf_batched", "ours_cpu_max_length"),
        "ours_cpu_longest_vs_hf_batched": ratio("hf_batched", "ours_cpu_longest"),
    }
    if cuda:
        speedup["ours_cuda_max_length_vs_hf_batched"] = ratio("hf_batched", "ours_cuda_max_length")
        speedup["ours_cuda_max_length_vs_hf_batched_cuda"] = ratio("hf_batched_cuda", "ours_cuda_max_length")
        speedup["ours_cuda_longest_vs_hf_batched_cuda"] = ratio("hf_batched_cuda", "ours_cuda_longest")

    result = {
        "config": {
            "batch": args.batch,
            "n_mels": n_mels,
            "clip_seconds": [round(len(c) / SAMPLE_RATE, 2) for c in clips],
            "repeats": repeats,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        },
        "ms_per_batch": ms,
        "speedup": speedup,
        "max_abs_diff_vs_hf": parity,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
