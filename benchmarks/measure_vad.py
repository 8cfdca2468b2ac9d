#!/usr/bin/env python3
"""Silero VAD settings on the demo corpus: speech clips detected vs non-speech clips with any speech span.

For every clip the speech probabilities are computed once; each setting is then applied to them with
Silero's own rules (``asr_lora.vad.spans_from_probabilities``). Speech: the demo dev and test clips
(espeak-ng Korean). Non-speech: the generated clips of ``data/demo/nonspeech_*.jsonl``. Then the chosen
defaults on the long-form file of ``scripts/make_nonspeech.py`` (speech with noise and music between):
how much of the speech lands in speech pieces, how much non-speech does.

    python benchmarks/measure_vad.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from asr_lora import vad  # noqa: E402
from asr_lora.audio import SAMPLE_RATE, load_audio  # noqa: E402

DEMO = REPO / "data" / "demo"


def clips(manifest: Path) -> list[tuple[dict, np.ndarray]]:
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row, load_audio(manifest.parent / row["audio"])) for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7,0.8")
    parser.add_argument("--min-speech", default="0.1,0.25,0.5")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    speech = [c for split in ("dev", "test") for c in clips(DEMO / f"{split}.jsonl")]
    nonspeech = [c for split in ("train", "dev", "test") for c in clips(DEMO / f"nonspeech_{split}.jsonl")]
    seconds = sum(len(a) for _, a in speech + nonspeech) / SAMPLE_RATE
    start = time.perf_counter()
    speech_probs = [vad.speech_probabilities(a) for _, a in speech]
    nonspeech_probs = [vad.speech_probabilities(a) for _, a in nonspeech]
    elapsed = time.perf_counter() - start
    print(f"{len(speech)} speech clips (demo dev+test), {len(nonspeech)} non-speech clips (train+dev+test); "
          f"VAD on {seconds:.0f} s of audio took {elapsed:.1f} s ({elapsed / seconds * 1000:.1f} ms per audio second)\n")

    def spans(probs, audio, **kw):
        return vad.spans_from_probabilities(probs, len(audio), **kw)

    print("threshold  min_speech_s  speech clips detected  speech time covered  non-speech clips with speech")
    for threshold in map(float, args.thresholds.split(",")):
        for min_speech in map(float, args.min_speech.split(",")):
            kw = dict(threshold=threshold, min_speech_s=min_speech)
            detected, covered = 0, 0.0
            for (_, audio), probs in zip(speech, speech_probs):
                found = spans(probs, audio, **kw)
                detected += bool(found)
                covered += sum(b - a for a, b in found) / len(audio)
            false = sum(bool(spans(p, a, **kw)) for (_, a), p in zip(nonspeech, nonspeech_probs))
            mark = "  <- default" if (threshold, min_speech) == (vad.THRESHOLD, vad.MIN_SPEECH_S) else ""
            print(f"{threshold:9.2f}  {min_speech:12.2f}  {detected / len(speech):21.3f}  {covered / len(speech):19.3f}"
                  f"  {false / len(nonspeech):28.3f}{mark}")

    print("\nspeech clips mixed with a non-speech clip (tiled to the clip's length) at an SNR, at the defaults:")
    others = [a for row, a in nonspeech if not row["id"].startswith("nonspeech-train")]
    for snr in (20.0, 10.0, 0.0):
        detected = 0
        for i, (_, audio) in enumerate(speech):
            noise = np.resize(others[i % len(others)], len(audio))
            gain = np.sqrt(np.mean(audio**2) / max(np.mean(noise**2), 1e-12) / 10 ** (snr / 10))
            detected += bool(vad.speech_spans(audio + gain * noise))
        print(f"  SNR {snr:4.0f} dB: {detected} / {len(speech)} detected")

    print(f"\nnon-speech clips with any speech span at the defaults, by kind and split:")
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_split: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (row, audio), probs in zip(nonspeech, nonspeech_probs):
        hit = bool(spans(probs, audio))
        for key, table in ((row["kind"], by_kind), (row["id"].split("-")[1], by_split)):
            table[key][0] += hit
            table[key][1] += 1
    for name, (hit, n) in [*sorted(by_kind.items()), *by_split.items()]:
        print(f"  {name:12s} {hit:3d} / {n:3d}")

    from make_nonspeech import build_longform

    audio, segments = build_longform()
    speech_mask = np.zeros(len(audio), bool)  # each clip as stored, its short silent pads included
    voiced_mask = np.zeros(len(audio), bool)  # from its first to its last sound (within 45 dB of its peak)
    for a, b, _ in segments:
        a, b = int(a * SAMPLE_RATE), int(b * SAMPLE_RATE)
        speech_mask[a:b] = True
        frames = audio[a:b][: (b - a) // 160 * 160].reshape(-1, 160)
        db = 10 * np.log10(np.maximum((frames.astype(np.float64) ** 2).mean(axis=1), 1e-12))
        loud = np.flatnonzero(db > db.max() - 45)
        voiced_mask[a + loud[0] * 160:a + (loud[-1] + 1) * 160] = True
    probs = vad.speech_probabilities(audio)
    print(f"\nlong-form file ({len(audio) / SAMPLE_RATE:.0f} s, {len(segments)} utterances, non-speech between): "
          "share of each clip (as stored / from first to last sound) in speech pieces, non-speech seconds in "
          "speech pieces, pieces to decode")
    print("speech_pad_s  min_silence_s  max_gap_s  clip recall  voiced recall  non-speech s decoded  pieces  longest piece s")
    for pad in (0.1, 0.2, 0.4):
        for min_silence in (0.1, 0.25, 0.5):
            for max_gap in (0.5, 1.0, 2.0, 4.0):
                found = vad.spans_from_probabilities(probs, len(audio), speech_pad_s=pad, min_silence_s=min_silence)
                pieces = vad.merge_spans(found, len(audio), max_gap_s=max_gap)
                decoded = np.zeros(len(audio), bool)
                for a, b, has_speech in pieces:
                    decoded[a:b] = has_speech
                mark = "  <- default" if (pad, min_silence, max_gap) == (vad.SPEECH_PAD_S, vad.MIN_SILENCE_S,
                                                                         vad.MAX_GAP_S) else ""
                longest = max((b - a for a, b, s in pieces if s), default=0) / SAMPLE_RATE
                print(f"{pad:12.2f}  {min_silence:13.2f}  {max_gap:9.1f}  {(decoded & speech_mask).sum() / speech_mask.sum():11.3f}"
                      f"  {(decoded & voiced_mask).sum() / voiced_mask.sum():13.3f}"
                      f"  {(decoded & ~speech_mask).sum() / SAMPLE_RATE:20.1f}  {sum(s for *_, s in pieces):6d}"
                      f"  {longest:15.1f}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
