"""Trimmed audio context: run Whisper's encoder on only the frames a batch needs.

Whisper pads every input to 30 s (3,000 mel frames, 1,500 encoder positions). Korean utterances
average ~5 s, so most encoder compute goes to padding. In ``"trimmed"`` mode each batch is padded
only to its longest clip (see :class:`asr_lora.data.collator.WhisperCollator`) and the encoder adds
only the first N/2 rows of its position table. With 3,000 frames the result is exactly the stock
encoder's.

The switch is per model instance: :func:`apply_audio_context` sets or removes an instance-level
``forward`` on the encoder module, so other models (and the class) keep the stock behaviour, and
switching back leaves nothing behind. Generation must be given ``encoder_outputs``:
``WhisperForConditionalGeneration.generate`` zero-pads short ``input_features`` to
3,000 frames, which is both slower and wrong (the extractor's silence value is not zero).
"""

from __future__ import annotations

import types
from typing import Literal

import torch
from torch import nn

AudioContext = Literal["full", "trimmed"]
AUDIO_CONTEXTS = ("full", "trimmed")
FRAME_MULTIPLE = 2  # the encoder's second convolution has stride 2: a trimmed input has an even frame count


def feature_padding(mode: AudioContext) -> tuple[str, int | None]:
    """``(padding, pad_to_multiple_of)`` of the log-mel features an encoder in ``mode`` takes: 30 s
    windows (``"max_length"``) for "full", the batch's longest clip rounded up to
    :data:`FRAME_MULTIPLE` frames for "trimmed"."""
    if mode not in AUDIO_CONTEXTS:
        raise ValueError(f"audio context must be one of {AUDIO_CONTEXTS}, got {mode!r}")
    return ("longest", FRAME_MULTIPLE) if mode == "trimmed" else ("max_length", None)


def _whisper_encoders(model: nn.Module) -> list[nn.Module]:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return [m for m in model.modules() if isinstance(m, WhisperEncoder)]


def _trimmed_forward(self, input_features: torch.Tensor, attention_mask=None, **kwargs):
    """``WhisperEncoder.forward`` for any even number of frames up to the model's maximum."""
    from transformers.modeling_outputs import BaseModelOutput

    stride = self.conv1.stride[0] * self.conv2.stride[0]
    max_frames = self.config.max_source_positions * stride
    n_frames = input_features.shape[-1]
    if n_frames > max_frames or n_frames % stride:
        raise ValueError(f"trimmed Whisper encoder takes an even number of frames up to {max_frames}, "
                         f"got {n_frames}")
    inputs_embeds = nn.functional.gelu(self.conv1(input_features))
    inputs_embeds = nn.functional.gelu(self.conv2(inputs_embeds)).permute(0, 2, 1)
    positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    hidden_states = inputs_embeds + self.embed_positions(positions)
    hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
    for layer in self.layers:
        if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
            continue
        hidden_states = layer(hidden_states, None, **kwargs)
    return BaseModelOutput(last_hidden_state=self.layer_norm(hidden_states))


def apply_audio_context(model: nn.Module, mode: AudioContext) -> nn.Module:
    """Put every Whisper encoder inside ``model`` (plain, PEFT-wrapped or DDP-wrapped) in ``mode``."""
    if mode not in AUDIO_CONTEXTS:
        raise ValueError(f"audio context must be one of {AUDIO_CONTEXTS}, got {mode!r}")
    encoders = _whisper_encoders(model)
    if not encoders:
        raise ValueError("no Whisper encoder found in the model")
    for encoder in encoders:
        if mode == "trimmed":
            encoder.forward = types.MethodType(_trimmed_forward, encoder)
        elif "forward" in vars(encoder):
            del encoder.forward  # back to the class's stock forward
    return model


def audio_context_of(model: nn.Module) -> AudioContext:
    """The mode the model's encoder is in."""
    encoders = _whisper_encoders(model)
    return "trimmed" if encoders and "forward" in vars(encoders[0]) else "full"

