#!/usr/bin/env python3
"""Regenerate the synthetic Korean demo corpus in ``data/demo/``.

Every sentence in ``data/demo/sentences.txt`` is spoken by espeak-ng's Korean
voice with a per-clip random speed, pitch and voice variant, resampled to
16 kHz mono, optionally mixed with mild white or pink noise, peak-normalised
and written as 16-bit FLAC. Sentences are split into train/dev/test by a seeded
shuffle so no text is shared between splits. The output is fully determined by
the sentence list and ``--seed``.

Usage::

    python scripts/make_demo_corpus.py            # rebuild data/demo/
    python scripts/make_demo_corpus.py --help
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "demo"
SENTENCES_NAME = "sentences.txt"

SEED = 20240611
N_DEV = 50
N_TEST = 50
N_TRAIN = 360  # cap that keeps data/ under ~25 MB; leftover sentences are unused
MIN_TRAIN = 300
SPLITS = ("train", "dev", "test")

ESPEAK = "espeak-ng"
ESPEAK_VOICE = "ko"
# Voice variants shipped with espeak-ng ("" = the plain Korean voice).
VOICE_VARIANTS = (
    "", "", "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
)
SPEED_RANGE = (140, 200)  # words per minute (espeak -s)
PITCH_RANGE = (30, 70)  # 0-99 (espeak -p)
WORD_GAP_CHOICES = (0, 0, 0, 1, 2)  # extra pause between words, 10 ms units

SAMPLE_RATE = 16000
FLAC_COMPRESSION = 1.0  # soundfile scale: 1.0 = libFLAC level 8 (smallest files)
NOISE_PROB = 0.3
SNR_DB_RANGE = (20.0, 30.0)
PEAK_RANGE = (0.3, 0.6)  # target linear peak (about -10 to -4.4 dBFS)
TRIM_TOP_DB = 45.0  # conservative: only cut near-silence at the edges
PAD_S_RANGE = (0.10, 0.30)  # silence re-added on each side after trimming
MAX_DURATION_S = 30.0


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to synthesise one utterance deterministically."""

    utt_id: str
    split: str
    text: str
    voice: str
    speed: int
    pitch: int
    word_gap: int
    noise: str  # "none", "white" or "pink"
    snr_db: float
    peak: float
    pad_start_s: float
    pad_end_s: float


def read_sentences(path: Path) -> list[str]:
    """Return the non-empty, stripped lines of ``path``; fail on duplicates."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    sentences = [ln for ln in lines if ln]
    dupes = sorted({s for s in sentences if sentences.count(s) > 1})
    if dupes:
        raise ValueError(f"duplicate sentences in {path}: {dupes[:5]}")
    return sentences


def split_sentences(
    sentences: Sequence[str], seed: int, n_dev: int, n_test: int, max_train: int | None
) -> dict[str, list[str]]:
    """Shuffle with ``seed`` and cut into disjoint train/dev/test text lists."""
    if len(sentences) < n_dev + n_test + MIN_TRAIN:
        raise ValueError(
            f"need at least {n_dev + n_test + MIN_TRAIN} sentences, got {len(sentences)}"
        )
    order = np.random.default_rng(seed).permutation(len(sentences))
    shuffled = [sentences[i] for i in order]
    dev, test = shuffled[:n_dev], shuffled[n_dev : n_dev + n_test]
    train = shuffled[n_dev + n_test :]
    if max_train is not None:
        train = train[: max(MIN_TRAIN, max_train)]
    return {"train": train, "dev": dev, "test": test}


def make_specs(texts: Sequence[str], split: str, seed: int, noise_prob: float) -> list[ClipSpec]:
    """Draw per-clip synthesis/augmentation parameters for one split."""
    specs = []
    for i, text in enumerate(texts, start=1):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        noisy = rng.random() < noise_prob
        specs.append(
            ClipSpec(
                utt_id=f"demo-{split}-{i:04d}",
                split=split,
                text=text,
                voice=str(rng.choice(VOICE_VARIANTS)),
                speed=int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
                pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
                word_gap=int(rng.choice(WORD_GAP_CHOICES)),
                noise=str(rng.choice(["white", "pink"])) if noisy else "none",
                snr_db=float(rng.uniform(*SNR_DB_RANGE)),
                peak=float(rng.uniform(*PEAK_RANGE)),
                pad_start_s=float(rng.uniform(*PAD_S_RANGE)),
                pad_end_s=float(rng.uniform(*PAD_S_RANGE)),
            )
        )
    return specs


def check_espeak() -> str:
    """Return the espeak-ng executable path or exit with a helpful message."""
    exe = shutil.which(ESPEAK)
    if exe is None:
        sys.exit(
            f"error: '{ESPEAK}' not found on PATH. Install it first, e.g. "
            "`sudo apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng`."
        )
    return exe


def synthesize(exe: str, spec: ClipSpec) -> tuple[np.ndarray, int]:
    """Run espeak-ng for ``spec`` and return (mono float32 audio, sample rate)."""
    import soundfile as sf

    voice = ESPEAK_VOICE + (f"+{spec.voice}" if spec.voice else "")
    with tempfile.TemporaryDirectory(prefix="demo_tts_") as tmp:
        wav_path = Path(tmp) / "out.wav"
        cmd = [
            exe, "-v", voice, "-s", str(spec.speed), "-p", str(spec.pitch),
            "-g", str(spec.word_gap), "-w", str(wav_path), "--", spec.text,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wav_path.exists():
            raise RuntimeError(f"espeak-ng failed for {spec.utt_id}: {proc.stderr.strip()}")
        audio, sr = sf.read(str(wav_path), dtype="float32", always_2d=True)
    return audio.mean(axis=1), int(sr)


def resample(audio: np.ndarray, sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono ``audio`` from ``sr`` to ``target_sr``."""
    if sr == target_sr:
        return audio.astype(np.float32)
    import librosa

    return librosa.resample(audio, orig_sr=sr, target_sr=target_sr).astype(np.float32)


def trim_and_pad(audio: np.ndarray, pad_start_s: float, pad_end_s: float,
                 sr: int = SAMPLE_RATE) -> np.ndarray:
    """Cut leading/trailing near-silence, then add a short silence on each side."""
    import librosa

    _, (start, end) = librosa.effects.trim(audio, top_db=TRIM_TOP_DB)
    core = audio[start:end] if end > start else audio
    pre = np.zeros(int(round(pad_start_s * sr)), dtype=np.float32)
    post = np.zeros(int(round(pad_end_s * sr)), dtype=np.float32)
    return np.concatenate([pre, core, post]).astype(np.float32)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``n`` samples of unit-variance 1/f (pink) noise."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.arange(spectrum.size, dtype=np.float64)
    freqs[0] = 1.0
    noise = np.fft.irfft(spectrum / np.sqrt(freqs), n=n)
    return (noise / (noise.std() + 1e-12)).astype(np.float32)


def add_noise(audio: np.ndarray, kind: str, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Mix white or pink noise into ``audio`` at ``snr_db`` (speech-active power)."""
    if kind == "none":
        return audio
    noise = pink_noise(audio.size, rng) if kind == "pink" else rng.standard_normal(audio.size)
    active = audio[np.abs(audio) > 0.01 * np.abs(audio).max()] if audio.any() else audio
    speech_power = float(np.mean(active**2)) if active.size else 0.0
    scale = np.sqrt(speech_power / (10 ** (snr_db / 10)))
    return (audio + scale * noise).astype(np.float32)


def peak_normalize(audio: np.ndarray, peak: float) -> np.ndarray:
    """Scale ``audio`` so its absolute peak equals ``peak`` (no-op on silence)."""
    current = float(np.abs(audio).max()) if audio.size else 0.0
    if current <= 0.0:
        return audio
    return (audio * (peak / current)).astype(np.float32)


def render_clip(exe: str, spec: ClipSpec, out_dir: Path, seed: int) -> dict:
    """Synthesise, augment and write one clip; return its manifest record."""
    import soundfile as sf

    audio, sr = synthesize(exe, spec)
    audio = resample(audio, sr)
    audio = trim_and_pad(audio, spec.pad_start_s, spec.pad_end_s)
    noise_rng = np.random.default_rng([seed, SPLITS.index(spec.split), int(spec.utt_id[-4:]), 1])
    audio = add_noise(audio, spec.noise, spec.snr_db, noise_rng)
    audio = peak_normalize(audio, spec.peak)
    rel_path = Path("audio") / spec.split / f"{spec.utt_id}.flac"
    sf.write(str(out_dir / rel_path), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16",
             compression_level=FLAC_COMPRESSION)
    return {
        "id": spec.utt_id,
        "audio": rel_path.as_posix(),
        "text": spec.text,
        "duration": round(audio.size / SAMPLE_RATE, 3),
        "language": "ko",
    }


def progress(items: Iterable, total: int, desc: str) -> Iterator:
    """Wrap ``items`` in a tqdm bar if available, else print coarse progress."""
    try:
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit="clip")
        return
    except ImportError:
        pass
    step = max(1, total // 10)
    for i, item in enumerate(items, start=1):
        if i % step == 0 or i == total:
            print(f"{desc}: {i}/{total}", flush=True)
        yield item


def write_manifest(path: Path, records: Sequence[dict]) -> None:
    """Write ``records`` as UTF-8 JSON Lines."""
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def summarize(records: Sequence[dict], split: str) -> str:
    """One-line duration summary for a split."""
    d = np.array([r["duration"] for r in records], dtype=np.float64)
    return (f"{split:5s}: {len(d):4d} clips, {d.sum() / 3600:.3f} h, "
            f"dur min/mean/max = {d.min():.2f}/{d.mean():.2f}/{d.max():.2f} s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                   help="corpus folder holding sentences.txt (default: data/demo)")
    p.add_argument("--sentences", type=Path, default=None,
                   help="sentence list (default: <out-dir>/sentences.txt)")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed (default: {SEED})")
    p.add_argument("--n-dev", type=int, default=N_DEV, help="dev sentences (default: %(default)s)")
    p.add_argument("--n-test", type=int, default=N_TEST, help="test sentences (default: %(default)s)")
    p.add_argument("--max-train", type=int, default=N_TRAIN,
                   help=f"cap on train clips, never below {MIN_TRAIN} (default: %(default)s)")
    p.add_argument("--noise-prob", type=float, default=NOISE_PROB,
                   help="fraction of clips with added noise (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=4, help="parallel espeak-ng processes (default: 4)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild audio and manifests; return a process exit code."""
    args = parse_args(argv)
    exe = check_espeak()
    out_dir: Path = args.out_dir
    sentences = read_sentences(args.sentences or out_dir / SENTENCES_NAME)
    splits = split_sentences(sentences, args.seed, args.n_dev, args.n_test, args.max_train)

    for split in SPLITS:
        audio_dir = out_dir / "audio" / split
        if audio_dir.exists():
            shutil.rmtree(audio_dir)
        audio_dir.mkdir(parents=True)

    for split in SPLITS:
        specs = make_specs(splits[split], split, args.seed, args.noise_prob)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = pool.map(lambda s: render_clip(exe, s, out_dir, args.seed), specs)
            records = list(progress(results, len(specs), split))
        bad = [r["id"] for r in records if not 0.0 < r["duration"] <= MAX_DURATION_S]
        if bad:
            raise RuntimeError(f"clips empty or longer than {MAX_DURATION_S} s: {bad[:5]}")
        write_manifest(out_dir / f"{split}.jsonl", records)
        print(summarize(records, split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
