"""One loader for every way a model reaches inference: a base model, a LoRA adapter, a merged folder
or a CTranslate2 export. ``eval``, ``transcribe``, ``merge`` and ``export-ct2`` all load through here.

A checkpoint may carry ``asr_lora.json`` (``audio_context``, ``language``, ``task``, ``base_model``);
:func:`read_settings` reads it (falling back to the run's ``recipe.yaml``, then to Korean
transcription) and :func:`apply_settings` is the one place that applies a trimmed audio context.

Decoding is greedy with the language and task tokens forced, and bounded by ``max_new_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .audio import log_mel_spectrogram
from .errors import UserError
from .trimmed import AUDIO_CONTEXTS, COLLATOR_PADDING

SETTINGS_FILE = "asr_lora.json"
DEFAULT_MODEL = "bundled:whisper-base"
DEFAULT_LANGUAGE = "ko"
DEFAULT_MAX_NEW_TOKENS = 224  # half the decoder's 448 positions, openai/whisper's sample_len
CT2_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass
class ModelSettings:
    """How a checkpoint must be run: what ``asr_lora.json`` records (or the defaults)."""

    audio_context: str = "full"  # "full": 30 s windows; "trimmed": encoder sees only the clip's frames
    language: str = DEFAULT_LANGUAGE
    task: str = "transcribe"
    base_model: str | None = None
    source: str = "default"  # where these came from: a file path, or "default"

    def to_json(self) -> dict:
        """The ``asr_lora.json`` content (without ``source``)."""
        out = asdict(self)
        out.pop("source")
        return out


def read_settings(folder: str | Path | None) -> ModelSettings:
    """Settings of a checkpoint, merged or exported folder.

    ``folder/asr_lora.json`` when present; else the ``model`` section of the run's ``recipe.yaml``
    (in the checkpoint's parent folder) for language, task and base model; else Korean transcription
    with the full 30 s context. An unknown ``audio_context`` is an error, never ignored.
    """
    settings = ModelSettings()
    if folder is None or not Path(folder).is_dir():
        return settings
    folder = Path(folder)
    path = folder / SETTINGS_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        settings = ModelSettings(audio_context=data.get("audio_context") or "full",
                                 language=data.get("language") or DEFAULT_LANGUAGE,
                                 task=data.get("task") or "transcribe",
                                 base_model=data.get("base_model"), source=str(path))
    else:
        recipe = folder.parent / "recipe.yaml"
        if recipe.is_file():
            import yaml

            model = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("model") or {}
            settings = ModelSettings(language=model.get("language") or DEFAULT_LANGUAGE,
                                     task=model.get("task") or "transcribe", base_model=model.get("name"),
                                     source=str(recipe))
    if settings.audio_context not in AUDIO_CONTEXTS:
        raise UserError(f"{settings.source}: audio_context must be one of {', '.join(AUDIO_CONTEXTS)}, "
                        f"got {settings.audio_context!r}")
    return settings


def apply_settings(model, settings: ModelSettings) -> str:
    """Make ``model`` (Whisper or a peft wrapper of it) run as ``settings`` say; return the feature
    padding its encoder takes (``"max_length"``: 30 s windows, ``"longest"``: trimmed).

    The one place where inference applies the audio context (``apply_audio_context`` patches the
    encoder instance in place).
    """
    from .model import apply_audio_context

    apply_audio_context(model, settings.audio_context)
    return COLLATOR_PADDING[settings.audio_context]


class Transcriber(Protocol):
    """What eval and transcribe need from a model."""

    description: str
    settings: ModelSettings
    max_new_tokens: int

    def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        """Greedy transcripts of 16 kHz mono float32 clips, each at most 30 s."""


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise UserError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


class HFTranscriber:
    """A transformers Whisper (plain, merged, or base + LoRA adapter) decoding greedily."""

    def __init__(self, model, tokenizer, settings: ModelSettings, description: str,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.description = description
        self.max_new_tokens = max_new_tokens
        self.padding = apply_settings(model, settings)
        self.n_mels = self._whisper().config.num_mel_bins

    def _whisper(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def features(self, audios: list[np.ndarray]):
        """Log-mel features for the model: 30 s windows, or trimmed to the longest clip."""
        features, _ = log_mel_spectrogram(audios, n_mels=self.n_mels, padding=self.padding,
                                          pad_to_multiple_of=2 if self.padding == "longest" else None,
                                          device=self.device)
        return features.to(self.dtype)

    def encode(self, audios: list[np.ndarray]):
        """Encoder outputs. Generation is given these, never short ``input_features``: ``generate``
        zero-pads those to 3000 frames, which a trimmed-context encoder must not see."""
        import torch

        with torch.no_grad():
            return self.model.get_encoder()(self.features(audios))

    def generate_ids(self, audios: list[np.ndarray], encoded=None):
        """Greedy output ids (batch, tokens) including the forced prompt tokens."""
        import torch

        encoded = encoded if encoded is not None else self.encode(audios)
        with torch.no_grad():
            out = self.model.generate(encoder_outputs=encoded, language=self.settings.language,
                                      task=self.settings.task, max_new_tokens=self.max_new_tokens,
                                      num_beams=1, do_sample=False, return_dict_in_generate=True)
        return out.sequences

    def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        if not audios:
            return []
        ids = self.generate_ids(audios)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class CT2Transcriber:
    """A CTranslate2 Whisper export decoding greedily with the language/task prompt forced."""

    def __init__(self, folder: Path, settings: ModelSettings, device: str | None = None,
                 compute_type: str = "default", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        import ctranslate2
        from tokenizers import Tokenizer

        self.folder = folder
        self.settings = settings
        self.max_new_tokens = max_new_tokens
        self.description = f"ct2:{folder}"
        self.model = ctranslate2.models.Whisper(str(folder), device=_device(device), compute_type=compute_type)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.n_mels = self.model.n_mels
        # CTranslate2 takes mel input shorter than 3000 frames (its encoder uses the first positions),
        # so a trimmed-context model runs trimmed here with no patching.
        self.padding = COLLATOR_PADDING[settings.audio_context]
        tokens = ["<|startoftranscript|>", f"<|{settings.language}|>", f"<|{settings.task}|>", "<|notimestamps|>"]
        self.prompt = [self.tokenizer.token_to_id(t) for t in tokens]
        missing = [t for t, i in zip(tokens, self.prompt) if i is None]
        if missing:
            raise UserError(f"{folder}/tokenizer.json has no token(s) {', '.join(missing)}; check --language")

    def features(self, audios: list[np.ndarray]) -> np.ndarray:
        features, _ = log_mel_spectrogram(audios, n_mels=self.n_mels, padding=self.padding,
                                          pad_to_multiple_of=2 if self.padding == "longest" else None)
        return np.ascontiguousarray(features.numpy())

    def generate_ids(self, audios: list[np.ndarray]) -> list[list[int]]:
        """Greedy output ids per clip, without the prompt."""
        import ctranslate2

        features = ctranslate2.StorageView.from_array(self.features(audios))
        # CTranslate2's Whisper decodes at most max_length / 2 tokens (openai's sample_len rule), and
        # fewer for max_length < 6 (measured with 4.8); ask for a little more and cut to the cap.
        results = self.model.generate(features, [self.prompt] * len(audios), beam_size=1,
                                      max_length=2 * max(self.max_new_tokens, 4), suppress_blank=True,
                                      suppress_tokens=[-1])
        return [r.sequences_ids[0][: self.max_new_tokens] for r in results]

    def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        if not audios:
            return []
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in self.generate_ids(audios)]


def check_merged_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    if (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder} is a LoRA adapter; use --adapter, or merge it first with 'asr-lora merge'")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; is this a merged model folder?")


def _check_ct2(folder: Path) -> None:
    missing = [name for name in CT2_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder}: missing {', '.join(missing)}; is this a CTranslate2 export "
                        "('asr-lora export-ct2')?")


def load_hf(model: str | None = None, adapter: str | Path | None = None, merged: str | Path | None = None,
            *, dtype=None, device: str | None = None):
    """``(whisper_or_peft_model, processor, settings)`` for one HF source, in eval mode.

    Adapters load on an unquantised fp32 base (then cast to ``dtype``), never 8-/4-bit.
    """
    from .model import adapter_base_name, load_adapter_model, load_model, load_processor

    dtype = _torch_dtype(dtype)
    if adapter is not None:
        adapter = Path(adapter)
        settings = read_settings(adapter)
        base = adapter_base_name(adapter)
        hf = load_adapter_model(adapter, quant="none")
        hf = hf.to(device=_device(device), dtype=dtype) if dtype is not None else hf.to(_device(device))
        settings.base_model = settings.base_model or base
        processor = load_processor(base, language=settings.language, task=settings.task)
        return hf.eval(), processor, settings
    if merged is not None:
        check_merged_folder(Path(merged))
        name = str(merged)
    else:
        name = model
    settings = read_settings(Path(name)) if Path(name).is_dir() else ModelSettings()
    hf = load_model(name, device=_device(device), dtype=dtype)
    processor = load_processor(name, language=settings.language, task=settings.task)
    return hf, processor, settings


def load_transcriber(model: str | None = None, adapter: str | Path | None = None, merged: str | Path | None = None,
                     ct2: str | Path | None = None, *, language: str | None = None,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, device: str | None = None,
                     dtype=None, compute_type: str = "default") -> HFTranscriber | CT2Transcriber:
    """A transcriber for exactly one of ``model`` (name or folder), ``adapter`` (LoRA checkpoint folder,
    no merge needed), ``merged`` (``asr-lora merge`` output) or ``ct2`` (``asr-lora export-ct2`` output).

    ``language`` overrides the checkpoint's recorded language (default Korean); it is always forced.
    """
    given = {k: v for k, v in (("model", model), ("adapter", adapter), ("merged", merged), ("ct2", ct2))
             if v is not None}
    if len(given) != 1:
        raise UserError(f"give exactly one of --model, --adapter, --merged, --ct2 (got {', '.join(given) or 'none'})")
    if max_new_tokens < 1 or max_new_tokens > 444:
        raise UserError(f"max_new_tokens must be in 1..444 (Whisper's decoder has 448 positions), got {max_new_tokens}")
    (kind, source), = given.items()
    if kind == "ct2":
        folder = Path(ct2)
        _check_ct2(folder)
        settings = read_settings(folder)
        if language:
            settings.language = language
        return CT2Transcriber(folder, settings, device=device, compute_type=compute_type,
                              max_new_tokens=max_new_tokens)
    hf, processor, settings = load_hf(model, adapter, merged, dtype=dtype, device=device)
    if language:
        settings.language = language
    return HFTranscriber(hf, processor.tokenizer, settings, f"{kind}:{source}", max_new_tokens=max_new_tokens)
