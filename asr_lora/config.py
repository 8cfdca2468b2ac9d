"""Typed, declared, overridable configuration.

Recipes are YAML files loaded into the dataclasses below. Every knob is declared with a one-line
doc (``doc(...)``) and validated on load; command-line overrides use ``section.key=value``; an
unknown key is an error that suggests the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .defaults import DEFAULT_LANGUAGE, DEFAULT_MODEL, EVAL_BATCH_SIZE, EVAL_MAX_NEW_TOKENS
from .errors import UserError

T = TypeVar("T")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class ConfigError(UserError, ValueError):
    """A recipe or override is invalid; the message names the key and the source."""


def doc(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:
    """A dataclass field with a one-line description (shown by ``describe``)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": help}, **kwargs)
    return field(default=default, metadata={"doc": help}, **kwargs)


# --------------------------------------------------------------------------- the schema


@dataclass
class ModelConfig:
    name: str = doc(DEFAULT_MODEL, "base model: bundled:whisper-base, a local HF folder or a hub id")
    quant: Literal["none", "8bit", "4bit"] = doc("none", "load the frozen base in bitsandbytes 8-bit or 4-bit (nf4)")
    language: str = doc(DEFAULT_LANGUAGE, "language token forced in labels and generation (always force it for Korean)")
    task: Literal["transcribe", "translate"] = doc("transcribe", "Whisper task token")
    gradient_checkpointing: bool = doc(True, "trade compute for memory (non-reentrant)")
    audio_context: Literal["full", "trimmed"] = doc(
        "full", "full: pad every clip to 30 s (Whisper standard); trimmed: pad each batch to its longest clip and "
        "run the encoder on only those frames (several times faster; recorded in checkpoints and applied by "
        "eval/merge/transcribe)")
    allow_pickle: bool = doc(
        False, "also load base weights stored as a pickle (pytorch_model.bin); off: safetensors only, since "
        "unpickling a file can run code. Turn on only for files you trust")


@dataclass
class LoraConfig:
    r: int = doc(32, "LoRA rank: higher means more capacity and more memory")
    alpha: int = doc(64, "LoRA scaling numerator (scale = alpha / r)")
    dropout: float = doc(0.05, "dropout on the LoRA input")
    target_modules: list[str] = doc(["q_proj", "v_proj"], "module names that get adapters")

    def __post_init__(self):
        if self.r <= 0:
            raise ConfigError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")


@dataclass
class DataConfig:
    train: str = doc("data/demo/train.jsonl", "training manifest (JSONL)")
    dev: str = doc("data/demo/dev.jsonl", "dev manifest scored every eval_every steps")
    test: str | None = doc(None, "optional test manifest for final scoring")
    max_label_tokens: int = doc(448, "drop/refuse labels longer than this many tokens (Whisper's decoder limit)")
    nonspeech: str | None = doc(None, "non-speech clips to train on (a folder of audio files or a JSONL manifest): "
                                "their target is Whisper's <|nospeech|> token, so the tuned model keeps knowing silence")
    nonspeech_rate: float = doc(0.0, "share of training utterances drawn from data.nonspeech (0 to 0.5)")
    nonspeech_dev: str | None = doc(None, "non-speech clips scored every eval: nonspeech_share, the share that gets "
                                    "any output (lower is better), in metrics.jsonl, the trackers and cer.png")
    guard: str | None = doc(None, "forgetting guard: a manifest of a second language (e.g. English) decoded every eval "
                            "with data.guard_language forced: guard_wer, guard_cer in metrics.jsonl, the trackers, "
                            "cer.png and the report (keep it small: every eval decodes it too)")
    guard_language: str = doc("en", "language token forced when decoding data.guard")
    concat_probability: float = doc(
        0.0, "share of training rows (drawn per row and epoch) joined with the rows after them into one input "
        "of several utterances: the next rows of the same 'session' (a manifest field) or, without one, "
        "neighbours in a seeded order; the label is the joined text (one timestamp pair per utterance with a "
        "timestamp draw). Teaches a model to go on after the first sentence (0: off)")
    concat_max_seconds: float = doc(30.0, "longest joined input in seconds (at most 30, Whisper's window); also "
                                    "the longest piece transcription gives the model")
    concat_pause: list[float] = doc([0.2, 1.0], "silence between joined utterances: range [lo, hi] in seconds")

    def __post_init__(self):
        if not 0 < self.max_label_tokens <= 448:
            raise ConfigError(f"data.max_label_tokens must be in 1..448, got {self.max_label_tokens}")
        if not 0.0 <= self.nonspeech_rate <= 0.5:
            raise ConfigError(f"data.nonspeech_rate must be in 0..0.5, got {self.nonspeech_rate}")
        if not 0.0 <= self.concat_probability <= 1.0:
            raise ConfigError(f"data.concat_probability must be in 0..1, got {self.concat_probability}")
        if not 0.0 < self.concat_max_seconds <= 30.0:
            raise ConfigError(f"data.concat_max_seconds must be in (0, 30] (Whisper's window), got "
                              f"{self.concat_max_seconds}")
        if len(self.concat_pause) != 2 or not 0.0 <= self.concat_pause[0] <= self.concat_pause[1]:
            raise ConfigError(f"data.concat_pause must be a range [lo, hi] with 0 <= lo <= hi, got {self.concat_pause}")
        if self.nonspeech_rate > 0 and not self.nonspeech:
            raise ConfigError("data.nonspeech_rate > 0 needs data.nonspeech (a folder or manifest of non-speech clips)")


@dataclass
class TrainConfig:
    output_dir: str = doc("runs/demo", "run folder: checkpoints, metrics.jsonl, cer.png, resolved recipe")
    max_steps: int = doc(100, "optimizer steps to train")
    batch_size: int = doc(8, "utterances per micro-batch (per device); not used when train.batch_seconds is set")
    batch_seconds: float | None = doc(
        None, "instead of train.batch_size: fill each micro-batch (per device) with up to this many seconds of "
        "padded audio (clips x longest clip; a clip counts 30 s in the full audio context), from length buckets: "
        "many short clips or few long ones, every batch of similar cost. A clip longer than this is a batch alone")
    grad_accum: int = doc(1, "micro-batches per optimizer step")
    num_workers: int | None = doc(
        None, "background loading: DataLoader worker processes per device that read audio and compute log-mel "
        "(on the CPU) ahead of the loop, 2 batches each, pinned memory on a GPU; 0: in the loop (log-mel on the "
        "GPU if there is one); None: up to 4 on a GPU (within the CPU cores), 0 on CPU")
    lr: float = doc(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    warmup_steps: int = doc(10, "linear warmup steps, then linear decay to 0")
    max_grad_norm: float = doc(1.0, "gradient clipping norm (0 disables)")
    mixed_precision: Literal["no", "fp16", "bf16"] = doc("no", "accelerate mixed precision (GPU)")
    seed: int = doc(42, "random seed")
    eval_every: int = doc(100, "evaluate CER on dev every N optimizer steps")
    save_every: int = doc(100, "checkpoint every N optimizer steps")
    keep_last: int = doc(3, "checkpoints kept besides best/ and final/")
    early_stopping_patience: int = doc(0, "stop after N evals without a new best checkpoint (see select_best; 0: off)")
    select_best: Literal["cer", "cer_guarded", "longform", "longform_guarded"] = doc(
        "cer", "which checkpoint is best/: cer: the lowest dev CER; cer_guarded: the lowest dev CER among the "
        "checkpoints within train.max_nonspeech_share and train.max_guard_wer, ties to the lower non-speech share "
        "(none within the limits yet: the lowest CER, logged); longform, longform_guarded: the same with the "
        "long-form probe's CER, the mean of longform_cer and longfile_cer (needs eval.longform_rows)")
    max_nonspeech_share: float | None = doc(None, "cer_guarded: highest nonspeech_share a best checkpoint may have "
                                            "(None: no limit; applies only when data.nonspeech_dev is scored)")
    max_guard_wer: float | None = doc(None, "cer_guarded: highest guard_wer a best checkpoint may have (None: no "
                                      "limit; applies only when data.guard is scored)")
    max_bad_steps: int = doc(5, "stop after this many non-finite losses in a row")
    max_bad_rows: int = doc(100, "stop when more rows than this turn out unreadable during training")
    timestamp_probability: float = doc(
        0.0, "share of training utterances (drawn per utterance from seed, epoch and row) whose labels carry "
        "Whisper's timestamp tokens, <|0.00|> text <|end|> with the clip's duration as end, instead of "
        "<|notimestamps|>: keeps the model's timestamps (distil-whisper uses 0.2)")
    prompt_probability: float = doc(
        0.0, "share of training utterances with a manifest 'prompt' (the previous text) that are decoded after "
        "it as a <|startofprev|> prompt, with no loss on the prompt: keeps prompt following (distil-whisper's "
        "condition_on_prev_probability, 0.2)")
    nonspeech_forced_probability: float = doc(
        0.0, "share of non-speech training rows (data.nonspeech) read after the forced <|lang|><|transcribe|> "
        "prefix, as decoders that force the language see them (faster-whisper, asr-lora), with a uniform target "
        "at the first text position: the model learns to be unsure of any text there, so the no-speech rule "
        "(no_speech_prob high AND avg_logprob low) fires (outlier exposure). The others keep Whisper's "
        "<|nospeech|> target, and no row learns the language token after non-speech")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = doc(
        ["tensorboard"], "trackers (accelerate) for training loss, lr, step time, tokens/s and every dev metric: "
        "tensorboard (in <output_dir>/tb), wandb, mlflow, or none")

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.batch_seconds is not None and self.batch_seconds <= 0:
            raise ConfigError(f"train.batch_seconds must be positive (or null: train.batch_size clips per batch), "
                              f"got {self.batch_seconds}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be 0 or more (or null: automatic), got {self.num_workers}")
        for name in ("max_nonspeech_share", "max_guard_wer"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 or more (or null: no limit), got {getattr(self, name)}")
        for name in ("timestamp_probability", "prompt_probability", "nonspeech_forced_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be in 0..1, got {getattr(self, name)}")
        for tracker in self.report_to:
            if tracker != "none" and importlib.util.find_spec(TRACKER_PACKAGES[tracker]) is None:
                raise ConfigError(f"train.report_to={tracker} needs the {TRACKER_PACKAGES[tracker]!r} package "
                                  f"(pip install {TRACKER_PACKAGES[tracker]}), or train.report_to=none")


@dataclass
class EvalConfig:
    batch_size: int = doc(EVAL_BATCH_SIZE, "utterances per generation batch")
    max_samples: int | None = doc(None, "score a fixed subset of the dev set (None: all)")
    max_new_tokens: int = doc(EVAL_MAX_NEW_TOKENS, "generation cap, also bounded per batch by 2 x the longest "
                              "reference + 8 tokens (untuned and 8-bit greedy decoding can loop)")
    num_beams: int = doc(1, "beam size (1: greedy)")
    zero_shot: bool = doc(False, "also score the untouched base (full 30 s context) on dev before step 1: the "
                          "zero-shot point of metrics.jsonl, cer.png and the report")
    longform_rows: int = doc(
        0, "long-form probe every eval: the first N speech rows of data.dev joined (eval.longform_pause apart) "
        "into inputs of eval.longform_seconds, decoded whole (longform_cer, longform_deletion_rate), and into "
        "one file of all N cut and decoded as 'asr-lora transcribe' does (longfile_cer, longfile_deletion_rate); "
        "in metrics.jsonl, the trackers, cer.png and the report (0: off)")
    longform_seconds: list[float] = doc([20.0, 30.0], "length range [lo, hi] of the probe's joined inputs in seconds")
    longform_pause: float = doc(0.5, "silence between the probe's joined rows, seconds")

    def __post_init__(self):
        if self.longform_rows < 0:
            raise ConfigError(f"eval.longform_rows must be 0 or more, got {self.longform_rows}")
        if len(self.longform_seconds) != 2 or not 0 < self.longform_seconds[0] <= self.longform_seconds[1] <= 30.0:
            raise ConfigError(f"eval.longform_seconds must be a range [lo, hi] with 0 < lo <= hi <= 30, got "
                              f"{self.longform_seconds}")
        if self.longform_pause < 0:
            raise ConfigError(f"eval.longform_pause must be 0 or more, got {self.longform_pause}")


@dataclass
class AugmentConfig:
    spec_time_prob: float = doc(0.0, "SpecAugment (transformers' Whisper masking, training only): share of each clip's "
                                "real log-mel frames covered by time masks (mask_time_prob; 0: off)")
    spec_time_length: int = doc(10, "frames (10 ms each) per time mask (mask_time_length)")
    spec_feature_prob: float = doc(0.0, "SpecAugment: share of the mel bins covered by frequency masks "
                                   "(mask_feature_prob; 0: off)")
    spec_feature_length: int = doc(10, "mel bins per frequency mask (mask_feature_length)")
    noise: str | None = doc(None, "noise clips mixed into speech (a folder of audio files or a JSONL manifest); "
                            "None: data.nonspeech")
    noise_prob: float = doc(0.0, "share of speech utterances that get a noise clip mixed in (0: off)")
    snr_db: list[float] = doc([10.0, 30.0], "signal-to-noise ratio range [lo, hi] in dB, drawn uniformly per utterance")
    speed_prob: float = doc(0.0, "share of utterances speed-perturbed by resampling (tempo and pitch, as Kaldi's "
                            "speed perturbation; 0: off)")
    speeds: list[float] = doc([0.9, 1.1], "speed factor range [lo, hi], drawn uniformly (1.1: 10% faster, shorter)")
    gain_prob: float = doc(0.0, "share of utterances whose level is changed (0: off)")
    gain_db: list[float] = doc([-6.0, 6.0], "gain range [lo, hi] in dB, drawn uniformly")

    def __post_init__(self):
        for name in ("spec_time_prob", "spec_feature_prob", "noise_prob", "speed_prob", "gain_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"augment.{name} must be in 0..1, got {getattr(self, name)}")
        for name in ("spec_time_length", "spec_feature_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"augment.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("snr_db", "speeds", "gain_db"):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ConfigError(f"augment.{name} must be a range [lo, hi] with lo <= hi, got {value}")
        if self.speeds[0] <= 0:
            raise ConfigError(f"augment.speeds must be positive, got {self.speeds}")


@dataclass
class RecipeConfig:
    model: ModelConfig = doc(help="base model and quantisation", default_factory=ModelConfig)
    lora: LoraConfig = doc(help="LoRA adapter", default_factory=LoraConfig)
    data: DataConfig = doc(help="manifests and batching", default_factory=DataConfig)
    train: TrainConfig = doc(help="optimisation and checkpointing", default_factory=TrainConfig)
    eval: EvalConfig = doc(help="CER evaluation during training", default_factory=EvalConfig)
    augment: AugmentConfig = doc(help="train-only augmentation, deterministic in (seed, epoch, row)",
                                 default_factory=AugmentConfig)

    def __post_init__(self):
        if self.augment.noise_prob > 0 and not (self.augment.noise or self.data.nonspeech):
            raise ConfigError("augment.noise_prob > 0 needs noise clips: augment.noise or data.nonspeech")
        if self.train.select_best.startswith("longform") and self.eval.longform_rows <= 0:
            raise ConfigError(f"train.select_best={self.train.select_best} needs the long-form probe: set "
                              "eval.longform_rows (e.g. 40)")
        slowest = self.augment.speeds[0] if self.augment.speed_prob > 0 else 1.0
        if self.data.concat_probability > 0 and self.data.concat_max_seconds / min(slowest, 1.0) > 30.0:
            raise ConfigError(f"data.concat_max_seconds={self.data.concat_max_seconds:g} slowed down by "
                              f"augment.speeds[0]={slowest:g} exceeds Whisper's 30 s window; lower "
                              f"data.concat_max_seconds to {30.0 * slowest:.1f} or less")


# --------------------------------------------------------------------------- the mechanism


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; accept ints for floats. Raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/off/yes/on as a bool
            words = ("no", "off", "false", "n") if value is False else ("yes", "on", "true", "y")
            value = next((a for a in get_args(tp) if isinstance(a, str) and a.lower() in words), value)
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if isinstance(value, str):  # one item: `train.report_to=none`
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(tp) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    guess = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {(where + '.' if where else '') + guess[0]!r}?" if guess else ""
    return ConfigError(f"unknown key {(where + '.' if where else '') + key!r}{hint} (valid: {', '.join(valid)})")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys are errors with a suggestion."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls) if f.init]
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in valid:
            raise _unknown_key(str(key), valid, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str], cls: type = RecipeConfig) -> dict:
    """Apply ``section.key=value`` overrides to a raw recipe mapping, checking keys against ``cls``."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls, where = data, cls, ""
        for depth, key in enumerate(path):
            names = {f.name: f for f in fields(node_cls)}
            if key not in names:
                raise _unknown_key(key, list(names), where)
            where = f"{where}.{key}" if where else key
            if depth == len(path) - 1:
                node[key] = value
                break
            sub_cls = typing.get_type_hints(node_cls)[key]
            if not is_dataclass(sub_cls):
                raise ConfigError(f"override {text!r}: {where} is a value, not a section")
            node = node.setdefault(key, {})
            node_cls = sub_cls
    return data


def load_recipe(path: str | Path | None, overrides: list[str] = (), cls: type[T] = RecipeConfig) -> T:
    """Load a YAML recipe (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"recipe not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    data = apply_overrides(data, list(overrides), cls)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def describe(cls: type = RecipeConfig, prefix: str = "") -> list[str]:
    """One line per key: ``section.key (type, default) - doc``; for ``--help`` texts."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if is_dataclass(tp):
            lines.extend(describe(tp, name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{name} = {default!r}  # {f.metadata.get('doc', '')}")
    return lines
