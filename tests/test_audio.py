"""asr_lora.audio: loading real files, and log-mel parity with transformers' WhisperFeatureExtractor."""

from __future__ import annotations

import fractions
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from asr_lora.audio import (
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    audio_info,
    load_audio,
    log_mel_spectrogram,
)
from asr_lora.errors import UserError

ASSETS = Path(__file__).parent / "assets"
MONO_CLIPS = ["ko_greeting.flac", "ko_finetune.flac", "en_fox.flac"]
STEREO_44K = ASSETS / "ko_stereo_44k.wav"
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [load_audio(ASSETS / name) for name in MONO_CLIPS] + [load_audio(STEREO_44K)]


@pytest.fixture(scope="module", params=[80, 128])
def n_mels(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def extractor(n_mels) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=n_mels)


def reference(extractor: WhisperFeatureExtractor, audio, **kwargs) -> torch.Tensor:
    out = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", **kwargs)
    return out.input_features


# --- log-mel ------------------------------------------------------------------------------------


def test_features_match_extractor(clips, n_mels, extractor):
    ours, n_frames = log_mel_spectrogram(clips, n_mels)
    ref = reference(extractor, clips)
    assert ours.shape == ref.shape == (len(clips), n_mels, N_FRAMES)
    assert (ours - ref).abs().max().item() < PARITY_ATOL
    assert n_frames.tolist() == [math.ceil(len(c) / HOP_LENGTH) for c in clips]
    # the padded tail is not zero: it is the per-example floor (max - 8 + 4) / 4
    for feats in ours:
        assert torch.allclose(feats[:, -1], (feats.max() - 2.0).expand(n_mels), atol=1e-6)


def test_batched_equals_per_clip(clips, n_mels):
    batched, _ = log_mel_spectrogram(clips, n_mels)
    for clip, row in zip(clips, batched):
        single, n = log_mel_spectrogram(torch.from_numpy(clip)[None], n_mels)  # (1, samples) tensor
        assert torch.allclose(single[0], row, atol=1e-6)
        one_d, _ = log_mel_spectrogram(clip, n_mels)  # a bare 1-D waveform is a batch of one
        assert torch.equal(one_d, single)


def test_longest_is_max_length_prefix(clips, n_mels):
    full, _ = log_mel_spectrogram(clips, n_mels)
    longest, n_frames = log_mel_spectrogram(clips, n_mels, padding="longest")
    n = math.ceil(max(map(len, clips)) / HOP_LENGTH)
    assert longest.shape == (len(clips), n_mels, n)
    assert n_frames.tolist() == [math.ceil(len(c) / HOP_LENGTH) for c in clips]
    assert torch.allclose(longest, full[..., :n], atol=1e-6)

    padded, _ = log_mel_spectrogram(clips, n_mels, padding="longest", pad_to_multiple_of=128)
    assert padded.shape[-1] % 128 == 0 and padded.shape[-1] >= n
    assert torch.allclose(padded, full[..., : padded.shape[-1]], atol=1e-6)


@pytest.mark.parametrize("cut", [16000, 22400, 20077])
def test_longest_single_clip_ending_mid_speech(clips, extractor, cut):
    """A clip cut mid-word: its last frame sees its own samples up to the window edge, and the
    frames past the cut still count for the floor. Ours equals the 30 s features' prefix
    exactly (the extractor's padding="longest" reflects the clip at the cut instead)."""
    clip = clips[0][:cut]
    ours, n_frames = log_mel_spectrogram([clip], extractor.feature_size, padding="longest")
    ref = reference(extractor, [clip])
    assert ours.shape[-1] == n_frames.item() == math.ceil(cut / HOP_LENGTH)
    assert (ours - ref[..., : ours.shape[-1]]).abs().max().item() < 1e-6


def test_longest_floor_counts_frames_past_the_end(clips, extractor):
    """The loudest moment is in the last 150 samples, so frames after the clip's last frame
    carry the maximum; the floor must still use it, as the 30 s computation does."""
    clip = clips[0][:20000].copy()
    clip[-150:] *= 4.0
    ours, _ = log_mel_spectrogram([clip], extractor.feature_size, padding="longest")
    ref = reference(extractor, [clip])
    assert (ours - ref[..., : ours.shape[-1]]).abs().max().item() < 1e-6


def test_modes_agree_on_30s_clips(clips, extractor):
    speech = np.concatenate(clips[:3])
    lengths = [N_SAMPLES, N_SAMPLES - 30, 479_900, 475_000]
    batch = [np.tile(speech, math.ceil(n / len(speech)))[:n] for n in lengths]
    full, _ = log_mel_spectrogram(batch, extractor.feature_size)
    longest, _ = log_mel_spectrogram(batch, extractor.feature_size, padding="longest")
    assert longest.shape == full.shape
    assert torch.equal(longest, full)
    assert (full - reference(extractor, batch)).abs().max().item() < PARITY_ATOL
    # rounding up past 3000 frames: the first 3000 still match, the rest is silence
    padded, _ = log_mel_spectrogram(batch, extractor.feature_size, padding="longest", pad_to_multiple_of=128)
    assert padded.shape[-1] == 3072
    assert torch.equal(padded[..., :N_FRAMES], full)
    silence = full.amax(dim=(1, 2), keepdim=True) - 2.0  # (max - 8 + 4) / 4 in feature units
    assert torch.allclose(padded[..., N_FRAMES:], silence.expand(-1, extractor.feature_size, 72), atol=1e-6)


def test_over_30s_only_in_longest_mode(clips):
    long_clip = np.tile(clips[0], 12)[: N_SAMPLES + 1600]
    with pytest.raises(ValueError, match="30 s"):
        log_mel_spectrogram([long_clip])
    feats, n_frames = log_mel_spectrogram([long_clip, clips[1]], padding="longest")
    assert feats.shape == (2, 80, N_FRAMES + 10)
    assert n_frames.tolist() == [N_FRAMES + 10, math.ceil(len(clips[1]) / HOP_LENGTH)]


def test_short_and_silent_clips(clips, extractor):
    batch = [clips[0][:100], np.zeros(5000, np.float32), clips[1] * 1e-5]  # tiny, silent, very quiet
    ours, n_frames = log_mel_spectrogram(batch, extractor.feature_size)
    assert (ours - reference(extractor, batch)).abs().max().item() < PARITY_ATOL
    assert n_frames.tolist()[:2] == [1, 32]
    assert torch.all(ours[1] == -1.5)  # digital silence: (log10(1e-10) + 4) / 4


def test_bad_arguments(clips):
    with pytest.raises(ValueError, match="n_mels"):
        log_mel_spectrogram(clips, 64)
    with pytest.raises(ValueError, match="padding"):
        log_mel_spectrogram(clips, padding="do_not_pad")
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        log_mel_spectrogram(clips, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match="1-D"):
        log_mel_spectrogram([np.zeros((2, 100), np.float32)])
    with pytest.raises(TypeError, match="float"):
        log_mel_spectrogram([np.zeros(1600, np.int16)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(clips):
    for padding in ("max_length", "longest"):
        cpu, n_cpu = log_mel_spectrogram(clips, 128, padding=padding)
        gpu, n_gpu = log_mel_spectrogram(clips, 128, padding=padding, device="cuda")
        assert gpu.is_cuda and n_gpu.is_cuda
        assert (gpu.cpu() - cpu).abs().max().item() < PARITY_ATOL
        assert torch.equal(n_gpu.cpu(), n_cpu)


# --- loading ------------------------------------------------------------------------------------


def test_load_flac():
    path = ASSETS / "ko_greeting.flac"
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == sf.info(str(path)).frames
    assert 0.05 < np.abs(audio).max() <= 1.0
    duration, sr, channels = audio_info(path)
    assert (sr, channels) == (SAMPLE_RATE, 1) and duration == pytest.approx(len(audio) / SAMPLE_RATE)


def test_load_stereo_44k_wav_downmixes_and_resamples(tmp_path):
    raw, raw_sr = sf.read(str(STEREO_44K), dtype="float32")
    assert raw_sr == 44100 and raw.shape[1] == 2
    audio = load_audio(STEREO_44K)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == math.ceil(len(raw) * SAMPLE_RATE / raw_sr)
    # the right channel is the left at half volume, so mono is 0.75 x left
    left_wav = tmp_path / "left.wav"
    sf.write(str(left_wav), raw[:, 0], raw_sr, subtype="FLOAT")
    left = load_audio(left_wav)
    assert np.abs(audio - 0.75 * left).max() < 1e-3
    assert np.abs(audio).max() > 0.05
    assert audio_info(STEREO_44K) == (pytest.approx(len(raw) / raw_sr), 44100, 2)


def test_load_pcm_with_odd_trailing_byte(tmp_path):
    samples = (load_audio(ASSETS / "ko_finetune.flac") * 32767).astype("<i2")
    path = tmp_path / "KsponSpeech_000001.pcm"
    path.write_bytes(samples.tobytes() + b"\x7f")  # odd byte: a truncated sample, dropped
    audio = load_audio(path)
    assert audio.dtype == np.float32 and len(audio) == len(samples)
    np.testing.assert_array_equal(audio, samples.astype(np.float32) / 32768.0)
    assert audio.min() >= -1.0 and audio.max() < 1.0
    assert audio_info(path) == (len(samples) / SAMPLE_RATE, SAMPLE_RATE, 1)
    np.testing.assert_array_equal(load_audio(path, offset=0.5, end=1.25), audio[8000:20000])


def test_offset_end_reads_segment(tmp_path):
    path = ASSETS / "ko_finetune.flac"
    full = load_audio(path)
    np.testing.assert_array_equal(load_audio(path, offset=1.0, end=2.5), full[16000:40000])
    np.testing.assert_array_equal(load_audio(path, offset=3.0), full[48000:])
    np.testing.assert_array_equal(load_audio(path, end=0.25), full[:4000])
    wav = tmp_path / "clip.wav"
    sf.write(str(wav), full, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(wav, offset=1.0, end=2.5), full[16000:40000])
    segment = load_audio(STEREO_44K, offset=0.1, end=0.4)  # resampled segment
    assert abs(len(segment) - 0.3 * SAMPLE_RATE) <= 1
    with pytest.raises(AudioError, match="bad segment"):  # a skip-able row error, never a crash
        load_audio(path, offset=2.0, end=1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mp3_and_librosa_fallback(tmp_path, monkeypatch):
    import asr_lora.audio as audio_module

    clip = load_audio(ASSETS / "en_fox.flac")
    mp3 = tmp_path / "clip.mp3"
    sf.write(str(mp3), clip, SAMPLE_RATE, format="MP3")
    audio = load_audio(mp3)  # libsndfile decodes mp3
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(clip)) < 0.1 * SAMPLE_RATE  # encoder delay/padding
    assert audio_info(mp3)[1:] == (SAMPLE_RATE, 1)

    def no_libsndfile(*args):
        raise sf.LibsndfileError(0, "pretend this container is unknown: ")

    monkeypatch.setattr(audio_module, "_read_soundfile", no_libsndfile)
    via_librosa = load_audio(mp3, offset=0.5, end=1.5)
    assert abs(len(via_librosa) - SAMPLE_RATE) <= 1
    assert np.abs(via_librosa - audio[8000:24000]).max() < 0.05  # same decoder, same samples


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nope" / "missing.flac"
    with pytest.raises(AudioError, match="missing.flac") as err:
        load_audio(path)
    assert isinstance(err.value, UserError)  # the CLI prints it as one line
    assert err.value.path == str(path) and "not found" in str(err.value)
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)
    with pytest.raises(AudioError, match="missing.flac"):
        audio_info(path)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "name, data",
    [
        ("corrupt.flac", b"fLaC" + bytes(range(256)) * 4),
        ("corrupt.wav", b"RIFF\x00\x00\x00\x00WAVEjunkjunk"),
        ("empty.wav", b""),
        ("noise.mp3", bytes(range(256)) * 8),
    ],
    ids=["flac", "wav", "empty-wav", "mp3"],
)
def test_corrupt_file_raises_audio_error(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(AudioError, match=name):
        load_audio(path)


def test_empty_audio_raises_audio_error(tmp_path):
    pcm = tmp_path / "empty.pcm"
    pcm.write_bytes(b"\x01")  # one byte: zero samples
    with pytest.raises(AudioError, match="empty.pcm.*no audio samples"):
        load_audio(pcm)
    with pytest.raises(AudioError, match=r"ko_greeting.flac.*no audio samples between 60 s and the end \(past the end"):
        load_audio(ASSETS / "ko_greeting.flac", offset=60.0)
    with pytest.raises(AudioError, match=r"no audio samples between 60 s and 61.5 s"):
        load_audio(ASSETS / "ko_greeting.flac", offset=60.0, end=61.5)
    silent_wav = tmp_path / "zero_frames.wav"
    sf.write(str(silent_wav), np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="zero_frames.wav"):
        load_audio(silent_wav)


# --- zero-length files: a header that parses, no audio ------------------------------------------

CUT_LAYOUTS = {  # name: soundfile arguments
    "pcm16": dict(samplerate=16000, channels=1, format="WAV", subtype="PCM_16"),
    "float-fact": dict(samplerate=16000, channels=1, format="WAV", subtype="FLOAT"),  # fact chunk before data
    "wavex-24bit-stereo-48k": dict(samplerate=48000, channels=2, format="WAVEX", subtype="PCM_24"),
}


def write_cut_wav(path: Path, layout: str = "pcm16", extra_bytes: int = 0, streaming: bool = False) -> Path:
    """A 1 s WAV cut ``extra_bytes`` after the end of its header (the ``data`` chunk's size field); its
    header still says 1 s. ``streaming``: the RIFF and data sizes are 0xFFFFFFFF, as a pipe writer leaves them."""
    import io

    args = dict(CUT_LAYOUTS[layout])
    buf = io.BytesIO()
    noise = np.random.default_rng(0).uniform(-0.1, 0.1, (args["samplerate"], args.pop("channels")))
    sf.write(buf, noise, **args)
    data = bytearray(buf.getvalue())
    header_end = data.index(b"data") + 8
    if streaming:
        data[4:8] = data[header_end - 4:header_end] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data[: header_end + extra_bytes]))
    return path


@pytest.mark.parametrize("layout", sorted(CUT_LAYOUTS))
def test_wav_cut_after_its_header_is_zero_length(tmp_path, layout):
    from asr_lora.audio import ZeroLengthAudio

    path = write_cut_wav(tmp_path / f"{layout}.wav", layout)
    assert audio_info(path)[0] == 0.0  # the header parses
    with pytest.raises(ZeroLengthAudio, match=f"{layout}.wav: no audio samples$"):
        load_audio(path)
    streamed = write_cut_wav(tmp_path / f"{layout}-stream.wav", layout, streaming=True)
    with pytest.raises(ZeroLengthAudio, match="no audio samples"):
        load_audio(streamed)


def test_a_few_samples_after_the_header_are_zero_length_but_one_millisecond_is_audio(tmp_path):
    from asr_lora.audio import MIN_AUDIO_SECONDS, ZeroLengthAudio

    with pytest.raises(ZeroLengthAudio, match=r"only 3 audio samples \(0.19 ms\)") as err:
        load_audio(write_cut_wav(tmp_path / "three.wav", extra_bytes=6))  # 16-bit mono: 3 samples
    assert isinstance(err.value, AudioError) and isinstance(pickle.loads(pickle.dumps(err.value)), ZeroLengthAudio)
    one_ms = int(MIN_AUDIO_SECONDS * SAMPLE_RATE)
    assert len(load_audio(write_cut_wav(tmp_path / "one_ms.wav", extra_bytes=2 * one_ms))) == one_ms
    # a segment keeps its own wording (and is a plain AudioError): the file itself is not empty
    with pytest.raises(AudioError, match="between 5 s and the end") as err:
        load_audio(ASSETS / "ko_greeting.flac", offset=5.0)
    assert not isinstance(err.value, ZeroLengthAudio)


# --- media containers through PyAV (m4a, webm, mp4/mov/mkv video...) ----------------------------


def encode_media(audio: np.ndarray, path: Path, codec: str, rate: int = SAMPLE_RATE, video: str | None = None,
                 sr: int = SAMPLE_RATE) -> Path:
    """Write ``audio`` (float32 at ``sr``: mono, or (channels, samples) for stereo) with PyAV: ``codec``
    at ``rate`` Hz in the container named by the suffix, plus a small ``video`` stream (e.g. "libx264")
    before the audio one if given."""
    import av

    layout = "stereo" if audio.ndim == 2 else "mono"
    with av.open(str(path), "w") as out:
        vstream = out.add_stream(video, rate=10) if video else None
        astream = out.add_stream(codec, rate=rate)
        astream.layout = layout
        if vstream is not None:
            vstream.width, vstream.height, vstream.pix_fmt = 64, 48, "yuv420p"
            for i in range(int(len(audio) / sr * 10) + 1):
                image = np.full((48, 64, 3), i * 7 % 256, np.uint8)
                out.mux(vstream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            out.mux(vstream.encode())
        interleaved = (np.atleast_2d(audio).T.reshape(1, -1) * 32767).astype(np.int16)  # packed s16
        frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = sr, 0, fractions.Fraction(1, sr)
        resampler = av.AudioResampler(format=astream.format.name, layout=layout, rate=rate)
        for converted in resampler.resample(frame) + resampler.resample(None):
            out.mux(astream.encode(converted))
        out.mux(astream.encode())
    return path


MEDIA = {  # name: (codec, rate, video codec)
    "clip.m4a": ("aac", 16000, None),
    "clip.webm": ("libopus", 48000, None),
    "clip.ogg": ("libopus", 48000, None),
    "clip.mp4": ("aac", 44100, "libx264"),
    "clip.mov": ("aac", 16000, "mpeg4"),
    "clip.mkv": ("libopus", 48000, "mpeg4"),
}


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 2400) -> float:
    """Highest normalised correlation of two waveforms over lags up to ``max_lag`` samples (codec delay)."""
    n = min(len(a), len(b)) - max_lag
    ref = a[max_lag : max_lag + n - max_lag]
    best = 0.0
    for lag in range(0, 2 * max_lag, 8):
        seg = b[lag : lag + len(ref)]
        best = max(best, float(np.dot(ref, seg) / (np.linalg.norm(ref) * np.linalg.norm(seg) + 1e-12)))
    return best


@pytest.mark.parametrize("name", list(MEDIA))
def test_media_containers_decode_to_the_source(tmp_path, name):
    """libsndfile reads none of these but ogg/opus; PyAV decodes the first audio stream, resampled to 16 kHz mono."""
    source = load_audio(ASSETS / "ko_finetune.flac")
    codec, rate, video = MEDIA[name]
    path = encode_media(source, tmp_path / name, codec, rate, video)
    if name != "clip.ogg":
        with pytest.raises(sf.LibsndfileError):
            sf.info(str(path))
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - len(source)) < 0.15 * SAMPLE_RATE  # codec priming and padding
    assert best_correlation(source, audio) > 0.9
    duration, sr, channels = audio_info(path)
    assert (sr, channels) == (rate, 1) and duration == pytest.approx(len(audio) / SAMPLE_RATE, abs=0.15)


def test_stereo_44k_m4a_downmixes_and_resamples(tmp_path):
    source = load_audio(ASSETS / "ko_finetune.flac")
    stereo = np.stack([source, 0.5 * source])  # the right channel is the left at half volume
    path = encode_media(stereo, tmp_path / "stereo.m4a", "aac", rate=44100)
    assert audio_info(path)[1:] == (44100, 2)
    audio = load_audio(path)
    assert best_correlation(source, audio) > 0.9
    assert np.sqrt(np.mean(audio**2)) == pytest.approx(0.75 * np.sqrt(np.mean(source**2)), rel=0.1)


def long_clip() -> np.ndarray:
    """12.7 s of speech: four asset clips end to end."""
    clips = [load_audio(ASSETS / n) for n in ("ko_finetune.flac", "en_fox.flac", "ko_finetune.flac", "en_fox.flac")]
    return np.concatenate(clips)


@pytest.mark.parametrize("name, tick", [("clip.webm", 16), ("clip.m4a", 0)])
def test_media_offset_end_select_the_same_samples(tmp_path, name, tick):
    """offset/end on a PyAV-decoded file give the samples of the whole decode: near offsets by decoding
    from the start (exact), far ones by seeking, exact to the container's timestamp resolution
    (``tick`` samples at 16 kHz: mp4 counts samples, webm milliseconds)."""
    codec, rate, video = MEDIA[name]
    path = encode_media(long_clip(), tmp_path / name, codec, rate, video)
    full = load_audio(path)
    for offset, end in [(0.5, 1.5), (5.0, 7.25), (9.0, None), (None, 2.0)]:
        segment = load_audio(path, offset=offset, end=end)
        a = round((offset or 0) * SAMPLE_RATE)
        b = len(full) if end is None else round(end * SAMPLE_RATE)
        assert abs(len(segment) - (b - a)) <= tick + 1
        n, edge = min(len(segment), b - a), 240  # resampling a segment alone differs near its ends

        def error(lag: int) -> np.ndarray:
            return segment[edge : n - edge] - full[a + edge + lag : a + n - edge + lag]

        lag = min(range(-32, 33), key=lambda k: float(np.mean(error(k) ** 2)))
        assert abs(lag) <= (tick if offset and offset > 1.0 else 0)
        if name == "clip.webm":  # opus decodes the same samples after a seek
            assert np.abs(error(lag)).max() < 1e-4
        else:  # AAC's noise substitution draws from a generator whose state is the decode history
            assert np.sqrt(np.mean(error(lag) ** 2)) < 0.1 * np.sqrt(np.mean(full[a : a + n] ** 2))


def test_video_without_audio_and_garbage_media_name_the_file_and_reason(tmp_path):
    import av

    silent_video = tmp_path / "screen.mp4"
    with av.open(str(silent_video), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(5):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")))
        out.mux(stream.encode())
    with pytest.raises(AudioError, match=r"screen.mp4: cannot decode \(libsndfile: .*PyAV: no audio stream \(streams: video\)"):
        load_audio(silent_video)
    with pytest.raises(AudioError, match=r"screen.mp4: cannot read header .*no audio stream"):
        audio_info(silent_video)
    garbage = tmp_path / "voice.m4a"
    garbage.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(AudioError, match=r"voice.m4a: cannot decode \(libsndfile: .*; PyAV: Invalid data found") as err:
        load_audio(garbage)
    assert str(garbage) not in err.value.reason  # the file is named once, in front
    truncated = tmp_path / "cut.webm"
    encoded = encode_media(long_clip(), tmp_path / "whole.webm", "libopus", 48000).read_bytes()
    truncated.write_bytes(encoded[:200])
    with pytest.raises(AudioError, match="cut.webm"):
        load_audio(truncated)


def test_transcribe_reads_m4a_mp4_webm_files_and_folders(tiny_whisper, tmp_path, capsys):
    from asr_lora.transcribe import transcribe_paths

    source = load_audio(ASSETS / "ko_finetune.flac")
    folder = tmp_path / "recordings" / "day1"
    folder.mkdir(parents=True)
    for name in ("clip.m4a", "clip.mp4", "clip.webm", "clip.mov", "clip.mkv"):
        codec, rate, video = MEDIA[name]
        encode_media(source, folder / name, codec, rate, video)
    single = encode_media(source, tmp_path / "phone.m4a", "aac")
    from asr_lora.backends import DecodeOptions
    from asr_lora.sources import ModelSource

    failures = transcribe_paths([str(tmp_path / "recordings"), str(single)], ModelSource("model", str(tiny_whisper)),
                                DecodeOptions(max_new_tokens=4), fmt="json", progress=False)
    assert failures == []
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == sorted(["clip.m4a", "clip.mkv", "clip.mov", "clip.mp4",
                                                                "clip.webm", "phone.m4a"])
    assert all(r["duration"] == pytest.approx(len(source) / SAMPLE_RATE, abs=0.15) for r in rows)
