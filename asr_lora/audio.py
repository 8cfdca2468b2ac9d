"""Audio in, Whisper log-mel features out.

Loading returns float32 mono at 16 kHz (``load_audio``), whatever the container: soundfile for
wav/flac/ogg/mp3, headerless 16-bit PCM for KsponSpeech ``.pcm``, PyAV for the rest (m4a/aac, webm,
opus, and the first audio stream of mp4/mov/mkv video; its wheels bundle FFmpeg, no system ffmpeg).

``log_mel_spectrogram`` is a batched torch version (CPU or GPU) of transformers'
``WhisperFeatureExtractor``; with ``padding="max_length"`` it gives the extractor's numbers.
How the extractor builds them, since it matters for padding:

1. the waveform is zero-padded to 30 s (480000 samples) *before* anything else;
2. centred STFT (reflect padding at both ends), the last of the 3001 frames is dropped;
3. log10 of the mel power clamped at 1e-10, so zero-padded frames sit at exactly -10;
4. per example, values are floored at (max over all its mels and frames) - 8, then (x + 4) / 4.

So padding is not zero in feature space: a silent frame becomes (max - 8 + 4) / 4, which
depends on the loudest frame of that clip.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import soxr
import torch

from .errors import UserError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-second chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a mel spectrogram input
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 10 ms per frame

LOG_MEL_FLOOR = 1e-10  # mel power clamp before log10: digital silence -> -10
DYNAMIC_RANGE = 8.0  # log10 units kept below each example's maximum

CPU_CHUNK_FRAMES = 3000  # frames per STFT call on CPU: one 30 s clip's worth stays in cache

PCM_SAMPLE_RATE = 16000  # KsponSpeech .pcm: headerless 16 kHz, 16-bit signed LE, mono
# What folder scans (transcribe, non-speech folders) pick up: soundfile's formats and, through PyAV,
# audio containers and the first audio stream of a video
AUDIO_SUFFIXES = frozenset({".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac",
                            ".wma", ".aif", ".aiff", ".pcm", ".webm", ".mp4",
                            ".m4b", ".mka", ".amr", ".3gp", ".caf", ".ac3", ".mov", ".mkv", ".m4v", ".avi"})
AV_SEEK_MARGIN = 1.0  # seconds decoded before ``offset`` after a PyAV seek: codecs with overlap settle

Padding = Literal["longest", "max_length"]


class AudioError(UserError):
    """An audio file is missing, unreadable, corrupt or empty; the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str = ""):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if reason else self.path)

    def __reduce__(self):  # survives pickling, e.g. out of DataLoader workers
        return type(self), (self.path, self.reason)


MIN_AUDIO_SECONDS = 0.001  # a whole file with less audio than this holds nothing (a WAV cut near its header)


class ZeroLengthAudio(AudioError):
    """A file whose header parses but that holds no audio (or under 1 ms of it): ``zero_length``."""


def zero_length_reason(n_samples: int, sr: int) -> str | None:
    """Why a whole file of ``n_samples`` at ``sr`` Hz is zero length, or None if it is not."""
    if n_samples >= MIN_AUDIO_SECONDS * sr:
        return None
    if n_samples <= 0:
        return "no audio samples"
    return f"only {n_samples} audio samples ({n_samples / sr * 1000:.2f} ms): too few to hold sound; a file cut short?"


# --- loading ------------------------------------------------------------------------------------


def load_audio(
    path: str | os.PathLike,
    offset: float | None = None,
    end: float | None = None,
    sr: int = SAMPLE_RATE,
) -> np.ndarray:
    """Read an audio file as a float32 mono waveform at ``sr`` Hz.

    ``offset`` / ``end`` (seconds) select a segment; only that segment is decoded where the
    format allows it. Stereo is averaged to mono, other rates are resampled. Any failure to
    produce samples raises ``AudioError`` naming the file.
    """
    if offset is not None and offset < 0:
        raise AudioError(path, f"bad segment: offset must be >= 0, got {offset}")
    if end is not None and end <= (offset or 0.0):
        raise AudioError(path, f"bad segment: end ({end}) must be after offset ({offset or 0.0})")
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "file not found")
    if not path.is_file():
        raise AudioError(path, "not a regular file")

    try:
        if path.suffix.lower() == ".pcm":
            audio, file_sr = _read_pcm(path, offset, end)
        else:
            audio, file_sr = _read_other(path, offset, end)
    except AudioError:
        raise
    except Exception as e:  # soundfile/PyAV raise many types; the caller needs the file name
        raise AudioError(path, f"cannot decode ({type(e).__name__}: {e})") from e

    if offset is None and end is None and (empty := zero_length_reason(audio.shape[0], file_sr)):
        raise ZeroLengthAudio(path, empty)
    if audio.shape[0] == 0:
        where = ("" if offset is None and end is None else
                 f" between {offset or 0.0:g} s and {'the end' if end is None else f'{end:g} s'} (past the end of the file?)")
        raise AudioError(path, f"no audio samples{where}")
    if not np.isfinite(audio).all():
        raise AudioError(path, "contains NaN or infinite samples")

    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if file_sr != sr:
        audio = resample(audio, file_sr, sr)
    return np.ascontiguousarray(audio, dtype=np.float32)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """1-D float32 ``audio`` from ``orig_sr`` to ``target_sr`` Hz, ceil(n * target / orig) samples.

    Same numbers as ``librosa.resample`` with its default ``res_type="soxr_hq"``, calling soxr
    (a librosa dependency) directly: librosa's first resample imports scipy.signal, seconds.
    """
    if orig_sr == target_sr:
        return audio
    n_out = math.ceil(len(audio) * target_sr / orig_sr)
    out = soxr.resample(audio, orig_sr, target_sr, quality="soxr_hq")
    return np.pad(out, (0, max(0, n_out - len(out))))[:n_out].astype(np.float32, copy=False)


def audio_info(path: str | os.PathLike) -> tuple[float, int, int]:
    """(duration in seconds, sample rate, channels) from the header alone, for validation."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found" if not path.exists() else "not a regular file")
    if path.suffix.lower() == ".pcm":
        return (path.stat().st_size // 2) / PCM_SAMPLE_RATE, PCM_SAMPLE_RATE, 1
    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate, info.samplerate, info.channels
    except Exception as e:
        soundfile_error = (getattr(e, "error_string", None) or str(e)).rstrip(".")
    try:  # containers libsndfile does not know (m4a, aac, webm, mp4...): ask FFmpeg through PyAV
        import av

        with av.open(str(path)) as container:
            stream = container.streams.audio[0]
            if stream.duration is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:  # a corrupt file a lenient demuxer opened
                raise ValueError("no duration in the header")
            return duration, stream.codec_context.sample_rate, stream.codec_context.layout.nb_channels or 1
    except Exception as e:
        reason = "no audio stream" if isinstance(e, IndexError) else getattr(e, "strerror", None) or str(e)
        raise AudioError(path, f"cannot read header (libsndfile: {soundfile_error}; PyAV: {reason})") from e


def _segment(offset: float | None, end: float | None, sr: int, n_total: int) -> tuple[int, int]:
    start = 0 if offset is None else min(round(offset * sr), n_total)
    stop = n_total if end is None else min(round(end * sr), n_total)
    return start, max(start, stop)


def _read_pcm(path: Path, offset: float | None, end: float | None) -> tuple[np.ndarray, int]:
    n_total = path.stat().st_size // 2  # a trailing odd byte is not a sample
    start, stop = _segment(offset, end, PCM_SAMPLE_RATE, n_total)
    pcm = np.fromfile(path, dtype="<i2", count=stop - start, offset=2 * start)
    return (pcm.astype(np.float32) / 32768.0)[:, None], PCM_SAMPLE_RATE


def _read_soundfile(path: Path, offset: float | None, end: float | None) -> tuple[np.ndarray, int]:
    with sf.SoundFile(str(path)) as f:
        start, stop = _segment(offset, end, f.samplerate, f.frames)
        if start > 0:
            f.seek(start)
        audio = f.read(stop - start, dtype="float32", always_2d=True)
        return audio, f.samplerate


def _read_other(path: Path, offset: float | None, end: float | None) -> tuple[np.ndarray, int]:
    """libsndfile (wav, flac, ogg, mp3...), else PyAV (m4a, aac, webm, opus, mp4/mov/mkv video...);
    when both fail the error gives both decoders' reasons."""
    try:
        return _read_soundfile(path, offset, end)
    except sf.SoundFileError as e:
        soundfile_error = (getattr(e, "error_string", None) or str(e)).rstrip(".")  # without the path
    try:
        return _read_av(path, offset, end)
    except Exception as e:
        reason = e.reason if isinstance(e, AudioError) else getattr(e, "strerror", None) or str(e)
        raise AudioError(path, f"cannot decode (libsndfile: {soundfile_error}; PyAV: {reason})") from e


def _read_av(path: Path, offset: float | None, end: float | None) -> tuple[np.ndarray, int]:
    """The first audio stream of any container FFmpeg (PyAV's bundled build) reads, at its own rate.

    Time 0 is the stream's first sample. Far offsets seek (to ``AV_SEEK_MARGIN`` before, so that
    codecs whose frames overlap settle); each sample's position comes from the first frame's
    timestamp after the seek, then by counting. Decoding stops at ``end``.
    """
    import av  # imported here: only media libsndfile cannot read need it

    with av.open(str(path)) as container:
        if not container.streams.audio:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise AudioError(path, f"no audio stream (streams: {kinds})")
        stream = container.streams.audio[0]
        file_sr = stream.codec_context.sample_rate
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        start = 0 if offset is None else round(offset * file_sr)
        stop = None if end is None else round(end * file_sr)
        pos, seek = 0, offset is not None and offset > AV_SEEK_MARGIN
        if seek:
            container.seek(int((t0 + offset - AV_SEEK_MARGIN) / stream.time_base), stream=stream, backward=True)
            pos = None  # known from the first frame decoded after the seek
        to_float = av.AudioResampler(format="fltp")  # sample format only: rate and layout kept
        chunks, n_frames = [], 0
        for n_frames, frame in enumerate(container.decode(stream), start=1):
            if pos is None:
                pos = round((frame.time - t0) * file_sr) if frame.time is not None else 0
            for converted in to_float.resample(frame):
                data = converted.to_ndarray()  # (channels, samples)
                a, pos = pos, pos + data.shape[1]
                lo, hi = max(a, start), pos if stop is None else min(pos, stop)
                if hi > lo:
                    chunks.append(data[:, lo - a : hi - a])
            if stop is not None and pos >= stop:
                break
        if n_frames == 0 and not seek:  # a corrupt file a lenient demuxer opened, or an empty stream
            raise AudioError(path, "no audio frames in the stream")
        n_channels = stream.codec_context.layout.nb_channels or 1
        if not chunks:
            return np.zeros((0, n_channels), np.float32), file_sr
        return np.ascontiguousarray(np.concatenate(chunks, axis=1).T, dtype=np.float32), file_sr


# --- features -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def mel_filters(device: torch.device | str, n_mels: int) -> torch.Tensor:
    """Slaney mel filterbank (n_mels, 1 + N_FFT // 2) over 0-8 kHz, the one Whisper uses.

    Bit for bit the float32 of the ``mel_filter_bank`` WhisperFeatureExtractor builds, and of
    ``librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels, dtype=np.float64)`` (htk=False,
    norm="slaney"); written out here because librosa's first call costs seconds of imports.
    """
    if n_mels not in (80, 128):
        raise ValueError(f"Whisper uses 80 or 128 mel bins, got n_mels={n_mels}")
    fft_hz = np.fft.rfftfreq(N_FFT, d=1.0 / SAMPLE_RATE)
    mel_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    ramps = mel_hz[:, None] - fft_hz[None, :]
    widths = np.diff(mel_hz)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]  # slaney: constant energy per band
    return torch.from_numpy(weights.astype(np.float32)).to(device)


_MEL_LINEAR_HZ = 200.0 / 3  # slaney mel scale: linear below 1 kHz, logarithmic above
_MEL_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    if hz < 1000.0:
        return hz / _MEL_LINEAR_HZ
    return 1000.0 / _MEL_LINEAR_HZ + np.log(hz / 1000.0) / _MEL_LOG_STEP


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    log_start = 1000.0 / _MEL_LINEAR_HZ
    linear = mels * _MEL_LINEAR_HZ
    logarithmic = 1000.0 * np.exp(_MEL_LOG_STEP * (mels - log_start))
    return np.where(mels >= log_start, logarithmic, linear)


def log_mel_spectrogram(
    audio: torch.Tensor | np.ndarray | Sequence[np.ndarray | torch.Tensor],
    n_mels: int = 80,
    *,
    padding: Padding = "max_length",
    pad_to_multiple_of: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mel features of a batch of 16 kHz waveforms.

    ``audio`` is a (batch, samples) tensor/array, a single 1-D waveform, or a list of 1-D
    waveforms of any lengths. Returns ``(features, n_frames)``: features (batch, n_mels, frames)
    float32 on ``device`` (default: the input tensor's device, else CPU), and per clip the number
    of frames that hold its audio, ``ceil(samples / HOP_LENGTH)``, on the same device.

    ``padding="max_length"``: every clip padded to 30 s, 3000 frames, the Whisper input; equals
    ``WhisperFeatureExtractor(feature_size=n_mels)(audio, sampling_rate=16000)``. Clips longer
    than 30 s are an error (the extractor silently truncates them; chunk them instead).

    ``padding="longest"``: frames = ceil(longest clip / HOP_LENGTH), rounded up to
    ``pad_to_multiple_of`` frames. Each clip is treated as if padded with zeros to 30 s (or to
    the batch length, if longer), so its floor (max - 8) is the one "max_length" uses and the
    result is exactly the "max_length" features cut to the first ``frames`` frames, whatever
    else is in the batch; frames past 30 s are silence. This is not the extractor's own
    ``padding="longest"``: that one reflects the longest clip at the batch end (its last frame
    changes) and takes the max only over frames inside the batch, so a clip's features there
    depend on the other clips.

    Only the frames that hold audio are computed; the rest are filled with the silence value
    ``(max(-10, max - 8) + 4) / 4`` they would get anyway, so short clips are cheap even in
    "max_length" mode.
    """
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    if pad_to_multiple_of is not None and (padding != "longest" or pad_to_multiple_of < 1):
        raise ValueError("pad_to_multiple_of (in frames, >= 1) only applies to padding='longest'")
    filters = mel_filters(torch.device(device or _input_device(audio)), n_mels)  # checks n_mels
    flat, lengths = _flatten_batch(audio, filters.device)
    longest = max(lengths)
    n_audio = math.ceil(longest / HOP_LENGTH)

    if padding == "max_length":
        if longest > N_SAMPLES:
            raise ValueError(
                f"a clip has {longest} samples ({longest / SAMPLE_RATE:.2f} s), more than the "
                f"{CHUNK_LENGTH} s Whisper window; chunk it or use padding='longest'"
            )
        n_out = N_FRAMES
    else:
        n_out = n_audio
        if pad_to_multiple_of:
            n_out = math.ceil(n_out / pad_to_multiple_of) * pad_to_multiple_of

    waveforms = _pad_batch(flat, lengths, n_audio)
    features = waveforms.new_empty(len(lengths), n_mels, n_out)
    # The batch in pieces of about CPU_CHUNK_FRAMES frames on CPU, where a whole batch's STFT
    # falls out of cache and runs slower than a loop over clips; in one piece on GPU.
    step = len(lengths) if waveforms.is_cuda else max(1, CPU_CHUNK_FRAMES // max(1, n_audio))
    for i in range(0, len(lengths), step):
        _log_mel_features(waveforms[i : i + step], filters, out=features[i : i + step])

    frames = [min(math.ceil(n / HOP_LENGTH), n_out) for n in lengths]
    return features, torch.tensor(frames, dtype=torch.long, device=features.device)


def _pad_batch(flat: torch.Tensor, lengths: list[int], n_audio: int) -> torch.Tensor:
    """(batch, samples) of the clips followed by zeros, long enough for ``_log_mel_features``.

    N_FFT zeros more than ``n_audio`` frames need, so no frame that sees a clip sample sees the
    STFT's reflection at the end; except near 30 s, where the length is 30 s exactly, as in the
    extractor (whose reflection at 30 s is then reproduced).
    """
    n_padded = n_audio * HOP_LENGTH + N_FFT
    if n_audio * HOP_LENGTH <= N_SAMPLES:
        n_padded = min(n_padded, N_SAMPLES)
    waveforms = flat.new_zeros(len(lengths), n_padded)
    start = 0
    for i, n in enumerate(lengths):
        waveforms[i, :n] = flat[start : start + n]
        start += n
    return waveforms


def _log_mel_features(waveforms: torch.Tensor, filters: torch.Tensor, out: torch.Tensor) -> None:
    """Whisper features of zero-padded waveforms from ``_pad_batch``, into ``out`` (batch, n_mels, frames).

    The STFT yields every frame whose window sees a sample (n_audio + 2), or all 3000 near
    30 s; frames after those are all-zero windows and are filled with their known value.
    """
    window = torch.hann_window(N_FFT, device=waveforms.device)
    stft = torch.stft(waveforms, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = (stft[..., :-1].abs() ** 2).contiguous()  # the extractor drops the last frame
    log_spec = torch.clamp(filters @ magnitudes, min=LOG_MEL_FLOOR).log10()
    floor = log_spec.amax(dim=(1, 2), keepdim=True) - DYNAMIC_RANGE  # per example

    n_computed = min(log_spec.shape[-1], out.shape[-1])
    out[..., :n_computed] = (torch.maximum(log_spec[..., :n_computed], floor) + 4.0) / 4.0
    if n_computed < out.shape[-1]:  # all-zero windows: log10(LOG_MEL_FLOOR) = -10 before the floor
        silence = torch.full_like(floor, LOG_MEL_FLOOR).log10()
        out[..., n_computed:] = (torch.maximum(silence, floor) + 4.0) / 4.0


def _input_device(audio) -> torch.device:
    if isinstance(audio, torch.Tensor):
        return audio.device
    if isinstance(audio, (list, tuple)) and audio and isinstance(audio[0], torch.Tensor):
        return audio[0].device
    return torch.device("cpu")


def _flatten_batch(audio, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """All clips concatenated as one float32 tensor on ``device`` (one transfer), and lengths."""
    if isinstance(audio, (torch.Tensor, np.ndarray)):
        if audio.ndim not in (1, 2):
            raise ValueError(f"expected (samples,) or (batch, samples) audio, got shape {tuple(audio.shape)}")
        clips = [audio] if audio.ndim == 1 else list(audio)
    else:
        clips = list(audio)
    if not clips:
        raise ValueError("empty batch")
    tensors = [torch.as_tensor(np.asarray(c) if not isinstance(c, torch.Tensor) else c) for c in clips]
    for i, t in enumerate(tensors):
        if t.ndim != 1:
            raise ValueError(f"clip {i} must be 1-D mono audio, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"clip {i} is {t.dtype}; expected a float waveform in [-1, 1]")
    flat = torch.cat([t.to(torch.float32) for t in tensors]).to(device)
    return flat, [t.shape[0] for t in tensors]
