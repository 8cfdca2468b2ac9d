"""``asr-lora info``: the resolved base model, the device, package versions."""

from __future__ import annotations

import importlib.metadata
import platform

from . import __version__
from .bundled import bundled_path, cache_dir, is_bundled, resolve_model

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "librosa", "jiwer",
            "ctranslate2")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda x{len(names)} ({', '.join(names)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def collect_info(model: str, build: bool = True) -> dict:
    """Everything ``asr-lora info`` prints, as a dict."""
    model_info: dict = {"name": model}
    if is_bundled(model):
        path = bundled_path(model)
        model_info["built_now"] = build and not path.is_dir()
        model_info["path"] = resolve_model(model) if build else str(path)
        model_info["exists"] = path.is_dir()
    else:
        model_info["path"] = model
    if model_info.get("exists", True):
        try:
            from transformers import WhisperConfig

            cfg = WhisperConfig.from_pretrained(model_info["path"])
            model_info["num_mel_bins"] = cfg.num_mel_bins
            model_info["layers"] = f"{cfg.encoder_layers} encoder + {cfg.decoder_layers} decoder, d_model {cfg.d_model}"
            model_info["parameters"] = _parameter_count(cfg)
        except OSError:
            pass
    return {
        "asr_lora": __version__,
        "model": model_info,
        "cache_dir": str(cache_dir()),
        "device": device_description(),
        "python": platform.python_version(),
        "packages": package_versions(),
    }


def _parameter_count(cfg) -> str:
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        n = sum(p.numel() for p in WhisperForConditionalGeneration(cfg).parameters())
    return f"{n / 1e6:.1f}M"
