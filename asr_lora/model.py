"""Load Whisper and its processor: bundled names resolved offline, language/task set for Korean.

The quantised loading and LoRA attachment for training build on these functions.
"""

from __future__ import annotations

from .bundled import resolve_model


def load_processor(name: str, language: str | None = "ko", task: str = "transcribe"):
    """``WhisperProcessor`` for ``name`` with the tokenizer's prefix set to language/task."""
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(resolve_model(name))
    processor.tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
    return processor


def load_model(name: str, device: str | None = None, dtype=None):
    """``WhisperForConditionalGeneration`` in eval mode (full precision unless ``dtype``)."""
    import torch
    from transformers import WhisperForConditionalGeneration

    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = WhisperForConditionalGeneration.from_pretrained(resolve_model(name), **kwargs)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()
