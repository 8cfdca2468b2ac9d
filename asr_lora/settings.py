"""``asr_lora.json``: how a checkpoint, merged folder or CTranslate2 export must be run.

The one schema, reader and writer of that file. Training writes it into every checkpoint; merge and
export-ct2 carry it along (adding what they did); eval, transcribe and serve read it and apply it
without being told. Without the file, a checkpoint's run recipe (``../recipe.yaml``, read through the
typed config) gives language, task, base model and audio context; else Korean transcription with the
full 30 s context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .defaults import DEFAULT_LANGUAGE, DEFAULT_TASK
from .errors import UserError
from .trimmed import AUDIO_CONTEXTS

SETTINGS_FILE = "asr_lora.json"
RECIPE_FILE = "recipe.yaml"  # the resolved recipe in a run folder, parent of its checkpoints
KNOWN_KEYS = ("audio_context", "language", "task", "base_model", "trained_on")
MAX_INPUT_SECONDS = 30.0  # Whisper's window: what a model without a record of its training inputs is given


@dataclass(frozen=True)
class TrainedOn:
    """What a checkpoint's training inputs were like, as transcription needs to know it: the range of
    input durations (a joined multi-utterance input counts as one input), the speaking rate in non-space
    characters per second of input (median and 5th percentile over the speech rows), and the most
    utterances one input held (1: single utterances only, the model stops after one; None: not recorded)."""

    min_seconds: float
    max_seconds: float
    chars_per_second: float
    chars_per_second_low: float
    max_utterances: int | None = None

    @classmethod
    def from_json(cls, data, where: str) -> TrainedOn | None:
        if data is None:
            return None
        try:
            values = [float(data[k]) for k in ("min_seconds", "max_seconds", "chars_per_second",
                                               "chars_per_second_low")]
            most = data.get("max_utterances")
            most = None if most is None else int(most)
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise UserError(f"{where}: trained_on must hold min_seconds, max_seconds, chars_per_second and "
                            f"chars_per_second_low as numbers ({type(e).__name__}: {e})") from None
        return cls(*values, max_utterances=most)

    def to_json(self) -> dict:
        out = {"min_seconds": round(self.min_seconds, 3), "max_seconds": round(self.max_seconds, 3),
               "chars_per_second": round(self.chars_per_second, 3),
               "chars_per_second_low": round(self.chars_per_second_low, 3)}
        return out if self.max_utterances is None else {**out, "max_utterances": self.max_utterances}


@dataclass
class ModelSettings:
    """What ``asr_lora.json`` records (or the defaults)."""

    audio_context: str = "full"  # "full": 30 s windows; "trimmed": the encoder sees only the clip's frames
    language: str = DEFAULT_LANGUAGE
    task: str = DEFAULT_TASK
    base_model: str | None = None
    trained_on: TrainedOn | None = None  # the training inputs' durations and speaking rate (None: not recorded)
    extra: dict = field(default_factory=dict)  # what else the file records (quant, dtype, merged_from, ...)
    source: str = "default"  # where these came from: a file path, or "default"

    def __post_init__(self):
        if self.audio_context not in AUDIO_CONTEXTS:
            raise UserError(f"{self.source}: audio_context must be one of {', '.join(AUDIO_CONTEXTS)}, "
                            f"got {self.audio_context!r}")

    def to_json(self) -> dict:
        out = {"audio_context": self.audio_context, "language": self.language, "task": self.task,
               "base_model": self.base_model}
        if self.trained_on is not None:
            out["trained_on"] = self.trained_on.to_json()
        return {**out, **self.extra}

    @property
    def max_input_seconds(self) -> float:
        """The longest piece transcription gives this model: the longest input it was trained on (a model
        that only saw single sentences stops after one), at most Whisper's 30 s; 30 s when not recorded."""
        if self.trained_on is None:
            return MAX_INPUT_SECONDS
        return min(MAX_INPUT_SECONDS, self.trained_on.max_seconds)

    @property
    def single_utterance(self) -> bool:
        """Whether the model was trained on single utterances only: transcription then gives it one VAD
        speech span a piece, never several joined."""
        return self.trained_on is not None and self.trained_on.max_utterances == 1


def settings_from_recipe(cfg, source: str = "recipe") -> ModelSettings:
    """Settings of a run from its typed recipe (``RecipeConfig``)."""
    m = cfg.model
    return ModelSettings(audio_context=m.audio_context, language=m.language, task=m.task, base_model=m.name,
                         extra={"quant": m.quant}, source=source)


def read_settings(folder: str | Path | None) -> ModelSettings:
    """Settings of a checkpoint, merged or exported folder (see the module docstring). An unknown
    ``audio_context`` or an unreadable file is an error naming it, never ignored."""
    if folder is None or not Path(folder).is_dir():
        return ModelSettings()
    folder = Path(folder)
    path = folder / SETTINGS_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object")
        return ModelSettings(audio_context=data.get("audio_context") or "full",
                             language=data.get("language") or DEFAULT_LANGUAGE,
                             task=data.get("task") or DEFAULT_TASK, base_model=data.get("base_model"),
                             trained_on=TrainedOn.from_json(data.get("trained_on"), str(path)),
                             extra={k: v for k, v in data.items() if k not in KNOWN_KEYS}, source=str(path))
    recipe = folder.parent / RECIPE_FILE
    if recipe.is_file():
        from .config import load_recipe

        return settings_from_recipe(load_recipe(recipe), source=str(recipe))
    return ModelSettings()


def write_settings(folder: str | Path, settings: ModelSettings, **extra) -> None:
    """``folder/asr_lora.json``: ``settings`` plus ``extra`` keys."""
    from .atomic import write_json_atomic

    write_json_atomic(Path(folder) / SETTINGS_FILE, {**settings.to_json(), **extra})
