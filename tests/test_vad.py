"""asr_lora.vad on the real Silero model (shipped in the silero-vad wheel): speech found in speech, none in
generated noise and tones; pieces cover the file, are cut at speech boundaries and stay within 30 s."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from asr_lora import vad
from asr_lora.audio import SAMPLE_RATE, load_audio

from .conftest import ASSETS, DEMO, REPO

SR = SAMPLE_RATE


def demo_clips(split: str, n: int) -> list[np.ndarray]:
    rows = [json.loads(line) for line in (DEMO / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()][:n]
    return [load_audio(DEMO / r["audio"]) for r in rows]


def nonspeech_clips(split: str, n: int | None = None) -> list[tuple[str, np.ndarray]]:
    manifest = DEMO / f"nonspeech_{split}.jsonl"
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()][:n]
    return [(r["kind"], load_audio(DEMO / r["audio"])) for r in rows]


def noise(seconds: float, db: float = -25.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 10 ** (db / 20)).astype(np.float32)


def test_speech_is_found_and_noise_tones_silence_are_not():
    for audio in [load_audio(ASSETS / "ko_greeting.flac"), load_audio(ASSETS / "en_fox.flac"), *demo_clips("dev", 3)]:
        spans = vad.speech_spans(audio)
        assert spans and sum(b - a for a, b in spans) > 0.5 * len(audio)
        assert all(0 <= a < b <= len(audio) for a, b in spans)
    t = np.arange(5 * SR) / SR
    assert vad.speech_spans(noise(5.0)) == []
    assert vad.speech_spans((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)) == []
    assert vad.speech_spans(np.zeros(5 * SR, np.float32)) == []
    assert vad.speech_spans(np.zeros(100, np.float32)) == []  # shorter than one window


def test_no_speech_spans_in_the_generated_dev_nonspeech_clips():
    clips = nonspeech_clips("dev")
    with_speech = [kind for kind, audio in clips if vad.speech_spans(audio)]
    assert len(clips) == 40 and with_speech == []


def test_spans_are_silero_get_speech_timestamps_with_the_same_settings():
    from silero_vad import get_speech_timestamps

    audio = np.concatenate([noise(1.0, -40), load_audio(ASSETS / "ko_finetune.flac"), noise(2.0, -40, seed=1),
                            load_audio(ASSETS / "ko_greeting.flac")])
    ours = vad.speech_spans(audio, threshold=0.6, min_silence_s=0.2, speech_pad_s=0.1, min_speech_s=0.3)
    theirs = get_speech_timestamps(audio, vad.load_model(), threshold=0.6, min_silence_duration_ms=200,
                                   speech_pad_ms=100, min_speech_duration_ms=300, max_speech_duration_s=30.0)
    assert ours == [(s["start"], s["end"]) for s in theirs] and len(ours) >= 2


def test_pieces_cover_the_file_and_leave_the_noise_gap_undecoded():
    speech_a, speech_b = demo_clips("test", 2)
    parts = [np.zeros(3 * SR, np.float32), speech_a, noise(8.0), speech_b, noise(2.0, -50, seed=2)]
    audio = np.concatenate(parts)
    a_start = 3 * SR
    a_end = a_start + len(speech_a)
    b_start = a_end + 8 * SR
    b_end = b_start + len(speech_b)
    pieces = vad.vad_pieces(audio)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(audio)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(pieces, pieces[1:]))  # contiguous
    assert all(a < b for a, b, _ in pieces)
    assert [flag for *_, flag in pieces] == [False, True, False, True, False]
    (s1, e1, _), (s2, e2, _) = [p for p in pieces if p[2]]
    pad = int(0.5 * SR)  # the utterances sit inside their pieces, padding included, nothing more
    assert a_start - pad <= s1 and e1 <= a_end + pad and s2 >= b_start - pad and e2 <= b_end + pad
    assert sum(b - a for a, b, flag in pieces if flag) >= 0.8 * (len(speech_a) + len(speech_b))


def test_long_speech_is_cut_into_pieces_of_at_most_30_s():
    clips = demo_clips("dev", 30)
    gap = np.zeros(int(0.3 * SR), np.float32)  # short pauses: one long stretch of speech
    audio = np.concatenate([x for clip in clips for x in (clip, gap)])
    assert len(audio) > 70 * SR
    pieces = vad.vad_pieces(audio)
    speech = [(a, b) for a, b, flag in pieces if flag]
    assert len(speech) >= 3 and all(b - a <= 30 * SR for a, b in speech)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(audio)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(pieces, pieces[1:]))
    assert sum(b - a for a, b in speech) > 0.9 * len(audio)
    short = vad.vad_pieces(audio, max_piece_s=10.0)
    assert all(b - a <= 10 * SR for a, b, flag in short if flag)


def test_merge_spans_rules():
    assert vad.merge_spans([], 5 * SR) == [(0, 5 * SR, False)]
    assert vad.merge_spans([], 0) == []
    # spans 0.5 s apart merge; 3 s apart do not; the gaps and the tail are non-speech pieces
    spans = [(SR, 2 * SR), (int(2.5 * SR), 4 * SR), (7 * SR, 8 * SR)]
    assert vad.merge_spans(spans, 10 * SR) == [(0, SR, False), (SR, 4 * SR, True), (4 * SR, 7 * SR, False),
                                               (7 * SR, 8 * SR, True), (8 * SR, 10 * SR, False)]
    assert vad.merge_spans(spans, 10 * SR, max_gap_s=5.0) == [(0, SR, False), (SR, 8 * SR, True),
                                                              (8 * SR, 10 * SR, False)]
    # a merge that would pass max_piece_s starts a new piece (no non-speech piece between touching ones)
    assert vad.merge_spans([(0, 20 * SR), (int(20.5 * SR), 40 * SR)], 40 * SR) == [
        (0, 20 * SR, True), (20 * SR, int(20.5 * SR), False), (int(20.5 * SR), 40 * SR, True)]
    # one span longer than max_piece_s is cut into equal parts
    third = 70 * SR // 3
    assert vad.merge_spans([(0, 70 * SR)], 70 * SR) == [(0, third, True), (third, 2 * third, True),
                                                        (2 * third, 70 * SR, True)]


def test_one_model_shared_across_threads_gives_the_serial_results():
    clips = [load_audio(ASSETS / name) for name in ("ko_greeting.flac", "ko_finetune.flac", "en_fox.flac")]
    clips.append(np.concatenate([noise(2.0), clips[0]]))
    serial = [vad.speech_spans(c) for c in clips]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            assert list(pool.map(vad.speech_spans, clips)) == serial
    assert vad.load_model() is vad.load_model()


def test_loading_the_model_keeps_torch_threads():
    """silero_vad sets torch's threads to 1 on import; asr_lora.vad puts the setting back."""
    code = ("import torch; torch.set_num_threads(2); from asr_lora import vad; vad.spans_from_probabilities([0.9] * 20, "
            "20 * 512); vad.load_model(); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"


def test_unsupported_rate_and_shape_are_errors():
    with pytest.raises(ValueError, match="16000 or 8000"):
        vad.speech_spans(np.zeros(1000, np.float32), sr=44100)
    with pytest.raises(ValueError, match="1-D"):
        vad.speech_spans(np.zeros((2, 1000), np.float32))
