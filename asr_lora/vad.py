"""Voice activity: where the speech is, from Silero VAD (PyPI ``silero-vad``).

The ``silero-vad`` wheel ships its TorchScript model (about 2 MB) and needs only torch: nothing is
downloaded. The model is loaded once per process and shared; it is stateful (an LSTM run window by
window), so one lock serialises its use across threads.

- :func:`speech_spans`: speech regions ``(start, end)`` in samples, from Silero's own
  ``get_speech_timestamps`` rules (a threshold on the per-window speech probability, the shortest
  silence that ends a span, padding around each span, spans under ``min_speech_s`` dropped).
- :func:`vad_pieces` (and :func:`speech_pieces`, which also names each piece's speech spans): a whole
  file cut into contiguous pieces ``(start, end, has_speech)``: speech spans
  merged while the merged piece stays within ``max_piece_s`` (30 s, Whisper's window) and the silence
  between them within ``max_gap_s``, as faster-whisper's ``collect_chunks`` merges speech chunks up to
  its chunk length; but the audio is not spliced together: the stretches between speech pieces stay in
  place as pieces flagged ``False`` (not to be decoded), so timestamps need no mapping back and the
  pieces cover the file.

Defaults were measured on the demo corpus (speech) and the generated non-speech clips: see
``benchmarks/measure_vad.py`` and the README.
"""

from __future__ import annotations

import threading
import warnings
from typing import NamedTuple

import numpy as np
import torch

WINDOW = {16000: 512, 8000: 256}  # samples per Silero window at each supported rate

THRESHOLD = 0.5  # speech probability at or above which a window is speech (Silero's and faster-whisper's default)
MIN_SPEECH_S = 0.25  # shorter speech spans are dropped (Silero's default)
MIN_SILENCE_S = 0.25  # silence that ends a span; shorter pauses stay inside it
SPEECH_PAD_S = 0.4  # added before and after each span (halved between spans closer than twice this)
MAX_PIECE_S = 30.0  # Whisper's input window
MAX_GAP_S = 1.0  # spans further apart than this are separate pieces, the stretch between them not decoded

_LOCK = threading.Lock()
_MODEL = None


def _silero():
    """The ``silero_vad`` package. Importing it sets torch's intra-op threads to 1 for the whole
    process; that setting is put back, so the rest of the program (Whisper) keeps its threads."""
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():  # the loader's own deprecated importlib / jit calls
            warnings.simplefilter("ignore", DeprecationWarning)
            import silero_vad
    finally:
        torch.set_num_threads(threads)
    return silero_vad


def load_model():
    """The Silero VAD TorchScript model, loaded on first use and shared (thread-safe)."""
    global _MODEL
    with _LOCK:
        if _MODEL is None:
            silero_vad = _silero()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _MODEL = silero_vad.load_silero_vad()
        return _MODEL


def _check_rate(sr: int) -> int:
    if sr not in WINDOW:
        raise ValueError(f"Silero VAD runs at 16000 or 8000 Hz, got sr={sr}; resample first")
    return WINDOW[sr]


@torch.inference_mode()
def speech_probabilities(audio: np.ndarray | torch.Tensor, sr: int = 16000) -> list[float]:
    """Silero's speech probability for each window (512 samples at 16 kHz, the last zero-padded),
    computed exactly as ``silero_vad.get_speech_timestamps`` does."""
    window = _check_rate(sr)
    audio = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not torch.is_tensor(audio) else audio)
    if audio.ndim != 1:
        raise ValueError(f"expected 1-D mono audio, got shape {tuple(audio.shape)}")
    audio = audio.to(torch.float32)
    model = load_model()
    probs = []
    with _LOCK:
        model.reset_states()
        for start in range(0, len(audio), window):
            chunk = audio[start:start + window]
            if len(chunk) < window:
                chunk = torch.nn.functional.pad(chunk, (0, window - len(chunk)))
            probs.append(model(chunk, sr).item())
    return probs


def spans_from_probabilities(probs: list[float], n_samples: int, sr: int = 16000, *, threshold: float = THRESHOLD,
                             min_silence_s: float = MIN_SILENCE_S, speech_pad_s: float = SPEECH_PAD_S,
                             min_speech_s: float = MIN_SPEECH_S,
                             max_span_s: float = MAX_PIECE_S) -> list[tuple[int, int]]:
    """Speech spans from per-window probabilities, by Silero's ``get_speech_timestamps_from_probs``;
    no span is longer than ``max_span_s`` (a longer one is cut at its longest internal silence)."""
    _check_rate(sr)
    spans = _silero().get_speech_timestamps_from_probs(
        probs, sampling_rate=sr, threshold=threshold, min_speech_duration_ms=min_speech_s * 1000,
        max_speech_duration_s=max_span_s, min_silence_duration_ms=min_silence_s * 1000,
        speech_pad_ms=speech_pad_s * 1000, audio_length_samples=n_samples)
    return [(int(s["start"]), int(s["end"])) for s in spans if s["end"] > s["start"]]


def speech_spans(audio: np.ndarray | torch.Tensor, sr: int = 16000, *, threshold: float = THRESHOLD,
                 min_silence_s: float = MIN_SILENCE_S, speech_pad_s: float = SPEECH_PAD_S,
                 min_speech_s: float = MIN_SPEECH_S, max_span_s: float = MAX_PIECE_S) -> list[tuple[int, int]]:
    """Speech regions of ``audio`` (1-D float, ``sr`` Hz) as ``(start, end)`` sample indices, sorted and
    not overlapping; an empty list when there is no speech.

    ``threshold``: speech probability that starts a span (it ends below ``threshold - 0.15``);
    ``min_silence_s``: a pause at least this long ends a span; ``speech_pad_s``: padding on each side;
    ``min_speech_s``: shorter spans are dropped; ``max_span_s``: longer spans are cut.
    """
    return spans_from_probabilities(speech_probabilities(audio, sr), len(audio), sr, threshold=threshold,
                                    min_silence_s=min_silence_s, speech_pad_s=speech_pad_s,
                                    min_speech_s=min_speech_s, max_span_s=max_span_s)


class Piece(NamedTuple):
    """A stretch of a file: ``start``/``end`` in samples, whether it holds speech, and the speech spans
    inside it (``(start, end)`` samples, clipped to the piece; empty for a piece without speech)."""

    start: int
    end: int
    speech: bool
    spans: tuple[tuple[int, int], ...] = ()


def merge_spans(spans: list[tuple[int, int]], n_samples: int, sr: int = 16000, *, max_piece_s: float = MAX_PIECE_S,
                max_gap_s: float = MAX_GAP_S) -> list[tuple[int, int, bool]]:
    """Contiguous pieces covering ``[0, n_samples)``: runs of speech spans merged into pieces of at most
    ``max_piece_s`` whose spans are at most ``max_gap_s`` apart (flagged True), and the stretches
    between them (flagged False, of any length: they are not decoded). A span longer than
    ``max_piece_s`` is cut into equal parts."""
    return [p[:3] for p in merge_spans_with_spans(spans, n_samples, sr, max_piece_s=max_piece_s, max_gap_s=max_gap_s)]


def merge_spans_with_spans(spans: list[tuple[int, int]], n_samples: int, sr: int = 16000, *,
                           max_piece_s: float = MAX_PIECE_S, max_gap_s: float = MAX_GAP_S,
                           max_spans: int | None = None) -> list[Piece]:
    """:func:`merge_spans` as :class:`Piece` s that also name the speech spans each piece holds; with
    ``max_spans``, a piece holds at most that many spans (1: every span a piece of its own)."""
    max_piece, max_gap = int(max_piece_s * sr), int(max_gap_s * sr)
    groups: list[list] = []  # [start, end, [spans]]
    for start, end in spans:
        start, end = max(0, start), min(n_samples, end)
        if groups and start - groups[-1][1] <= max_gap and end - groups[-1][0] <= max_piece and \
                (max_spans is None or len(groups[-1][2]) < max_spans):
            groups[-1][1] = max(groups[-1][1], end)
            groups[-1][2].append((max(start, groups[-1][2][-1][1]), end))
        else:
            start = max(start, groups[-1][1]) if groups else start
            groups.append([start, end, [(start, end)]])
    pieces: list[Piece] = []
    position = 0
    for start, end, inner in groups:
        if end <= start:
            continue
        if start > position:
            pieces.append(Piece(position, start, False))
        n_parts = -(-(end - start) // max_piece)
        bounds = [start + (end - start) * k // n_parts for k in range(n_parts + 1)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            clipped = tuple((max(a, x), min(b, y)) for x, y in inner if min(b, y) > max(a, x))
            pieces.append(Piece(a, b, True, clipped))
        position = end
    if position < n_samples:
        pieces.append(Piece(position, n_samples, False))
    return pieces


def vad_pieces(audio: np.ndarray | torch.Tensor, max_piece_s: float = MAX_PIECE_S, *, sr: int = 16000,
               threshold: float = THRESHOLD, min_silence_s: float = MIN_SILENCE_S, speech_pad_s: float = SPEECH_PAD_S,
               min_speech_s: float = MIN_SPEECH_S, max_gap_s: float = MAX_GAP_S) -> list[tuple[int, int, bool]]:
    """``audio`` cut at speech boundaries into contiguous pieces ``(start, end, has_speech)`` in samples
    that cover it from 0 to ``len(audio)``; pieces with speech are at most ``max_piece_s`` long, pieces
    without speech are whatever lies between them (see :func:`merge_spans`). Audio without any
    speech is one piece flagged False."""
    return [p[:3] for p in speech_pieces(audio, max_piece_s, sr=sr, threshold=threshold, min_silence_s=min_silence_s,
                                         speech_pad_s=speech_pad_s, min_speech_s=min_speech_s, max_gap_s=max_gap_s)]


def speech_pieces(audio: np.ndarray | torch.Tensor, max_piece_s: float = MAX_PIECE_S, *, sr: int = 16000,
                  threshold: float = THRESHOLD, min_silence_s: float = MIN_SILENCE_S,
                  speech_pad_s: float = SPEECH_PAD_S, min_speech_s: float = MIN_SPEECH_S,
                  max_gap_s: float = MAX_GAP_S, max_spans: int | None = None) -> list[Piece]:
    """:func:`vad_pieces` as :class:`Piece` s, each with the speech spans inside it (at most ``max_spans``)."""
    spans = speech_spans(audio, sr, threshold=threshold, min_silence_s=min_silence_s, speech_pad_s=speech_pad_s,
                         min_speech_s=min_speech_s, max_span_s=max_piece_s)
    return merge_spans_with_spans(spans, len(audio), sr, max_piece_s=max_piece_s, max_gap_s=max_gap_s,
                                  max_spans=max_spans)
