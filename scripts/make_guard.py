#!/usr/bin/env python3
"""Generate the demo's English guard set: short everyday English sentences spoken by espeak-ng.

A model tuned on Korean forgets other languages; ``data.guard`` scores a second-language set every
evaluation (``guard_wer`` in metrics.jsonl) to measure it. This script builds the demo's guard set
the way ``scripts/make_demo_corpus.py`` builds the Korean clips (and with its functions): each
sentence is spoken with a seeded voice, speed and pitch, resampled to 16 kHz mono, edge silence
trimmed and re-padded, peak-normalised, and written as Ogg/Opus (about 9 KB a clip: the set stays
far below 1 MB). The waveforms are fully determined by the sentences and ``--seed``; the encoded
bytes depend on the libopus version.

Output, under ``data/demo/``:

- ``guard_en/<id>.ogg``
- ``guard_en.jsonl``, one row per clip::

    {"id": "guard-en-0001", "audio": "guard_en/guard-en-0001.ogg", "text": "...", "duration": 1.92,
     "language": "en"}

Usage::

    python scripts/make_guard.py            # rebuild data/demo/guard_en*
    python scripts/make_guard.py --help
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_corpus import check_espeak, peak_normalize, resample, trim_and_pad  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "demo"
NAME = "guard_en"
SEED = 20250214
SAMPLE_RATE = 16000
OPUS_LEVEL = 0.9  # soundfile compression_level for Opus: 0 = best quality, 1 = smallest
VOICES = ("en-us", "en-gb", "en-us+m3", "en-gb+f2", "en-us+f4", "en-gb-x-rp", "en-us+m5", "en-gb+m2")
SPEED_RANGE = (140, 175)  # words per minute (espeak -s)
PITCH_RANGE = (35, 65)  # 0-99 (espeak -p)
PEAK_RANGE = (0.3, 0.6)
PAD_S_RANGE = (0.10, 0.30)

# Short everyday sentences, none about the Korean demo's topics; no digits or contractions, so that
# the WER measures recognition, not number or apostrophe spelling.
SENTENCES = (
    "The bus was late again this morning.",
    "Could you pass me the salt please?",
    "I left my umbrella at the office.",
    "We are going to the beach on Saturday.",
    "The coffee shop on the corner is closed today.",
    "My sister bought a new bicycle last week.",
    "Please turn off the lights when you leave.",
    "It is going to rain later this afternoon.",
    "The children are playing in the garden.",
    "He forgot to call his mother yesterday.",
    "Where did you put the car keys?",
    "This soup needs a little more pepper.",
    "The train to London leaves from the other platform.",
    "She reads a book every night before bed.",
    "Let us meet in front of the library at noon.",
    "The dog barked at the mailman all morning.",
    "I would like a glass of cold water.",
    "They painted the kitchen a bright yellow.",
    "Our neighbors are moving to another city.",
    "Do not forget to water the plants.",
)


def voice_params(i: int, seed: int) -> dict:
    """The seeded voice, speed, pitch, peak and padding of clip ``i`` (1-based)."""
    rng = np.random.default_rng([seed, i])
    return {"voice": VOICES[int(rng.integers(len(VOICES)))],
            "speed": int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
            "pitch": int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
            "peak": float(rng.uniform(*PEAK_RANGE)),
            "pad": (float(rng.uniform(*PAD_S_RANGE)), float(rng.uniform(*PAD_S_RANGE)))}


def speak(exe: str, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """espeak-ng's mono float32 audio of ``text`` and its sample rate."""
    import soundfile as sf

    with tempfile.TemporaryDirectory(prefix="guard_tts_") as tmp:
        wav = Path(tmp) / "out.wav"
        proc = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), "--", text],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not wav.exists():
            raise RuntimeError(f"espeak-ng failed for {text!r}: {proc.stderr.strip()}")
        audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    return audio.mean(axis=1), int(sr)


def build(out_dir: Path, seed: int = SEED, sentences: Sequence[str] = SENTENCES) -> list[dict]:
    """Write ``out_dir/guard_en/*.ogg`` and ``out_dir/guard_en.jsonl``; return the rows."""
    import soundfile as sf

    exe = check_espeak()
    folder = out_dir / NAME
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rows = []
    for i, text in enumerate(sentences, start=1):
        p = voice_params(i, seed)
        audio, sr = speak(exe, text, p["voice"], p["speed"], p["pitch"])
        audio = peak_normalize(trim_and_pad(resample(audio, sr), *p["pad"]), p["peak"])
        uid = f"guard-en-{i:04d}"
        sf.write(str(folder / f"{uid}.ogg"), audio, SAMPLE_RATE, format="OGG", subtype="OPUS",
                 compression_level=OPUS_LEVEL)
        rows.append({"id": uid, "audio": f"{NAME}/{uid}.ogg", "text": text,
                     "duration": round(audio.size / SAMPLE_RATE, 3), "language": "en"})
    with (out_dir / f"{NAME}.jsonl").open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="output folder (default: data/demo)")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed (default: {SEED})")
    args = p.parse_args(argv)
    rows = build(args.out_dir, args.seed)
    size = sum(f.stat().st_size for f in (args.out_dir / NAME).iterdir())
    print(f"{len(rows)} clips, {sum(r['duration'] for r in rows):.1f} s, {size / 1e3:.0f} KB "
          f"-> {args.out_dir / NAME}/ and {args.out_dir / NAME}.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
