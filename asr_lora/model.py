"""Load Whisper and its processor; load the frozen base for training (fp32, 8-bit or 4-bit nf4) and
attach LoRA adapters with peft; reload a saved adapter for evaluation.

bitsandbytes on CPU (checked with bitsandbytes 0.50, transformers 5.23): bitsandbytes has CPU
kernels for ``Linear8bitLt`` and ``Linear4bit`` (``bnb.supported_torch_devices`` includes "cpu"),
and transformers' bitsandbytes quantizers accept a CPU-only machine: ``validate_environment`` only
asks that one available device be supported by bitsandbytes, and ``update_device_map`` turns
``device_map=None`` into ``{"": "cpu"}`` when no accelerator is present. So quantised training runs
on CPU unchanged (slowly; 8-bit casts activations to fp16 for the int8 matmul). Mixing "cpu" with a
GPU in one device map is refused unless ``llm_int8_enable_fp32_cpu_offload``; we never do that.

Nothing executable is loaded: weights come from safetensors only (a pickle ``pytorch_model.bin`` or
``adapter_model.bin`` is refused unless ``allow_pickle``, the recipe's ``model.allow_pickle``), and
``trust_remote_code`` is never set. A saved adapter is checked against the base it is put on (the
recorded base name, and the LoRA shapes read from the safetensors header) before any weight loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from .bundled import resolve_model
from .errors import UserError
from .settings import read_settings
from .trimmed import apply_audio_context

Quant = Literal["none", "8bit", "4bit"]
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_PICKLE = "adapter_model.bin"
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def weights_kwargs(name: str, allow_pickle: bool = False) -> dict:
    """``from_pretrained`` keyword arguments that keep pickles out unless ``allow_pickle``.

    A local folder whose only weights are a pickle is refused here with a message naming the file;
    for anything else ``use_safetensors=True`` makes transformers refuse a pickle. With
    ``allow_pickle`` transformers still prefers safetensors and reads a pickle with
    ``torch.load(weights_only=True)``.
    """
    if allow_pickle:
        return {}
    folder = Path(name)
    if folder.is_dir() and not any((folder / f).is_file() for f in SAFE_WEIGHTS):
        pickles = [f for f in PICKLE_WEIGHTS if (folder / f).is_file()]
        if pickles:
            raise UserError(f"{folder / pickles[0]} is a pickle checkpoint (loading one can run code) and there is "
                            "no model.safetensors; convert it to safetensors, or set model.allow_pickle=true "
                            "if you trust the file")
        raise UserError(f"{folder}: no model.safetensors; is this a Whisper model folder?")
    return {"use_safetensors": True}


def load_processor(name: str, language: str | None = "ko", task: str = "transcribe"):
    """``WhisperProcessor`` for ``name`` with the tokenizer's prefix set to language/task."""
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(resolve_model(name))
    processor.tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
    return processor


def torch_dtype(dtype):
    """A ``torch.dtype`` from its name ("float32", "float16", "bfloat16"); None and dtypes pass through."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise UserError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


def load_model(name: str, device: str | None = None, dtype=None, allow_pickle: bool = False):
    """``WhisperForConditionalGeneration`` in eval mode (full precision unless ``dtype``; safetensors
    weights only unless ``allow_pickle``), in the audio context its folder's settings record."""
    import torch
    from transformers import WhisperForConditionalGeneration

    path = resolve_model(name)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = WhisperForConditionalGeneration.from_pretrained(path, **kwargs, **weights_kwargs(path, allow_pickle))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    apply_audio_context(model, read_settings(name if Path(name).is_dir() else None).audio_context)
    return model.to(device).eval()


# --------------------------------------------------------------------------- training base


def _targets_gpu(device_map) -> bool:
    """Whether ``device_map`` (None: the default device) places the model on a CUDA GPU."""
    import torch

    if device_map is None:
        return torch.cuda.is_available()
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(isinstance(v, int) or str(v).startswith("cuda") for v in values)


def quantization_config(quant: Quant, compute_dtype=None, on_gpu: bool = False):
    """``BitsAndBytesConfig`` for ``quant`` (None for "none"). 4-bit is nf4 with double quantisation,
    computing in ``compute_dtype`` (default: bf16 on a GPU with native bf16, fp16 on older GPUs, fp32 on CPU)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quant == "none":
        return None
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "4bit":
        if compute_dtype is None:
            if not on_gpu:
                compute_dtype = torch.float32
            else:
                compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    raise UserError(f"model.quant must be one of none, 8bit, 4bit; got {quant!r}")


def load_base_for_training(name: str, quant: Quant = "none", device_map=None, compute_dtype=None,
                           allow_pickle: bool = False):
    """The frozen-to-be base Whisper: fp32 weights, or bitsandbytes 8-bit / 4-bit (nf4) linear layers.

    ``device_map={"": local_rank}`` puts the whole model on one GPU per DDP process; None lets
    transformers pick (the current GPU for quantised models, else CPU). Non-quantised tensors
    (embeddings, convolutions, layer norms, ``proj_out``) are loaded in fp32 whatever the checkpoint
    stores, so hub checkpoints saved in fp16 train the same way. Safetensors only unless ``allow_pickle``.
    """
    import torch
    from transformers import WhisperForConditionalGeneration

    qconfig = quantization_config(quant, compute_dtype, on_gpu=_targets_gpu(device_map))
    kwargs = {"device_map": device_map} if device_map is not None else {}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    path = resolve_model(name)
    return WhisperForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", **kwargs, **weights_kwargs(path, allow_pickle)
    )


def prepare_for_training(model, quant: Quant, gradient_checkpointing: bool):
    """Freeze the base and switch on non-reentrant gradient checkpointing if asked.

    Quantised bases go through peft's ``prepare_model_for_kbit_training`` (freezes, upcasts stray
    fp16/bf16 tensors to fp32). Non-reentrant checkpointing needs no ``enable_input_require_grads``
    hack: gradients reach the LoRA weights inside checkpointed layers even though the input features
    and the frozen conv stem do not require grad.
    """
    ckpt_kwargs = {"use_reentrant": False}
    if quant != "none":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    model.requires_grad_(False)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # newer 5.x (not 5.0); the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    return model


# --------------------------------------------------------------------------- LoRA


def attach_lora(model, lora_cfg):
    """Wrap ``model`` in a ``PeftModel`` with LoRA on ``lora_cfg.target_modules``; only LoRA trains.

    No ``task_type``: peft's ``SEQ_2_SEQ_LM`` wrapper passes ``input_ids`` to the base model and
    Whisper's forward fails with "got multiple values for keyword argument 'input_ids'"; the plain
    ``PeftModel`` passes every keyword through and still exposes ``generate``.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                            target_modules=list(lora_cfg.target_modules), bias="none")
    return get_peft_model(model, config)


def _numel(param) -> int:
    """Logical element count: bitsandbytes ``Params4bit`` packs two 4-bit values per byte."""
    n = param.numel()
    if param.__class__.__name__ == "Params4bit":
        n *= 2 * param.element_size()
    return n


def trainable_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, tied weights counted once, 4-bit weights unpacked."""
    trainable = total = 0
    for param in model.parameters():
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def build_training_model(model_cfg, lora_cfg, device_map=None):
    """Base (fp32/8-bit/4-bit) + training preparation + LoRA, ready for an optimizer.

    The KV cache is off for training. Generation forces ``model_cfg.language``/``task`` through the
    generation config's ``language``/``task`` fields, never the deprecated ``forced_decoder_ids``.
    The adapter config records ``model_cfg.name`` (e.g. ``bundled:whisper-base``), not the machine's
    resolved cache folder, so a saved adapter finds its base on any machine.
    """
    model = load_base_for_training(model_cfg.name, model_cfg.quant, device_map=device_map,
                                   allow_pickle=getattr(model_cfg, "allow_pickle", False))
    model = prepare_for_training(model, model_cfg.quant, model_cfg.gradient_checkpointing)
    model.config.use_cache = False
    gen = model.generation_config
    gen.forced_decoder_ids = None
    gen.language, gen.task = model_cfg.language, model_cfg.task
    peft_model = attach_lora(model, lora_cfg)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = model_cfg.name
    return peft_model


# --------------------------------------------------------------------------- saved adapters


def adapter_base_name(adapter_dir: str | Path) -> str:
    """The base model recorded in a saved adapter's ``adapter_config.json``."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except FileNotFoundError:
        if not Path(adapter_dir).exists():
            raise UserError(f"{adapter_dir}: no such folder") from None
        raise UserError(f"{adapter_dir}: no {ADAPTER_CONFIG}; is this a LoRA adapter folder?") from None
    if not name:
        raise UserError(f"{path}: base_model_name_or_path is empty; pass the base model explicitly")
    return name


def _same_model(a: str, b: str) -> bool:
    """Whether two model names denote the same model: equal, or resolving to the same local folder."""
    if a == b:
        return True
    try:
        pa, pb = Path(resolve_model(a)), Path(resolve_model(b))
        return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()
    except UserError:
        return False


def check_adapter_matches_base(adapter_dir: str | Path, base: str) -> None:
    """Refuse an adapter that was not trained on ``base``, before any weight is loaded.

    Two checks: the adapter config's ``base_model_name_or_path`` denotes ``base``; and every LoRA
    tensor's shape, read from the safetensors header alone, fits its target module in ``base``
    (built on the meta device from its config: no weights). Errors name both models.
    """
    import torch
    from safetensors import safe_open
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    adapter_dir = Path(adapter_dir)
    recorded = adapter_base_name(adapter_dir)
    if not _same_model(recorded, base):
        raise UserError(f"{adapter_dir} was trained on base model {recorded!r}, not {base!r}; load it on its "
                        f"own base (leave the base out), or on a copy of that model")
    config = WhisperConfig.from_pretrained(resolve_model(base))
    with torch.device("meta"):
        modules = dict(WhisperForConditionalGeneration(config).named_modules())
    weights = adapter_dir / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise UserError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    for key, shape in shapes.items():
        for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not key.endswith(part):
                continue
            name = key[: -len(part)].removeprefix("base_model.model.")
            module = modules.get(name)
            want = getattr(module, "in_features" if dim else "out_features", None)
            if module is None or len(shape) != 2 or shape[dim] != want:
                got = "no such module" if module is None else f"{'in' if dim else 'out'}_features {want}"
                raise UserError(f"{adapter_dir} does not fit base model {base!r} (adapter trained on {recorded!r}): "
                                f"{key} has shape {list(shape)}, the base's {name} has {got}")


def load_adapter_model(adapter_dir: str | Path, base: str | None = None, quant: Quant = "none", device_map=None,
                       allow_pickle: bool = False):
    """Base + saved LoRA adapter (safetensors unless ``allow_pickle``), frozen and in eval mode.

    ``base`` defaults to the adapter config's ``base_model_name_or_path``; an adapter that does
    not match it is refused before loading (:func:`check_adapter_matches_base`). An unquantised
    model with no ``device_map`` goes to the GPU when there is one (as :func:`load_model` does).
    """
    import torch
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    name = base or adapter_base_name(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        if not (allow_pickle and (adapter_dir / ADAPTER_PICKLE).is_file()):
            raise UserError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded; "
                            f"{ADAPTER_PICKLE} is a pickle, which can run code)")
        if not _same_model(adapter_base_name(adapter_dir), name):
            raise UserError(f"{adapter_dir} was trained on base model {adapter_base_name(adapter_dir)!r}, not {name!r}")
    else:
        check_adapter_matches_base(adapter_dir, name)
    model = load_base_for_training(name, quant, device_map=device_map, allow_pickle=allow_pickle)
    if quant == "none" and device_map is None:
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    apply_audio_context(model, read_settings(adapter_dir).audio_context)  # as trained (its settings file)
    return model.eval()
