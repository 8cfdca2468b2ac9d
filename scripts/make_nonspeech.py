#!/usr/bin/env python3
"""Generate the demo corpus's non-speech clips: noise, tones, chords, clicks, hum, music-like sequences.

Every clip is synthesised with numpy from a seeded generator (one per clip, from ``--seed``, the split
and the clip's index), so the waveforms are fully determined by the seed. Clips are 16 kHz mono,
1-10 s, written as OGG Vorbis (noise does not compress losslessly; Vorbis keeps 200 clips near 4 MB).
The encoded bytes depend on the libvorbis version; the waveforms before encoding do not.

Output, under ``data/demo/``:

- ``nonspeech/<split>/<id>.ogg``
- ``nonspeech_{train,dev,test}.jsonl``, one row per clip::

    {"id": "nonspeech-dev-0001", "audio": "nonspeech/dev/nonspeech-dev-0001.ogg", "text": "",
     "nonspeech": true, "duration": 4.21, "kind": "pink_noise"}

Each split holds the same number of clips of every kind (:data:`KINDS`), in a seeded order.

:func:`build_longform` (importable) builds a long test file: demo speech clips with non-speech
(noise, music-like) gaps between them, and the reference segments of the speech.

Usage::

    python scripts/make_nonspeech.py            # rebuild data/demo/nonspeech*
    python scripts/make_nonspeech.py --help
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "demo"
AUDIO_DIR = "nonspeech"

SEED = 20250113
SAMPLE_RATE = 16000
SPLITS = {"train": 120, "dev": 40, "test": 40}  # clips per split
DURATION_RANGE = (1.0, 10.0)  # seconds, uniform
PEAK_LIMIT = 0.89  # -1 dBFS: levels above this are scaled down
EDGE_FADE = 0.005  # seconds of fade at both ends (no click from the cut itself)
VORBIS_QUALITY = 0.6  # soundfile compression_level for Vorbis: 0 = best quality, 1 = smallest
A4 = 440.0

Generator = Callable[[np.random.Generator, int], np.ndarray]


# --------------------------------------------------------------------------- building blocks


def db_to_gain(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def rms_db(x: np.ndarray) -> float:
    return float(10.0 * np.log10(max(float(np.mean(np.square(x, dtype=np.float64))), 1e-20)))


def set_level(x: np.ndarray, rms_dbfs: float) -> np.ndarray:
    """``x`` scaled to an RMS of ``rms_dbfs``, then down to :data:`PEAK_LIMIT` if its peak is above."""
    y = x * db_to_gain(rms_dbfs - rms_db(x))
    peak = float(np.max(np.abs(y)))
    return y * (PEAK_LIMIT / peak) if peak > PEAK_LIMIT else y


def fade_edges(x: np.ndarray, seconds: float = EDGE_FADE) -> np.ndarray:
    n = min(len(x) // 2, int(seconds * SAMPLE_RATE))
    if n > 0:
        ramp = np.linspace(0.0, 1.0, n)
        x = x.copy()
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def coloured_noise(rng: np.random.Generator, n: int, exponent: float, low_hz: float = 20.0) -> np.ndarray:
    """Gaussian noise whose power spectrum goes as f**exponent (0 white, -1 pink, -2 brown, +1 blue),
    flat below ``low_hz`` (no sub-audio drift), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    shape = np.maximum(freqs, low_hz) ** (exponent / 2.0)
    shape[0] = 0.0
    x = np.fft.irfft(spectrum * shape, n)
    return x / np.sqrt(np.mean(x**2))


def midi_hz(note: float) -> float:
    return A4 * 2.0 ** ((note - 69) / 12.0)


def adsr(n: int, attack: float, decay: float, sustain: float, release: float) -> np.ndarray:
    """Attack-decay-sustain-release envelope of ``n`` samples (times in seconds, sustain a level)."""
    a, d, r = (max(1, int(t * SAMPLE_RATE)) for t in (attack, decay, release))
    a, d, r = min(a, n), min(d, max(0, n - a)), min(r, n)
    env = np.full(n, sustain)
    env[:a] = np.linspace(0.0, 1.0, a)
    env[a:a + d] = np.linspace(1.0, sustain, d)
    env[n - r:] *= np.linspace(1.0, 0.0, r)
    return env


def partials(freq: float, t: np.ndarray, amps: list[float], ratios: list[float] | None = None,
             decays: list[float] | None = None, phase_rng: np.random.Generator | None = None) -> np.ndarray:
    """Sum of sines at ``freq * ratio`` (harmonics 1, 2, 3... by default) below Nyquist, each with
    amplitude ``amp`` and an optional exponential decay (per second)."""
    ratios = ratios or [float(k) for k in range(1, len(amps) + 1)]
    out = np.zeros_like(t)
    for k, (amp, ratio) in enumerate(zip(amps, ratios)):
        f = freq * ratio
        if f >= SAMPLE_RATE / 2 * 0.95 or amp == 0.0:
            continue
        phase = phase_rng.uniform(0, 2 * np.pi) if phase_rng is not None else 0.0
        partial = amp * np.sin(2 * np.pi * f * t + phase)
        if decays is not None:
            partial *= np.exp(-decays[k] * t)
        out += partial
    return out


TIMBRES = ("sine", "square", "saw", "organ", "pluck", "bell")


def note(rng: np.random.Generator, timbre: str, freq: float, n: int) -> np.ndarray:
    """One note of ``n`` samples in one of :data:`TIMBRES`, with its envelope."""
    t = np.arange(n) / SAMPLE_RATE
    if timbre == "sine":
        wave = partials(freq, t, [1.0])
    elif timbre == "square":
        wave = partials(freq, t, [1.0 / k if k % 2 else 0.0 for k in range(1, 16)])
    elif timbre == "saw":
        wave = partials(freq, t, [1.0 / k for k in range(1, 16)])
    elif timbre == "organ":
        wave = partials(freq, t, [1.0, 0.5, 0.3, 0.25, 0, 0, 0, 0.2], phase_rng=rng)
    elif timbre == "pluck":  # string-like: higher harmonics die faster
        wave = partials(freq, t, [1.0 / k for k in range(1, 12)], decays=[2.0 + 1.5 * k for k in range(11)])
    else:  # bell: inharmonic partials, long decays
        wave = partials(freq, t, [1.0, 0.6, 0.4, 0.25], ratios=[1.0, 2.76, 5.40, 8.93], decays=[1.5, 2.5, 4.0, 6.0])
    if timbre in ("pluck", "bell"):
        env = adsr(n, 0.003, 0.0, 1.0, 0.02)
    else:
        env = adsr(n, rng.uniform(0.005, 0.06), rng.uniform(0.03, 0.2), rng.uniform(0.4, 0.9), rng.uniform(0.02, 0.15))
    return wave * env


SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10], "pentatonic": [0, 2, 4, 7, 9]}


def scale_notes(root: int, scale: str, octaves: int = 2) -> list[int]:
    return [root + 12 * o + step for o in range(octaves) for step in SCALES[scale]]


def drum_hits(rng: np.random.Generator, n: int, beat: int) -> np.ndarray:
    """A kick on beats 1 and 3, a noise snare on 2 and 4, hats on eighths: a simple rock beat."""
    out = np.zeros(n)
    k_len, s_len, h_len = int(0.25 * SAMPLE_RATE), int(0.18 * SAMPLE_RATE), int(0.05 * SAMPLE_RATE)
    tk = np.arange(k_len) / SAMPLE_RATE
    kick = np.sin(2 * np.pi * (50 * tk + 100 / 20 * (1 - np.exp(-20 * tk)))) * np.exp(-12 * tk)
    snare = rng.standard_normal(s_len) * np.exp(-25 * np.arange(s_len) / SAMPLE_RATE)
    hat = np.diff(rng.standard_normal(h_len + 1)) * np.exp(-80 * np.arange(h_len) / SAMPLE_RATE)
    for i, start in enumerate(range(0, n, beat // 2)):
        hits = [(hat, 0.15)]
        if i % 2 == 0:
            hits.append((kick, 0.9) if (i // 2) % 2 == 0 else (snare, 0.4))
        for sound, gain in hits:
            end = min(n, start + len(sound))
            out[start:end] += gain * sound[: end - start]
    return out


# --------------------------------------------------------------------------- generators (the kinds)


def white_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return set_level(coloured_noise(rng, n, 0.0), rng.uniform(-50, -15))


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return set_level(coloured_noise(rng, n, -1.0), rng.uniform(-50, -15))


def brown_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return set_level(coloured_noise(rng, n, -2.0), rng.uniform(-45, -12))


def blue_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return set_level(coloured_noise(rng, n, 1.0), rng.uniform(-50, -18))


def tone(rng: np.random.Generator, n: int) -> np.ndarray:
    """A steady sine, a sine with vibrato, a sweep, an on/off beep pattern or a dual tone (DTMF-like)."""
    t = np.arange(n) / SAMPLE_RATE
    freq = float(np.exp(rng.uniform(np.log(60), np.log(5000))))
    variant = rng.choice(["steady", "vibrato", "sweep", "beeps", "dual"])
    if variant == "steady":
        x = np.sin(2 * np.pi * freq * t)
    elif variant == "vibrato":
        rate, depth = rng.uniform(3, 7), rng.uniform(0.005, 0.03)
        x = np.sin(2 * np.pi * freq * t + depth * freq / rate * np.sin(2 * np.pi * rate * t))
    elif variant == "sweep":  # exponential glide between two frequencies
        f1 = float(np.exp(rng.uniform(np.log(80), np.log(6000))))
        k = np.log(f1 / freq) / (n / SAMPLE_RATE)
        x = np.sin(2 * np.pi * freq * (np.expm1(k * t) / k if abs(k) > 1e-9 else t))
    elif variant == "beeps":
        period, duty = rng.uniform(0.2, 1.5), rng.uniform(0.2, 0.7)
        gate = ((t % period) < duty * period).astype(float)
        x = np.sin(2 * np.pi * freq * t) * np.convolve(gate, np.ones(80) / 80, mode="same")
    else:
        low, high = rng.choice([697, 770, 852, 941]), rng.choice([1209, 1336, 1477])
        x = np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t)
    return set_level(x, rng.uniform(-40, -12))


def chord(rng: np.random.Generator, n: int) -> np.ndarray:
    """A sustained triad or seventh chord (one timbre), or a slow progression of two to four chords."""
    root = int(rng.integers(45, 70))
    shapes = [[0, 4, 7], [0, 3, 7], [0, 4, 7, 11], [0, 3, 7, 10], [0, 4, 7, 10], [0, 5, 7]]
    timbre = str(rng.choice(["sine", "square", "saw", "organ", "pluck"]))
    n_chords = int(rng.integers(1, 5))
    bounds = np.linspace(0, n, n_chords + 1).astype(int)
    x = np.zeros(n)
    for a, b in zip(bounds[:-1], bounds[1:]):
        shape = shapes[int(rng.integers(len(shapes)))]
        base = root + int(rng.choice([0, 0, 5, 7, -5, 2]))
        for interval in shape:
            x[a:b] += note(rng, timbre, midi_hz(base + interval), b - a)
    return set_level(x, rng.uniform(-38, -12))


def clicks(rng: np.random.Generator, n: int) -> np.ndarray:
    """Metronome ticks, random crackle, or typing-like bursts, over a faint noise floor or silence."""
    variant = rng.choice(["metronome", "crackle", "typing"])
    x = np.zeros(n)
    if variant == "metronome":
        interval = int(SAMPLE_RATE * 60.0 / rng.uniform(50, 200))
        length = int(0.004 * SAMPLE_RATE)
        tick = np.sin(2 * np.pi * rng.uniform(1000, 3000) * np.arange(length) / SAMPLE_RATE)
        tick *= np.exp(-np.arange(length) / (0.001 * SAMPLE_RATE))
        for start in range(int(rng.integers(0, interval)), n - length, interval):
            x[start:start + length] += tick
    elif variant == "crackle":
        count = int(rng.uniform(2, 40) * n / SAMPLE_RATE)
        positions = rng.integers(0, n - 1, count)
        x[positions] = rng.uniform(0.2, 1.0, count) * rng.choice([-1.0, 1.0], count)
        x = np.convolve(x, np.exp(-np.arange(16) / 3.0), mode="same")
    else:
        start = int(rng.integers(0, SAMPLE_RATE // 4))
        while start < n:
            length = int(rng.uniform(0.015, 0.06) * SAMPLE_RATE)
            burst = np.diff(rng.standard_normal(length + 1)) * np.exp(-np.arange(length) / (0.008 * SAMPLE_RATE))
            end = min(n, start + length)
            x[start:end] += burst[: end - start] * rng.uniform(0.3, 1.0)
            start += int(rng.uniform(0.08, 0.4) * SAMPLE_RATE)
    x = set_level(x, rng.uniform(-40, -15))
    if rng.random() < 0.5:
        x = x + set_level(coloured_noise(rng, n, -1.0), rng.uniform(-65, -50))
    return x


def hum(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mains hum or buzz: 50 or 60 Hz with harmonics (odd ones stronger for a buzz), a slow wobble."""
    t = np.arange(n) / SAMPLE_RATE
    f0 = float(rng.choice([50.0, 60.0])) * rng.uniform(0.995, 1.005)
    n_harmonics = int(rng.integers(3, 30))
    odd_boost = rng.uniform(1.0, 4.0)
    amps = [rng.uniform(0.2, 1.0) / k ** rng.uniform(0.3, 1.2) * (odd_boost if k % 2 else 1.0)
            for k in range(1, n_harmonics + 1)]
    x = partials(f0, t, amps, phase_rng=rng)
    x *= 1.0 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.1, 1.0) * t)
    x = set_level(x, rng.uniform(-45, -15))
    if rng.random() < 0.5:
        x = x + set_level(coloured_noise(rng, n, -1.0), rng.uniform(-60, -40))
    return x


def music(rng: np.random.Generator, n: int) -> np.ndarray:
    """A melody on a scale with a bass line, in one or two timbres, sometimes with drums."""
    tempo = rng.uniform(60, 180)
    beat = int(SAMPLE_RATE * 60.0 / tempo)
    root = int(rng.integers(55, 72))
    notes = scale_notes(root, str(rng.choice(list(SCALES))))
    lead, bass = str(rng.choice(TIMBRES)), str(rng.choice(["sine", "saw", "pluck", "square"]))
    x = np.zeros(n)
    start, degree = 0, int(rng.integers(len(notes)))
    while start < n:  # melody: a random walk on the scale
        length = int(beat * rng.choice([0.5, 0.5, 1, 1, 1, 2]))
        end = min(n, start + length)
        degree = int(np.clip(degree + rng.integers(-2, 3), 0, len(notes) - 1))
        if rng.random() > 0.1:  # some rests
            x[start:end] += note(rng, lead, midi_hz(notes[degree]), end - start)
        start = end
    if rng.random() < 0.7:
        for start in range(0, n, 2 * beat):
            end = min(n, start + 2 * beat)
            x[start:end] += 0.6 * note(rng, bass, midi_hz(root - 12 + int(rng.choice([0, 5, 7, 3]))), end - start)
    if rng.random() < 0.4:
        x += drum_hits(rng, n, beat) * np.sqrt(np.mean(x**2) + 1e-12) * 4
    return set_level(x, rng.uniform(-35, -12))


def mixture(rng: np.random.Generator, n: int) -> np.ndarray:
    """Two or three of the other kinds summed at random relative levels (e.g. music over hum and noise)."""
    parts = [str(k) for k in rng.choice(BASE_KINDS, size=int(rng.integers(2, 4)), replace=False)]
    x = sum(GENERATORS[k](rng, n) * db_to_gain(rng.uniform(-12, 0)) for k in parts)
    return set_level(x, rng.uniform(-35, -12))


GENERATORS: dict[str, Generator] = {
    "white_noise": white_noise,
    "pink_noise": pink_noise,
    "brown_noise": brown_noise,
    "blue_noise": blue_noise,
    "tone": tone,
    "chord": chord,
    "clicks": clicks,
    "hum": hum,
    "music": music,
    "mixture": mixture,
}
KINDS = tuple(GENERATORS)
BASE_KINDS = tuple(k for k in KINDS if k != "mixture")


def make_clip(kind: str, rng: np.random.Generator, seconds: float) -> np.ndarray:
    """One clip of ``kind`` (a key of :data:`GENERATORS`), float32 at 16 kHz, faded at both ends."""
    n = int(round(seconds * SAMPLE_RATE))
    return fade_edges(GENERATORS[kind](rng, n)).astype(np.float32)


def split_plan(split: str, count: int, seed: int = SEED) -> list[tuple[str, str, float, np.random.Generator]]:
    """(id, kind, seconds, generator) for every clip of a split: equal counts per kind, seeded order."""
    split_index = list(SPLITS).index(split) if split in SPLITS else len(SPLITS)
    order = np.random.default_rng([seed, split_index]).permutation(count)
    plan = []
    for i in range(count):
        rng = np.random.default_rng([seed, split_index, i])
        seconds = round(float(rng.uniform(*DURATION_RANGE)), 2)
        plan.append((f"nonspeech-{split}-{i + 1:04d}", KINDS[int(order[i]) % len(KINDS)], seconds, rng))
    return plan


# --------------------------------------------------------------------------- long-form test file


def build_longform(
    speech_manifest: str | Path = DEFAULT_OUT_DIR / "test.jsonl",
    seconds: float = 120.0,
    seed: int = 0,
    gap_range: tuple[float, float] = (2.0, 6.0),
    gap_kinds: tuple[str, ...] = ("music", "pink_noise", "brown_noise", "white_noise", "chord", "hum", "mixture"),
) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Speech clips of ``speech_manifest`` (in manifest order) with a non-speech gap before each and
    after the last, each gap ``gap_range`` seconds of a kind from ``gap_kinds`` (levels as in the
    non-speech clips: -50 to -12 dBFS RMS), until the file is at least ``seconds`` long.

    Returns the 16 kHz float32 audio and the reference segments ``(start, end, text)`` in seconds,
    one per speech clip (the clip as stored, its short leading and trailing pauses included).
    Everything outside the segments is non-speech: a transcript should have no cue there.
    """
    sys.path.insert(0, str(REPO_ROOT))
    from asr_lora.audio import load_audio

    manifest = Path(speech_manifest)
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{manifest} holds no rows")
    rng = np.random.default_rng([seed, 7])
    pieces: list[np.ndarray] = []
    segments: list[tuple[float, float, str]] = []
    position = 0
    for i in range(10_000):
        gap_seconds = rng.uniform(*gap_range)
        gap_kind = str(gap_kinds[int(rng.integers(len(gap_kinds)))])
        pieces.append(make_clip(gap_kind, rng, gap_seconds))
        position += len(pieces[-1])
        if position >= seconds * SAMPLE_RATE:
            break
        row = rows[i % len(rows)]
        speech = load_audio(manifest.parent / row["audio"])
        segments.append((position / SAMPLE_RATE, (position + len(speech)) / SAMPLE_RATE, row["text"]))
        pieces.append(speech)
        position += len(speech)
    return np.concatenate(pieces).astype(np.float32), segments


# --------------------------------------------------------------------------- writing the corpus


def write_split(out_dir: Path, split: str, count: int, seed: int) -> list[dict]:
    import soundfile as sf

    audio_dir = out_dir / AUDIO_DIR / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for clip_id, kind, seconds, rng in split_plan(split, count, seed):
        audio = make_clip(kind, rng, seconds)
        path = audio_dir / f"{clip_id}.ogg"
        sf.write(str(path), audio, SAMPLE_RATE, format="OGG", subtype="VORBIS", compression_level=VORBIS_QUALITY)
        rows.append({"id": clip_id, "audio": path.relative_to(out_dir).as_posix(), "text": "", "nonspeech": True,
                     "duration": round(len(audio) / SAMPLE_RATE, 3), "kind": kind})
    manifest = out_dir / f"nonspeech_{split}.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: data/demo")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--longform", type=Path, default=None, metavar="WAV",
                        help="instead: write the long-form test file (demo test speech with non-speech gaps) "
                             "to WAV and its reference segments to WAV with .json")
    args = parser.parse_args(argv)
    if args.longform is not None:
        import soundfile as sf

        audio, segments = build_longform(seed=args.seed)
        sf.write(str(args.longform), audio, SAMPLE_RATE, subtype="PCM_16")
        args.longform.with_suffix(".json").write_text(json.dumps(
            [{"start": round(a, 3), "end": round(b, 3), "text": t} for a, b, t in segments],
            ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.longform} ({len(audio) / SAMPLE_RATE:.1f} s, {len(segments)} speech segments)")
        return 0
    shutil.rmtree(args.out_dir / AUDIO_DIR, ignore_errors=True)
    for split, count in SPLITS.items():
        rows = write_split(args.out_dir, split, count, args.seed)
        seconds = sum(r["duration"] for r in rows)
        print(f"{split}: {len(rows)} clips, {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
