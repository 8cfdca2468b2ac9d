"""Batch collation for Whisper fine-tuning: waveforms -> log-mel, texts -> labels.

One collator serves both padding modes: ``"max_length"`` pads every clip to 30 s (Whisper's
standard input) and ``"longest"`` pads only to the longest clip in the batch (rounded up to
``pad_to_multiple_of`` frames), which the trimmed-context encoder consumes.

Labels are ``<|startoftranscript|><|ko|><|transcribe|><|notimestamps|> text <|endoftext|>`` (for an
intended non-speech row Whisper's own ``<|startoftranscript|><|nospeech|><|endoftext|>``) with
the leading ``<|startoftranscript|>`` dropped (the model prepends ``decoder_start_token_id`` when it
shifts labels right), padded with -100 so padding never counts in the loss.

Training batches (rows given with their ``(epoch, index)`` keys) may instead get, each with its own
deterministic draw (:func:`asr_lora.prompting.draw`): timestamped labels
``<|ko|><|transcribe|><|0.00|> text <|T|><|endoftext|>`` (``timestamp_probability``; ``T`` is the
clip's duration on the 0.02 s grid), and a ``<|startofprev|>`` prompt of the row's ``prompt`` before
``<|startoftranscript|>`` (``prompt_probability``), with -100 over the prompt (no loss on it); and a
non-speech row may be read after the forced ``<|startoftranscript|><|ko|><|transcribe|><|notimestamps|>``
(``<|0.00|>`` instead with its timestamp draw) with one label, :data:`UNSURE_INDEX` at the first text
position (``nonspeech_forced_probability``; the loss there is the cross-entropy to the uniform
distribution: decoders that force the language, as faster-whisper does, then meet a model unsure of
any text on non-speech). Such batches carry ``decoder_input_ids``: the model's own shift of the labels
would read -100 as padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from ..audio import SAMPLE_RATE, AudioError, log_mel_spectrogram
from ..nospeech import no_speech_target
from ..prompting import MAX_PROMPT_TOKENS, draw, prompt_ids, timestamp_id
from ..trimmed import FRAME_MULTIPLE
from .augment import frame_mask
from .concat import JoinedRow, join_audio
from .manifest import ManifestRow, load_row_audio

IGNORE_INDEX = -100
UNSURE_INDEX = -2  # a label position whose target is the uniform distribution over the vocabulary (token_loss_sum)
MAX_LABEL_TOKENS = 448  # Whisper's decoder positions
MAX_CLIP_SECONDS = 30.0  # Whisper's window: a longer row (not from 'prepare') is skipped, not a crash


@dataclass
class WhisperCollator:
    """Turn manifest rows (:class:`ManifestRow`, ids filled in) into a model batch.

    Rows whose audio cannot be read (missing, truncated, corrupt, a bad ``offset``/``end``) or whose
    label is longer than ``max_label_tokens`` are left out of the batch and listed in
    ``batch["skipped"]`` as ``(id, reason)``, so a bad file costs one utterance and a logged line,
    never the run.
    """

    tokenizer: Any
    n_mels: int = 80
    padding: Literal["max_length", "longest"] = "max_length"
    pad_to_multiple_of: int | None = None
    max_label_tokens: int = MAX_LABEL_TOKENS
    language: str = "ko"
    task: str = "transcribe"
    feature_device: str | torch.device | None = None
    augment: Any = None  # a WaveAugment (data/augment.py): training audio changed per row and position
    timestamp_probability: float = 0.0  # training rows: share with timestamped labels (train.timestamp_probability)
    prompt_probability: float = 0.0  # training rows with a prompt: share decoded after it (train.prompt_probability)
    nonspeech_forced_probability: float = 0.0  # non-speech training rows: share with the language forced, target unsure
    seed: int = 0  # of the per-row draws
    _prefix: list[int] = field(init=False, repr=False)

    def __post_init__(self):
        if self.padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {self.padding!r}")
        self.tokenizer.set_prefix_tokens(language=self.language, task=self.task, predict_timestamps=False)
        self._prefix = list(self.tokenizer.prefix_tokens)
        self._no_speech = no_speech_target(self.tokenizer)[1:]  # <|nospeech|> <|endoftext|>
        if self.pad_to_multiple_of is None and self.padding == "longest":
            self.pad_to_multiple_of = FRAME_MULTIPLE

    def label_ids(self, text: str) -> list[int]:
        """Token ids the decoder must predict: prefix (minus <|startoftranscript|>), text, <|endoftext|>."""
        ids = self._prefix + self.tokenizer.encode(text.strip(), add_special_tokens=False)
        return ids[1:] + [self.tokenizer.eos_token_id]

    def row_label(self, row: ManifestRow) -> list[int]:
        """A row's label: :meth:`label_ids` of its text, or Whisper's own no-speech target
        (``<|nospeech|><|endoftext|>`` after ``<|startoftranscript|>``, no language or task token) for
        an intended non-speech row."""
        return list(self._no_speech) if row.nonspeech else self.label_ids(row.text)

    def training_sequence(self, row: ManifestRow | JoinedRow, seconds: float, key: tuple[int, int],
                          spans: list[tuple[float, float]] | None = None) -> tuple[list[int], list[int]]:
        """Decoder inputs and labels of a training row (same length). Labels are the inputs shifted by one,
        with -100 over a ``<|startofprev|>`` prompt when one is drawn (no loss on it). A non-speech row
        drawn as forced (``nonspeech_forced_probability``) reads the forced prefix, as a decoder that forces
        language and task sees it, and has one label: :data:`UNSURE_INDEX` at the first text position.
        ``key``: the row's ``(epoch, index)``, which fixes its draws with ``seed``. A :class:`JoinedRow`
        (``spans``: each utterance's place in the input, seconds) has its texts joined, or with the timestamp
        draw one ``<|start|> text <|end|>`` pair per utterance."""
        sot = self._prefix[0]
        stamped = self.timestamp_probability > 0 and draw(self.seed, *key, "timestamps") < self.timestamp_probability
        if row.nonspeech:
            if self.nonspeech_forced_probability > 0 and \
                    draw(self.seed, *key, "nonspeech_forced") < self.nonspeech_forced_probability:
                inputs = [*self._prefix[:3], timestamp_id(self.tokenizer, 0.0)] if stamped else list(self._prefix)
                return inputs, [IGNORE_INDEX] * (len(inputs) - 1) + [UNSURE_INDEX]
            return [sot, self._no_speech[0]], list(self._no_speech)
        text = self.tokenizer.encode(row.text.strip(), add_special_tokens=False)
        main = [*self._prefix, *text, self.tokenizer.eos_token_id]
        if stamped:
            texts, bounds = (row.texts, spans) if isinstance(row, JoinedRow) else ([row.text], [(0.0, seconds)])
            with_times = list(self._prefix[:3])
            for k, (part, (start, end)) in enumerate(zip(texts, bounds)):
                ids = self.tokenizer.encode(part.strip(), add_special_tokens=False)
                with_times += [timestamp_id(self.tokenizer, 0.0 if k == 0 else start), *ids,
                               timestamp_id(self.tokenizer, end)]
            with_times.append(self.tokenizer.eos_token_id)
            main = with_times if len(with_times) <= self.max_label_tokens else main
        prompt: list[int] = []
        if row.prompt and self.prompt_probability > 0 and draw(self.seed, *key, "prompt") < self.prompt_probability:
            room = min(MAX_PROMPT_TOKENS, self.max_label_tokens - len(main) - 1)  # -1: <|startofprev|>
            prompt = prompt_ids(self.tokenizer, row.prompt, room)
        full = prompt + main
        return full[:-1], [IGNORE_INDEX] * len(prompt) + full[len(prompt) + 1:]

    def __call__(self, rows: Sequence[ManifestRow], keys: Sequence[tuple[int, int]] | None = None) -> dict:
        """A batch of ``rows``; with ``keys`` (each row's ``(epoch, index)`` in training) the rows get
        their waveform augmentation (``augment``) and their drawn timestamps and prompts
        (:meth:`training_sequence`), all seeded by the key."""
        audios, labels, ids, skipped, inputs = [], [], [], [], []
        for k, row in enumerate(rows):
            label = self.row_label(row)
            if len(label) + 1 > self.max_label_tokens:  # +1: the start token the model prepends
                skipped.append((row.id, f"label has {len(label) + 1} tokens, more than {self.max_label_tokens}"))
                continue
            spans = None
            try:
                if isinstance(row, JoinedRow):
                    audio, spans = join_audio(row, max_seconds=MAX_CLIP_SECONDS)
                else:
                    audio = load_row_audio(row, max_seconds=MAX_CLIP_SECONDS)  # so a timestamp end is at most 30.00
            except AudioError as e:
                failed = next((p for p in getattr(row, "parts", ()) if p.audio == e.path), row)
                skipped.append((failed.id, str(e)))
                continue
            if self.augment is not None:
                before = len(audio)
                audio = self.augment(audio, row, keys[k] if keys else None)
                if spans is not None and len(audio) != before:  # speed perturbation: every place scales alike
                    scale = len(audio) / before
                    spans = [(a * scale, b * scale) for a, b in spans]
            audios.append(torch.as_tensor(audio, dtype=torch.float32))
            if keys is not None:
                decoder_input, label = self.training_sequence(row, len(audio) / SAMPLE_RATE, keys[k], spans)
                inputs.append(decoder_input)
            labels.append(label)
            ids.append(row.id)
        batch: dict = {"ids": ids, "skipped": skipped}
        if not audios:
            return batch
        features, n_frames = log_mel_spectrogram(
            audios, n_mels=self.n_mels, padding=self.padding,
            pad_to_multiple_of=self.pad_to_multiple_of if self.padding == "longest" else None,
            device=self.feature_device,
        )
        batch["input_features"] = features
        batch["n_frames"] = n_frames
        batch["attention_mask"] = frame_mask(n_frames, features.shape[-1])  # real frames: SpecAugment masks only these
        width = max(len(label) for label in labels)
        batch["labels"] = torch.tensor([label + [IGNORE_INDEX] * (width - len(label)) for label in labels])
        if any(d[1:] != label[:-1] for d, label in zip(inputs, labels)):  # else the model's shift of the labels
            pad = self.tokenizer.eos_token_id
            batch["decoder_input_ids"] = torch.tensor([d + [pad] * (width - len(d)) for d in inputs])
        return batch
