"""CTranslate2 Whisper folder -> Hugging Face ``WhisperForConditionalGeneration`` (safetensors).

Reads ``model.bin`` (CTranslate2 binary format, version 6), ``config.json``, ``tokenizer.json`` and
``vocabulary.txt`` and writes a folder that ``WhisperForConditionalGeneration.from_pretrained`` and
``WhisperProcessor.from_pretrained`` load offline. Nothing here executes code from the input: the
binary is parsed field by field and the JSON files are plain data.

CTranslate2 layout, per layer (its Whisper spec):
  ``self_attention/linear_0`` = q;k;v stacked on dim 0, ``self_attention/linear_1`` = out;
  decoder cross attention ``attention/linear_0`` = q, ``linear_1`` = k;v, ``linear_2`` = out;
  ``ffn/linear_0`` = fc1, ``ffn/linear_1`` = fc2; layer norms hold ``gamma``/``beta``.
The k projection bias is stored as zeros in CTranslate2 and does not exist in Hugging Face.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .errors import UserError

CT2_BINARY_VERSION = 6
# CTranslate2 DataType enum -> numpy dtype (bfloat16 is read as raw uint16 and widened).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_GELU = 3
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps
TIME_PRECISION = 0.02
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")


class ConversionError(UserError, ValueError):
    """The CTranslate2 folder is not a Whisper model this converter understands."""


@dataclass
class CT2Model:
    """Parsed ``model.bin``: spec name, revision, variables (aliases resolved)."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]


class _Reader:
    def __init__(self, fh: BinaryIO, source: Path):
        self.fh = fh
        self.source = source

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise ConversionError(f"{self.source}: truncated CTranslate2 model (wanted {n} more bytes)")
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (length,) = self.unpack("H")
        return self.read(length)[:-1].decode("utf-8")


def read_ct2_model(path: Path) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` into numpy arrays."""
    path = Path(path)
    with open(path, "rb") as fh:
        r = _Reader(fh, path)
        (version,) = r.unpack("I")
        if version != CT2_BINARY_VERSION:
            raise ConversionError(f"{path}: CTranslate2 binary version {version}, expected {CT2_BINARY_VERSION}")
        spec = r.string()
        (revision,) = r.unpack("I")
        (n_variables,) = r.unpack("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(n_variables):
            name = r.string()
            (rank,) = r.unpack("B")
            dims = r.unpack("I" * rank) if rank else ()
            (dtype_id,) = r.unpack("B")
            (nbytes,) = r.unpack("I")
            raw = r.read(nbytes)
            dtype = _CT2_DTYPES.get(dtype_id)
            if dtype is None:
                raise ConversionError(f"{path}: variable {name} has unsupported dtype id {dtype_id}")
            if dtype == "bfloat16":
                bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                array = bits.view(np.float32)
            else:
                array = np.frombuffer(raw, dtype=dtype)
            variables[name] = array.reshape(dims)
        (n_aliases,) = r.unpack("I")
        for _ in range(n_aliases):
            alias, target = r.string(), r.string()
            variables[alias] = variables[target]
    if spec != "WhisperSpec":
        raise ConversionError(f"{path}: spec {spec!r} is not a Whisper model")
    return CT2Model(spec=spec, revision=revision, variables=variables)


def _weight(v: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    """A linear weight as float32, dequantising int8/int16 weights with their ``weight_scale``."""
    w = v[f"{prefix}/weight"]
    if w.dtype.kind == "i":
        scale = v.get(f"{prefix}/weight_scale")
        if scale is None:
            raise ConversionError(f"{prefix}: integer weight without weight_scale")
        scale = np.asarray(scale, dtype=np.float32)
        return w.astype(np.float32) / (scale.reshape(-1, 1) if scale.ndim else scale)
    return w.astype(np.float32)


def _count_layers(v: dict[str, np.ndarray], stack: str) -> int:
    # `encoder/layer_norm` also starts with `encoder/layer_`: match digits only.
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for name in v if (m := pattern.match(name)))


def _scalar(v: dict[str, np.ndarray], name: str, default: int) -> int:
    return int(v[name]) if name in v else default


def _attention(v, src: str, dst: str, *, fused_kv_only: bool = False) -> dict[str, np.ndarray]:
    """Split CT2 fused attention projections into HF q/k/v/out."""
    out = {}
    if fused_kv_only:  # cross attention: linear_0 = q, linear_1 = k;v, linear_2 = out
        q_w, q_b = _weight(v, f"{src}/linear_0"), v[f"{src}/linear_0/bias"]
        kv_w, kv_b = _weight(v, f"{src}/linear_1"), v[f"{src}/linear_1/bias"]
        k_w, v_w = np.split(kv_w, 2)
        _, v_b = np.split(kv_b, 2)
        o_name = f"{src}/linear_2"
    else:  # self attention: linear_0 = q;k;v, linear_1 = out
        qkv_w, qkv_b = _weight(v, f"{src}/linear_0"), v[f"{src}/linear_0/bias"]
        q_w, k_w, v_w = np.split(qkv_w, 3)
        q_b, _, v_b = np.split(qkv_b, 3)
        o_name = f"{src}/linear_1"
    out[f"{dst}.q_proj.weight"], out[f"{dst}.q_proj.bias"] = q_w, q_b
    out[f"{dst}.k_proj.weight"] = k_w
    out[f"{dst}.v_proj.weight"], out[f"{dst}.v_proj.bias"] = v_w, v_b
    out[f"{dst}.out_proj.weight"], out[f"{dst}.out_proj.bias"] = _weight(v, o_name), v[f"{o_name}/bias"]
    return out


def _layer_norm(v, src: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.weight": v[f"{src}/gamma"], f"{dst}.bias": v[f"{src}/beta"]}


def _ffn(v, src: str, dst: str) -> dict[str, np.ndarray]:
    return {
        **_layer_norm(v, f"{src}/layer_norm", f"{dst}.final_layer_norm"),
        f"{dst}.fc1.weight": _weight(v, f"{src}/linear_0"),
        f"{dst}.fc1.bias": v[f"{src}/linear_0/bias"],
        f"{dst}.fc2.weight": _weight(v, f"{src}/linear_1"),
        f"{dst}.fc2.bias": v[f"{src}/linear_1/bias"],
    }


def ct2_to_hf_state_dict(v: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables to a HF ``WhisperForConditionalGeneration`` state dict."""
    sd: dict[str, np.ndarray] = {
        "model.encoder.conv1.weight": v["encoder/conv1/weight"],
        "model.encoder.conv1.bias": v["encoder/conv1/bias"],
        "model.encoder.conv2.weight": v["encoder/conv2/weight"],
        "model.encoder.conv2.bias": v["encoder/conv2/bias"],
        "model.encoder.embed_positions.weight": v["encoder/position_encodings/encodings"],
        **_layer_norm(v, "encoder/layer_norm", "model.encoder.layer_norm"),
        "model.decoder.embed_tokens.weight": v["decoder/embeddings/weight"],
        "model.decoder.embed_positions.weight": v["decoder/position_encodings/encodings"],
        **_layer_norm(v, "decoder/layer_norm", "model.decoder.layer_norm"),
    }
    for i in range(_count_layers(v, "encoder")):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        sd.update(_attention(v, f"{src}/self_attention", f"{dst}.self_attn"))
        sd.update(_layer_norm(v, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
        sd.update(_ffn(v, f"{src}/ffn", dst))
    for i in range(_count_layers(v, "decoder")):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        sd.update(_attention(v, f"{src}/self_attention", f"{dst}.self_attn"))
        sd.update(_layer_norm(v, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
        sd.update(_attention(v, f"{src}/attention", f"{dst}.encoder_attn", fused_kv_only=True))
        sd.update(_layer_norm(v, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"))
        sd.update(_ffn(v, f"{src}/ffn", dst))
    return {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in sd.items()}


def whisper_config_from_ct2(v: dict[str, np.ndarray], vocab_size: int, token_ids: dict[str, int]):
    """Build a ``WhisperConfig`` from the shapes and scalars in the CT2 variables."""
    from transformers import WhisperConfig

    if _scalar(v, "encoder/activation", _GELU) != _GELU or _scalar(v, "decoder/activation", _GELU) != _GELU:
        raise ConversionError("only GELU Whisper models are supported")
    d_model = v["encoder/conv1/weight"].shape[0]
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(v, "encoder"),
        decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=_scalar(v, "encoder/num_heads", d_model // 64),
        decoder_attention_heads=_scalar(v, "decoder/num_heads", d_model // 64),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=token_ids["<|endoftext|>"],
        bos_token_id=token_ids["<|endoftext|>"],
        eos_token_id=token_ids["<|endoftext|>"],
        decoder_start_token_id=token_ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )


def build_tokenizer(ct2_dir: Path):
    """HF ``WhisperTokenizer`` from CT2's ``tokenizer.json``, timestamps added, checked against the vocabulary."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    data = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    specials = [t["content"] for t in sorted(data["added_tokens"], key=lambda t: t["id"])]
    eot = "<|endoftext|>"
    tokenizer = WhisperTokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        extra_special_tokens=[s for s in specials if s != eot],
    )
    has_timestamps = any(s == "<|0.00|>" for s in specials)
    if not has_timestamps:
        tokenizer.add_tokens(
            [
                AddedToken(f"<|{i * TIME_PRECISION:.2f}|>", special=False, normalized=False, lstrip=False, rstrip=False)
                for i in range(N_TIMESTAMPS)
            ]
        )
    vocabulary = (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    if vocabulary and vocabulary[-1] == "":
        vocabulary.pop()
    ids = tokenizer.convert_tokens_to_ids(vocabulary)
    wrong = [(i, tok, got) for i, (tok, got) in enumerate(zip(vocabulary, ids)) if got != i]
    if wrong or len(tokenizer) != len(vocabulary):
        raise ConversionError(
            f"{ct2_dir}: tokenizer does not match vocabulary.txt "
            f"(len {len(tokenizer)} vs {len(vocabulary)}; first mismatches {wrong[:3]})"
        )
    return tokenizer


def generation_config_from_ct2(ct2_config: dict, tokenizer, model_config):
    """Whisper ``GenerationConfig`` (languages, tasks, suppression, alignment heads) from CT2 ``config.json``."""
    from transformers import GenerationConfig

    def tid(token: str) -> int:
        return tokenizer.convert_tokens_to_ids(token)

    lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in ct2_config.get("lang_ids", [])}
    gc = GenerationConfig(
        decoder_start_token_id=tid("<|startoftranscript|>"),
        bos_token_id=tid("<|endoftext|>"),
        eos_token_id=tid("<|endoftext|>"),
        pad_token_id=tid("<|endoftext|>"),
        max_length=model_config.max_target_positions,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        no_timestamps_token_id=tid("<|notimestamps|>"),
        prev_sot_token_id=tid("<|startofprev|>"),
        is_multilingual=len(lang_to_id) > 1,
        lang_to_id=lang_to_id,
        task_to_id={"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")},
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    return gc


def convert_ct2_to_hf(ct2_dir: Path | str, out_dir: Path | str) -> Path:
    """Convert a CTranslate2 Whisper folder into a HF model + processor folder at ``out_dir``.

    Writes into ``out_dir`` directly; callers that need atomicity write to a temporary folder and
    rename (see :mod:`asr_lora.bundled`).
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    missing = [f for f in REQUIRED_FILES if not (ct2_dir / f).is_file()]
    if missing:
        raise ConversionError(f"{ct2_dir}: not a CTranslate2 Whisper folder, missing {', '.join(missing)}")
    ct2 = read_ct2_model(ct2_dir / "model.bin")
    ct2_config = json.loads((ct2_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer = build_tokenizer(ct2_dir)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|startoftranscript|>")}
    config = whisper_config_from_ct2(ct2.variables, len(tokenizer), token_ids)
    state_dict = ct2_to_hf_state_dict(ct2.variables)
    if config.vocab_size != state_dict["model.decoder.embed_tokens.weight"].shape[0]:
        raise ConversionError(f"{ct2_dir}: vocabulary size {config.vocab_size} != embedding rows")

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ConversionError(f"{ct2_dir}: weights missing after conversion: {leftover[:5]}")
    model.generation_config = generation_config_from_ct2(ct2_config, tokenizer, config)

    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
