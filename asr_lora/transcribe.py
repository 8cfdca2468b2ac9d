"""Transcribe audio files with a Whisper model (files up to 30 s; greedy decoding).

Unreadable files are reported and skipped; the rest are still transcribed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .audio import AudioError, load_audio, log_mel_spectrogram
from .model import load_model, load_processor


def transcribe_arrays(model, processor, audios: list, language: str = "ko", max_new_tokens: int = 128) -> list[str]:
    """Greedy transcripts for a batch of 16 kHz mono float arrays (each at most 30 s)."""
    import torch

    device = next(model.parameters()).device
    features, _ = log_mel_spectrogram(audios, n_mels=model.config.num_mel_bins, padding="max_length", device=device)
    with torch.no_grad():
        ids = model.generate(
            features.to(model.dtype), language=language, task="transcribe", max_new_tokens=max_new_tokens
        )
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


def transcribe_paths(paths: list[str], model: str, language: str = "ko", batch_size: int = 8,
                     max_new_tokens: int = 128, out=None) -> list[tuple[str, str]]:
    """Print ``path<TAB>text`` per file (to ``out``, default stdout); return the (path, reason) failures."""
    out = out or sys.stdout
    whisper = load_model(model)
    processor = load_processor(model, language=language)
    failures: list[tuple[str, str]] = []
    loaded: list[tuple[str, object]] = []
    for path in paths:
        try:
            loaded.append((path, load_audio(Path(path))))
        except AudioError as e:
            failures.append((path, str(e)))
            print(f"skipped {path}: {e.reason}", file=sys.stderr)
    for start in range(0, len(loaded), batch_size):
        batch = loaded[start : start + batch_size]
        texts = transcribe_arrays(whisper, processor, [a for _, a in batch], language, max_new_tokens)
        for (path, _), text in zip(batch, texts):
            print(f"{path}\t{text}", file=out, flush=True)
    if failures:
        print(f"{len(failures)} of {len(paths)} file(s) failed", file=sys.stderr)
    return failures
