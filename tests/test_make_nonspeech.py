"""scripts/make_nonspeech.py and its output: the committed non-speech clips and manifests, the seeded
generators, the long-form builder (speech with non-speech gaps, reference segments)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from asr_lora.audio import SAMPLE_RATE, load_audio

from .conftest import DEMO, load_script


@pytest.fixture(scope="module")
def script():
    return load_script("make_nonspeech")


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DEMO / f"nonspeech_{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("split, n", [("train", 120), ("dev", 40), ("test", 40)])
def test_manifests_rows_and_audio(script, split, n):
    found = rows(split)
    assert len(found) == n and len({r["id"] for r in found}) == n
    assert Counter(r["kind"] for r in found) == {kind: n // len(script.KINDS) for kind in script.KINDS}
    for r in found:
        assert set(r) == {"id", "audio", "text", "nonspeech", "duration", "kind"}
        assert r["text"] == "" and r["nonspeech"] is True and r["audio"] == f"nonspeech/{split}/{r['id']}.ogg"
        audio = load_audio(DEMO / r["audio"])
        assert len(audio) == round(r["duration"] * SAMPLE_RATE) and 1.0 <= r["duration"] <= 10.0
        assert 1e-4 < float(np.abs(audio).max()) <= 1.0  # audible, not clipped


def test_the_clips_stay_under_6_mb():
    assert sum((DEMO / r["audio"]).stat().st_size for split in ("train", "dev", "test") for r in rows(split)) < 6e6


def test_generators_are_seeded_and_match_the_committed_clips(script):
    plan = script.split_plan("dev", 40)
    again = script.split_plan("dev", 40)
    assert [(i, k, s) for i, k, s, _ in plan] == [(i, k, s) for i, k, s, _ in again]
    assert [(r["id"], r["kind"], r["duration"]) for r in rows("dev")] == [(i, k, s) for i, k, s, _ in plan]
    for (clip_id, kind, seconds, rng), (_, _, _, rng2) in list(zip(plan, again))[:10]:
        clip = script.make_clip(kind, rng, seconds)
        assert np.array_equal(clip, script.make_clip(kind, rng2, seconds))
        assert clip.dtype == np.float32 and float(np.abs(clip).max()) <= script.PEAK_LIMIT + 1e-6
        stored = load_audio(DEMO / "nonspeech" / "dev" / f"{clip_id}.ogg")  # lossy: same level, not same samples
        assert abs(script.rms_db(stored) - script.rms_db(clip)) < 1.5, clip_id


def test_noise_colours_have_their_spectral_slopes(script):
    rng = np.random.default_rng(0)
    freqs = np.fft.rfftfreq(SAMPLE_RATE * 4, 1 / SAMPLE_RATE)
    for exponent in (0.0, -1.0, -2.0, 1.0):
        power = np.abs(np.fft.rfft(script.coloured_noise(rng, SAMPLE_RATE * 4, exponent))) ** 2
        band = (freqs > 100) & (freqs < 6000)
        slope = np.polyfit(np.log10(freqs[band]), np.log10(power[band]), 1)[0]
        assert abs(slope - exponent) < 0.15, (exponent, slope)


def test_longform_has_speech_segments_separated_by_nonspeech_gaps(script):
    audio, segments = script.build_longform(seconds=40.0)
    assert audio.dtype == np.float32 and len(audio) >= 40 * SAMPLE_RATE
    texts = [json.loads(line)["text"] for line in (DEMO / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [t for *_, t in segments] == texts[: len(segments)]
    assert segments[0][0] >= 2.0 and len(audio) / SAMPLE_RATE - segments[-1][1] >= 2.0
    for (_, end, _), (start, _, _) in zip(segments, segments[1:]):
        assert 2.0 <= start - end <= 6.0 + 1e-6
    for start, end, _ in segments:  # each segment is the demo clip itself
        assert 1.0 < end - start < 10.0
    gap = audio[int(segments[0][1] * SAMPLE_RATE) + 100:int(segments[1][0] * SAMPLE_RATE) - 100]
    assert float(np.sqrt(np.mean(gap**2))) > 10 ** (-55 / 20)  # the gap is sound, not silence
    again, same = script.build_longform(seconds=40.0)
    assert np.array_equal(audio, again) and same == segments
