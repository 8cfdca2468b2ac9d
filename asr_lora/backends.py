"""Transcribers: the one decode path for every model that reaches inference.

A transformers Whisper (base, merged, or base + LoRA adapter) or a CTranslate2 export, decoding
with the language and task forced and a cap on new tokens, as :class:`DecodeOptions` say. In-training
evaluation, ``asr-lora eval``, ``transcribe``, the parity checks of merge/export and the server all
decode through :meth:`HFTranscriber.decode` / :meth:`CT2Transcriber.decode`, so the dev CER in
``metrics.jsonl`` and ``asr-lora eval`` of the same checkpoint on the same rows agree by construction.
Which model a source names, and how it loads, is :mod:`asr_lora.sources`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .audio import log_mel_spectrogram
from .defaults import MAX_DECODER_TOKENS, TRANSCRIBE_MAX_NEW_TOKENS
from .errors import UserError
from .settings import ModelSettings
from .trimmed import audio_context_of, feature_padding

PROMPT_LENGTH = 4  # <|startoftranscript|><|lang|><|task|><|notimestamps|>


@dataclass
class DecodeOptions:
    """How to decode: forced language/task (None: the checkpoint's), cap, beams, reference bound."""

    language: str | None = None
    task: str | None = None
    max_new_tokens: int = TRANSCRIBE_MAX_NEW_TOKENS
    num_beams: int = 1
    # Scoring only: cap each batch at 2 x its longest reference + 8 tokens. A hypothesis twice as long
    # as its reference is already all errors, and the bound stops untuned or 8-bit models from looping
    # to the cap.
    bound_by_reference: bool = False

    def __post_init__(self):
        if not 1 <= self.max_new_tokens <= MAX_DECODER_TOKENS:
            raise UserError(f"max_new_tokens must be in 1..{MAX_DECODER_TOKENS} (Whisper's decoder has 448 "
                            f"positions), got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise UserError(f"num_beams must be at least 1, got {self.num_beams}")


class Transcriber(Protocol):
    """What eval, transcribe and serve need from a model."""

    description: str
    settings: ModelSettings
    options: DecodeOptions

    def decode(self, audios: list[np.ndarray], references: list[str] | None = None,
               on_encoded: Callable | None = None) -> list[str]:
        """Transcripts of 16 kHz mono float32 clips, each at most 30 s."""

    def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        """Transcripts of 16 kHz mono float32 clips, each at most 30 s."""


class _Decoding:
    """What both transcribers share: the resolved language/task, features, the cap."""

    def _setup(self, settings: ModelSettings, options: DecodeOptions | None, description: str) -> None:
        self.settings = settings
        self.options = options or DecodeOptions()
        self.description = description
        self.language = self.options.language or settings.language
        self.task = self.options.task or settings.task
        self.padding, self.pad_to_multiple_of = feature_padding(settings.audio_context)

    def _features(self, audios: list[np.ndarray], device=None):
        features, _ = log_mel_spectrogram(audios, n_mels=self.n_mels, padding=self.padding,
                                          pad_to_multiple_of=self.pad_to_multiple_of, device=device)
        return features

    def cap(self, references: list[str] | None = None) -> int:
        """New-token cap of a batch: the options' cap, bounded by the references when scoring."""
        cap = self.options.max_new_tokens
        if self.options.bound_by_reference and references:
            longest = max(self.count_tokens(r) for r in references) + PROMPT_LENGTH  # labels: 3 prompt + eot
            cap = min(cap, 2 * longest + 8)
        return cap

    def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        return self.decode(audios) if audios else []


class HFTranscriber(_Decoding):
    """A transformers Whisper (plain, merged, or base + LoRA adapter) already in its audio context."""

    def __init__(self, model, tokenizer, settings: ModelSettings, options: DecodeOptions | None = None,
                 description: str = "model"):
        if audio_context_of(model) != settings.audio_context:
            raise ValueError(f"{description}: the model's encoder is in the {audio_context_of(model)!r} audio "
                             f"context, its settings say {settings.audio_context!r}")
        self.model = model
        self.tokenizer = tokenizer
        self._setup(settings, options, description)
        whisper = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.n_mels = whisper.config.num_mel_bins

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text.strip(), add_special_tokens=False))

    def features(self, audios: list[np.ndarray]):
        """Log-mel features for the model: 30 s windows, or trimmed to the longest clip."""
        dtype = self.dtype
        return self._features(audios, self.device).to(dtype)

    def encode(self, audios: list[np.ndarray]):
        """Encoder outputs. Generation is given these, never short ``input_features``: ``generate``
        zero-pads those to 3000 frames, which a trimmed-context encoder must not see."""
        import torch

        with torch.no_grad():
            return self.model.get_encoder()(self.features(audios))

    def generate_ids(self, audios: list[np.ndarray], encoded=None, cap: int | None = None):
        """Output ids (batch, tokens) including the forced prompt tokens."""
        import torch

        encoded = encoded if encoded is not None else self.encode(audios)
        with torch.no_grad():
            out = self.model.generate(encoder_outputs=encoded, language=self.language, task=self.task,
                                      max_new_tokens=cap or self.options.max_new_tokens,
                                      num_beams=self.options.num_beams, do_sample=False, use_cache=True,
                                      return_dict_in_generate=True)
        return out.sequences

    def decode(self, audios: list[np.ndarray], references: list[str] | None = None,
               on_encoded: Callable | None = None) -> list[str]:
        """Transcripts; ``on_encoded(encoder_outputs)`` lets a caller reuse the encoder pass (the
        teacher-forced dev loss in training)."""
        encoded = self.encode(audios)
        if on_encoded is not None:
            on_encoded(encoded)
        ids = self.generate_ids(audios, encoded, self.cap(references))
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class CT2Transcriber(_Decoding):
    """A CTranslate2 Whisper export with the language/task prompt forced."""

    def __init__(self, folder: Path, settings: ModelSettings, options: DecodeOptions | None = None,
                 device: str | None = None, compute_type: str = "default"):
        import ctranslate2
        from tokenizers import Tokenizer

        self.folder = folder
        self._setup(settings, options, f"ct2:{folder}")
        self.model = ctranslate2.models.Whisper(str(folder), device=torch_device(device), compute_type=compute_type)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.n_mels = self.model.n_mels
        # CTranslate2 takes mel input shorter than 3000 frames (its encoder uses the first positions),
        # so a trimmed-context model runs trimmed here with no patching.
        tokens = ["<|startoftranscript|>", f"<|{self.language}|>", f"<|{self.task}|>", "<|notimestamps|>"]
        self.prompt = [self.tokenizer.token_to_id(t) for t in tokens]
        missing = [t for t, i in zip(tokens, self.prompt) if i is None]
        if missing:
            raise UserError(f"{folder}/tokenizer.json has no token(s) {', '.join(missing)}; check --language")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text.strip(), add_special_tokens=False).ids)

    def features(self, audios: list[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(self._features(audios).numpy())

    def generate_ids(self, audios: list[np.ndarray], cap: int | None = None) -> list[list[int]]:
        """Output ids per clip, without the prompt."""
        import ctranslate2

        cap = cap or self.options.max_new_tokens
        features = ctranslate2.StorageView.from_array(self.features(audios))
        # CTranslate2's Whisper decodes at most max_length / 2 tokens (openai's sample_len rule), and
        # fewer for max_length < 6 (measured with 4.8); ask for a little more and cut to the cap.
        results = self.model.generate(features, [self.prompt] * len(audios), beam_size=self.options.num_beams,
                                      max_length=2 * max(cap, 4), suppress_blank=True, suppress_tokens=[-1])
        return [r.sequences_ids[0][:cap] for r in results]

    def decode(self, audios: list[np.ndarray], references: list[str] | None = None,
               on_encoded: Callable | None = None) -> list[str]:
        if on_encoded is not None:
            raise ValueError("a CTranslate2 model exposes no encoder outputs (no teacher-forced loss)")
        ids = self.generate_ids(audios, self.cap(references))
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def torch_device(device: str | None) -> str:
    """``device``, else "cuda" when there is a GPU, else "cpu"."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")
