"""Model sources: which model a command runs, and the one registry of how each kind loads.

A :class:`ModelSource` is a kind and a path: ``model`` (a base model name or folder, e.g.
``bundled:whisper-base``), ``adapter`` (a LoRA checkpoint folder, no merge needed), ``merged`` (an
``asr-lora merge`` folder) or ``ct2`` (an ``asr-lora export-ct2`` folder). :data:`KINDS` says, per
kind, its command-line flag, how to check a path before anything heavy loads, and how to load it;
the CLI (``eval``, ``transcribe``, ``serve``), merge and export all go through here, and a new kind
joins with one entry.

Nothing heavy is imported at module level: the CLI builds its flags from :data:`KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .defaults import DEFAULT_MODEL
from .errors import UserError

CT2_FILES = ("model.bin", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # a key of KINDS
    path: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"unknown model source kind {self.kind!r}; one of {', '.join(KINDS)}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"

    def check(self) -> None:
        """Refuse a path that is not this kind of model, before anything heavy loads."""
        KINDS[self.kind].check(Path(self.path))

    def settings(self):
        """The source's ``ModelSettings`` (:func:`asr_lora.settings.read_settings`)."""
        from .settings import read_settings

        path = Path(self.path)
        return read_settings(path if path.is_dir() else None)


@dataclass(frozen=True)
class SourceKind:
    flag: str  # the command-line flag
    metavar: str
    help: str
    check: Callable[[Path], None]
    hf: bool  # loads as a transformers model (else: its own runtime)


def _check_nothing(path: Path) -> None:
    pass


def _check_adapter(path: Path) -> None:
    from .model import ADAPTER_CONFIG

    if not path.is_dir():
        raise UserError(f"{path}: no such folder")
    if not (path / ADAPTER_CONFIG).is_file():
        raise UserError(f"{path}: no {ADAPTER_CONFIG}; is this a LoRA adapter folder?")


def _check_merged(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"{path}: not a folder")
    if (path / "adapter_config.json").is_file():
        raise UserError(f"{path} is a LoRA adapter; use --adapter, or merge it first with 'asr-lora merge'")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json; is this a merged model folder?")


def _check_ct2(path: Path) -> None:
    missing = [name for name in CT2_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}; is this a CTranslate2 export ('asr-lora export-ct2')?")


KINDS: dict[str, SourceKind] = {
    "model": SourceKind("--model", "NAME", f"base model name or folder (default: {DEFAULT_MODEL})", _check_nothing, True),
    "adapter": SourceKind("--adapter", "DIR", "LoRA checkpoint folder (no merge needed)", _check_adapter, True),
    "merged": SourceKind("--merged", "DIR", "folder written by 'asr-lora merge'", _check_merged, True),
    "ct2": SourceKind("--ct2", "DIR", "folder written by 'asr-lora export-ct2'", _check_ct2, False),
}


def add_source_arguments(parser) -> None:
    """The mutually exclusive ``--model/--adapter/--merged/--ct2`` flags, one per kind."""
    group = parser.add_mutually_exclusive_group()
    for kind, spec in KINDS.items():
        group.add_argument(spec.flag, dest=f"source_{kind}", default=None, metavar=spec.metavar, help=spec.help)


def source_from_args(args) -> ModelSource:
    """The source named by :func:`add_source_arguments`' flags; the bundled base when none is."""
    given = [(kind, getattr(args, f"source_{kind}")) for kind in KINDS if getattr(args, f"source_{kind}", None)]
    if len(given) > 1:
        raise UserError(f"give one of {', '.join(s.flag for s in KINDS.values())}, not {len(given)}")
    kind, path = given[0] if given else ("model", DEFAULT_MODEL)
    return ModelSource(kind, str(path))


def load_hf(source: ModelSource, *, dtype=None, device: str | None = None):
    """``(model, processor, settings)`` of an HF source in eval mode, in its recorded audio context
    (applied by the loaders of :mod:`asr_lora.model`). Adapters load on an unquantised fp32 base (then cast to ``dtype``), never 8-/4-bit.
    """
    from .backends import torch_device
    from .model import adapter_base_name, load_adapter_model, load_model, load_processor, torch_dtype

    if not KINDS[source.kind].hf:
        raise UserError(f"{source} is not a transformers model")
    source.check()
    dtype = torch_dtype(dtype)
    settings = source.settings()
    if source.kind == "adapter":
        base = adapter_base_name(source.path)
        model = load_adapter_model(source.path, quant="none")
        model = model.to(device=torch_device(device), dtype=dtype) if dtype is not None else model.to(torch_device(device))
        settings.base_model = settings.base_model or base
        name = base
    else:
        model = load_model(source.path, device=torch_device(device), dtype=dtype)
        name = source.path
    processor = load_processor(name, language=settings.language, task=settings.task)
    return model.eval(), processor, settings


def load_transcriber(source: ModelSource, options=None, *, device: str | None = None, dtype=None,
                     compute_type: str = "default"):
    """A transcriber (:mod:`asr_lora.backends`) for ``source``, decoding as ``options`` say."""
    from .backends import CT2Transcriber, DecodeOptions, HFTranscriber, column_major_decoder

    options = options or DecodeOptions()
    if source.kind == "ct2":
        source.check()
        return CT2Transcriber(Path(source.path), source.settings(), options, device=device, compute_type=compute_type)
    model, processor, settings = load_hf(source, dtype=dtype, device=device)
    column_major_decoder(model)  # decoding only from here on
    return HFTranscriber(model, processor.tokenizer, settings, options, str(source))
