"""Transcribers: the one decode path for every model that reaches inference.

A transformers Whisper (base, merged, or base + LoRA adapter) or a CTranslate2 export, decoding
with the language and task forced and a cap on new tokens, as :class:`DecodeOptions` say. In-training
evaluation, ``asr-lora eval``, ``transcribe``, the parity checks of merge/export and the server all
decode through :meth:`HFTranscriber.decode` / :meth:`CT2Transcriber.decode`, so the dev CER in
``metrics.jsonl`` and ``asr-lora eval`` of the same checkpoint on the same rows agree by construction.
Which model a source names, and how it loads, is :mod:`asr_lora.sources`.

Non-speech, as openai/whisper and faster-whisper judge it (:mod:`asr_lora.nospeech`): every
hypothesis carries the probability of the no-speech token at the ``<|startoftranscript|>`` position,
its average log-probability and the compression ratio of its text. A result that is too repetitive
or too unsure is decoded again at the next of ``DecodeOptions.temperatures`` (sampling, seeded); when
no attempt passes, the one kept is the most probable of them (:func:`best_attempt`), never simply the
last sample; a result with ``no_speech_prob`` above ``no_speech_threshold`` that is not confident (``avg_logprob``
at most ``logprob_threshold``, or repetitive) is silence: its text is empty and ``skip_reason`` says
``no_speech``.

Prompts and timestamps (:mod:`asr_lora.prompting`): ``DecodeOptions.prompt`` (or a per-clip
``prompts`` list given to ``decode``) goes before ``<|startoftranscript|>`` as ``<|startofprev|>``
tokens, cut from the left to fit (at most 223 tokens, and the decoder's 448 positions with the cap);
the no-speech probability is then read at the ``<|startoftranscript|>`` position after it.
``DecodeOptions.timestamps`` decodes without ``<|notimestamps|>`` (Whisper's timestamp rules apply)
and each hypothesis gets ``segments``: the model's own timestamped spans inside the clip.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .audio import SAMPLE_RATE, log_mel_spectrogram
from .defaults import MAX_DECODER_TOKENS, TRANSCRIBE_MAX_NEW_TOKENS
from .errors import UserError
from .nospeech import (
    COMPRESSION_RATIO_THRESHOLD,
    LOGPROB_THRESHOLD,
    NO_SPEECH_THRESHOLD,
    compression_ratio,
    is_silent,
    needs_fallback,
    no_speech_token_id,
)
from .prompting import MAX_PROMPT_TOKENS, prompt_ids, timestamp_begin, timestamp_segments
from .settings import ModelSettings
from .trimmed import audio_context_of, feature_padding

PROMPT_LENGTH = 4  # <|startoftranscript|><|lang|><|task|><|notimestamps|>
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # openai/whisper's and faster-whisper's
SAMPLING_SEED = 0  # temperature fallback samples with a fixed seed: the same input gives the same text


@dataclass
class Hypothesis:
    """One decoded piece: its text and the signals that judged it."""

    text: str
    no_speech_prob: float | None = None
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    temperature: float = 0.0
    skip_reason: str | None = None  # why the text is empty: "no_speech" (Whisper's own signal)
    segments: list[dict] | None = None  # with DecodeOptions.timestamps: {"start", "end", "text"} inside the clip

    def to_json(self) -> dict:
        out = {"no_speech_prob": _round(self.no_speech_prob), "avg_logprob": _round(self.avg_logprob),
               "compression_ratio": _round(self.compression_ratio), "temperature": self.temperature}
        if self.skip_reason:
            out["skip_reason"] = self.skip_reason
        return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


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
    # Non-speech and fallback (openai/whisper's defaults; None turns a rule off). Scoring decodes once
    # (temperatures=(0.0,)); transcription and serving fall back through FALLBACK_TEMPERATURES.
    no_speech_threshold: float | None = NO_SPEECH_THRESHOLD
    logprob_threshold: float | None = LOGPROB_THRESHOLD
    compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD
    temperatures: tuple[float, ...] = FALLBACK_TEMPERATURES
    prompt: str | None = None  # initial prompt: text before every clip, as <|startofprev|> tokens
    timestamps: bool = False  # decode with Whisper's timestamp tokens: Hypothesis.segments

    def __post_init__(self):
        if not 1 <= self.max_new_tokens <= MAX_DECODER_TOKENS:
            raise UserError(f"max_new_tokens must be in 1..{MAX_DECODER_TOKENS} (Whisper's decoder has 448 "
                            f"positions), got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise UserError(f"num_beams must be at least 1, got {self.num_beams}")
        self.temperatures = tuple(self.temperatures) or (0.0,)
        if any(t < 0 for t in self.temperatures):
            raise UserError(f"temperatures must be >= 0, got {self.temperatures}")


class Transcriber(Protocol):
    """What eval, transcribe and serve need from a model."""

    description: str
    settings: ModelSettings
    options: DecodeOptions

    def decode(self, audios: list[np.ndarray], references: list[str] | None = None,
               on_encoded: Callable | None = None, prompts: list[str | None] | None = None) -> list[Hypothesis]:
        """Hypotheses for 16 kHz mono float32 clips, each at most 30 s (``prompts``: one per clip,
        instead of ``options.prompt``)."""

    def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        """Transcripts of 16 kHz mono float32 clips, each at most 30 s."""


class _Decoding:
    """What both transcribers share: the resolved language/task, features, the cap."""

    def _setup(self, settings: ModelSettings, options: DecodeOptions | None, description: str) -> None:
        self.settings = settings
        self.options = options or DecodeOptions()
        self.description = description
        self.language = language_code(self.options.language or settings.language)
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
        return [h.text for h in self.decode(audios)] if audios else []

    def prompt_ids(self, text: str | None, cap: int) -> list[int]:
        """``<|startofprev|>`` and ``text``'s last tokens, as many as fit beside the prefix and ``cap``
        new tokens in the decoder's 448 positions (at most 223); ``[]`` without text."""
        room = min(MAX_PROMPT_TOKENS, MAX_DECODER_TOKENS - cap - 1)  # -1: <|startofprev|>
        return prompt_ids(self.tokenizer, text, room)

    def _decode_grouped(self, n: int, prompts: list[str | None] | None, cap: int,
                        decode: Callable[[list[int], list[int]], list[Hypothesis]]) -> list[Hypothesis]:
        """``decode(indices, prompt ids)`` once per distinct prompt of the ``n`` clips, in clip order."""
        prompts = list(prompts) if prompts is not None else [self.options.prompt] * n
        out: list[Hypothesis | None] = [None] * n
        for text in dict.fromkeys(prompts):
            idx = [i for i, p in enumerate(prompts) if p == text]
            for i, h in zip(idx, decode(idx, self.prompt_ids(text, cap))):
                out[i] = h
        return out

    def _segments(self, hyps: list[Hypothesis], ids: list[list[int]], durations: list[float]) -> None:
        """With timestamps: each hypothesis's segments from its generated ids (after the prompt)."""
        if not self.options.timestamps:
            return
        begin, eot = timestamp_begin(self.tokenizer), self._eot
        for h, row, seconds in zip(hyps, ids, durations):
            h.segments = [{"start": a, "end": b, "text": self._text(t).strip()}
                          for a, b, t in timestamp_segments(row, begin, seconds, eot) if self._text(t).strip()]

    def _judge(self, first: list[Hypothesis], redecode: Callable[[list[int], float], list[Hypothesis]]
               ) -> list[Hypothesis]:
        """Temperature fallback for the hypotheses that need it, then the silence rule."""
        o = self.options

        def failed(h: Hypothesis) -> bool:
            return needs_fallback(h.compression_ratio, h.avg_logprob, h.no_speech_prob, o.compression_ratio_threshold,
                                  o.logprob_threshold, o.no_speech_threshold)

        hyps = list(first)
        attempts = [[h] for h in first]
        for temperature in o.temperatures[1:]:
            todo = [i for i, h in enumerate(hyps) if failed(h)]
            if not todo:
                break
            for i, h in zip(todo, redecode(todo, temperature)):
                h.no_speech_prob, h.temperature = hyps[i].no_speech_prob, temperature
                hyps[i] = h
                attempts[i].append(h)
        hyps = [best_attempt(tried, o.compression_ratio_threshold) if len(tried) > 1 and failed(h) else h
                for h, tried in zip(hyps, attempts)]
        for h in hyps:
            if h.text and is_silent(h.no_speech_prob, h.avg_logprob, o.no_speech_threshold, o.logprob_threshold,
                                    h.compression_ratio, o.compression_ratio_threshold or float("inf")):
                h.text, h.skip_reason = "", "no_speech"
        return hyps


def best_attempt(attempts: list[Hypothesis], compression_ratio_threshold: float | None) -> Hypothesis:
    """The attempt to keep when none of a clip's decodings passed the fallback thresholds: the highest
    average log-probability among those under the compression-ratio threshold (among all of them when
    none is), the greedy one included. faster-whisper's rule (``generate_with_fallback``); openai/whisper
    keeps the last attempt instead, which at temperature 1.0 is often a worse sample than greedy's."""
    limit = compression_ratio_threshold if compression_ratio_threshold is not None else float("inf")
    below = [h for h in attempts if (h.compression_ratio or 0.0) <= limit] or attempts
    return max(below, key=lambda h: -float("inf") if h.avg_logprob is None else h.avg_logprob)


@functools.cache
def _cache_arg() -> str:
    """The keyword of a key/value cache in Whisper's forward and generate: ``cache`` in the transformers 5
    releases that deprecated ``past_key_values`` (still taken, with a warning), else ``past_key_values``."""
    import inspect

    from transformers import WhisperForConditionalGeneration

    return "cache" if "cache" in inspect.signature(WhisperForConditionalGeneration.forward).parameters \
        else "past_key_values"


def language_code(value: str) -> str:
    """Whisper's code for a language given as a code (``ko``) or its English name (``korean``), as
    Whisper's ``generate`` takes it; anything else comes back as given, and a model without that
    language token then refuses it by name."""
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    return TO_LANGUAGE_CODE.get(value.strip().lower(), value) if value else value


def _seconds(audios: list[np.ndarray]) -> list[float]:
    return [len(a) / SAMPLE_RATE for a in audios]


def _hypothesis(text: str, avg_lp: float | None, no_speech_p: float | None, temperature: float) -> Hypothesis:
    text = text.strip()
    return Hypothesis(text, no_speech_p, avg_lp, compression_ratio(text) if text else 0.0, temperature)


class SuppressTokens:
    """Whisper's token suppression as one logits processor with precomputed masks: ``suppress`` at
    every step, ``begin_suppress`` at the first generated position (``set_begin_index``, set by
    :meth:`HFTranscriber._generate`). Same effect as transformers' ``SuppressTokensLogitsProcessor`` and
    ``SuppressTokensAtBeginLogitsProcessor``, without their per-step ``torch.isin`` over the vocabulary."""

    def __init__(self, suppress: list[int], begin_suppress: list[int], begin_index: int = 0):
        self.suppress, self.begin_suppress, self.begin_index = list(suppress), list(begin_suppress), begin_index
        self._masks: dict = {}

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = begin_index

    def _mask(self, which: str, scores) -> "torch.Tensor":
        import torch

        tokens = getattr(self, which)
        key = (which, scores.shape[-1], scores.device)
        if key not in self._masks:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            mask[torch.tensor([t for t in tokens if 0 <= t < scores.shape[-1]], dtype=torch.long)] = True
            self._masks[key] = mask
        return self._masks[key]

    def __call__(self, input_ids, scores):
        if self.suppress:
            scores = scores.masked_fill(self._mask("suppress", scores), -float("inf"))
        if self.begin_suppress and input_ids.shape[-1] == self.begin_index:
            scores = scores.masked_fill(self._mask("begin_suppress", scores), -float("inf"))
        return scores


class TokenLogprobs:
    """A logits processor, last before sampling, that keeps the log-probability of each token decoding
    chose: at each step it gathers the previous step's choice (now the last input id) from that step's
    log-softmax, and :meth:`finish` adds the last one. Only one step's log-softmax is kept. These are
    log-probabilities at temperature 1, also when sampling at another temperature, as openai/whisper
    scores a hypothesis (``avg_logprob``)."""

    def __init__(self):
        self._last = None
        self._chosen: list = []

    def __call__(self, input_ids, scores):
        if self._last is not None:
            self._chosen.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        self._last = scores.float().log_softmax(-1)
        return scores

    def finish(self, sequences) -> "torch.Tensor":
        """(clips, generated tokens) log-probabilities, given the final ``sequences``."""
        import torch

        self._chosen.append(self._last.gather(1, sequences[:, -1:]).squeeze(1))
        self._last = None
        return torch.stack(self._chosen, dim=1).cpu()


@dataclass
class Generated:
    """What one generate call gave: ``sequences`` (the decoder prefix of ``prefix_length`` tokens, then
    the generated ones) and either each generated token's log-probability (greedy, sampling) or each
    sequence's length-normalised score (beam search)."""

    sequences: "torch.Tensor"
    prefix_length: int
    token_logprobs: "torch.Tensor | None" = None
    sequence_scores: list[float] | None = None


def column_major_decoder(model) -> Callable[[], None]:
    """On a CPU, store the float weights of the decoder's linear layers and of the output
    projection column-major (same values, same shapes), and return a function that restores them.

    A decoding step multiplies a few rows (one per clip) by each weight. For that shape PyTorch's CPU
    GEMM is about twice as fast on a column-major weight as on ``nn.Linear``'s row-major one (measured
    here at batch 8, one thread: 37 ms against 18 ms for whisper-base's 51,865 x 512 output projection,
    22 against 20 ms at batch 16; ``benchmarks/measure_decoder_layout.py``). Results are the same up to
    summation order.
    Quantized layers, the encoder and GPU models are left alone. Inference models keep the layout;
    training switches it for its evaluation pass and back (a copy each way, values unchanged)."""
    import torch

    whisper = model.get_base_model() if hasattr(model, "get_base_model") else model
    if next(whisper.parameters()).device.type != "cpu":
        return lambda: None
    layers = [m for m in whisper.model.decoder.modules() if type(m) is torch.nn.Linear] + [whisper.proj_out]
    weights = {id(m.weight): m.weight for m in layers if type(m) is torch.nn.Linear}.values()
    moved = [w for w in weights if w.is_floating_point() and w.dim() == 2 and w.is_contiguous()]
    for w in moved:
        w.data = w.data.t().contiguous().t()

    def restore() -> None:
        for w in moved:
            w.data = w.data.contiguous()

    return restore


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
        self.whisper = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.n_mels = self.whisper.config.num_mel_bins
        self.no_speech_id = no_speech_token_id(tokenizer)
        self.sot_id = self.whisper.generation_config.decoder_start_token_id
        self._eot = self.whisper.generation_config.eos_token_id
        config = self.whisper.generation_config
        self._suppress = SuppressTokens(config.suppress_tokens or [], config.begin_suppress_tokens or [])

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
        """Encoder outputs. Generation is given these, never short ``input_features``: Whisper's
        ``generate`` zero-pads those to 3000 frames, which a trimmed-context encoder must not see."""
        import torch

        with torch.no_grad():
            return self.model.get_encoder()(self.features(audios))

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decoder_prefix(self, prompt: list[int] | None = None) -> list[int]:
        """The tokens decoding starts from: ``[*prompt, <|startoftranscript|>, <|lang|>, <|task|>]`` and
        ``<|notimestamps|>`` unless the options ask for timestamps (as Whisper's generate builds them)."""
        config = self.whisper.generation_config
        language = (getattr(config, "lang_to_id", None) or {}).get(f"<|{self.language}|>")
        task = (getattr(config, "task_to_id", None) or {}).get(self.task)
        if language is None or task is None:
            raise UserError(f"{self.description}: the model has no token for language {self.language!r} or task "
                            f"{self.task!r}; check --language (an ISO-639-1 code such as 'ko')")
        ids = [*(prompt or []), self.sot_id, language, task]
        return ids if self.options.timestamps else [*ids, config.no_timestamps_token_id]

    def _generate(self, encoded, cap: int | None = None, temperature: float = 0.0, prompt: list[int] | None = None,
                  cache=None) -> Generated:
        """Decode from encoder outputs with the prefix of :meth:`decoder_prefix`; ``cache``: the
        :meth:`_first_step` cache to go on from.

        This is transformers' generation loop itself (``GenerationMixin.generate``) with the processors
        Whisper's ``generate`` would add for these options: token suppression (:class:`SuppressTokens`) and,
        with timestamps, ``WhisperTimeStampLogitsProcessor``. Whisper's wrapper is skipped because, for
        the log-probabilities through ``output_scores``, it splits every step's scores and the whole
        key/value cache per clip and stacks them again. Greedy decoding of 25 demo test clips, 2 threads,
        through the wrapper and this way, one run: 12.0 against 8.4 s at 30 s context (untuned base),
        1.95 against 1.69 s trimmed (tuned); at batch 8, trimmed, 1 thread, equal within noise. The
        tokens are the same either way (tests). The log-probabilities come from :class:`TokenLogprobs`."""
        import copy

        import torch
        from transformers import GenerationMixin
        from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

        whisper, n = self.whisper, encoded.last_hidden_state.shape[0]
        prefix = self.decoder_prefix(prompt)
        config = copy.deepcopy(whisper.generation_config)
        if cache is not None:  # the first tokens are in the cache already: generate slices them off (as Whisper's)
            config._mask_length = len(prefix)
        beams = self.options.num_beams if temperature == 0 else 1
        record = TokenLogprobs() if beams == 1 else None
        self._suppress.set_begin_index(len(prefix))  # suppression first, then the timestamp rules (as openai/whisper)
        processors = [self._suppress]
        if self.options.timestamps:
            processors.append(WhisperTimeStampLogitsProcessor(config, begin_index=len(prefix)))
        processors += [record] if record else []
        # empty suppression lists: None would be filled in again from the generation config
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "num_beams": 1} if temperature > 0 \
            else {"do_sample": False, "num_beams": beams}
        config.update(max_new_tokens=cap or self.options.max_new_tokens, use_cache=True, suppress_tokens=[],
                      begin_suppress_tokens=[], return_dict_in_generate=beams > 1, output_scores=beams > 1, **sampling)
        start = torch.tensor([prefix] * n, dtype=torch.long, device=encoded.last_hidden_state.device)
        with torch.no_grad():
            out = GenerationMixin.generate(whisper, generation_config=config, encoder_outputs=encoded,
                                           decoder_input_ids=start, logits_processor=processors,
                                           **({_cache_arg(): cache} if cache is not None else {}))
        if beams > 1:  # beam search: its length-normalised scores
            return Generated(out.sequences, len(prefix), sequence_scores=[float(x) for x in out.sequences_scores])
        return Generated(out, len(prefix), token_logprobs=record.finish(out))

    def generate_ids(self, audios: list[np.ndarray], encoded=None, cap: int | None = None):
        """Greedy output ids (batch, tokens) including the forced prompt tokens."""
        return self._generate(encoded if encoded is not None else self.encode(audios), cap).sequences

    def _first_step(self, encoded, prompt: list[int] | None = None) -> tuple[list[float], object]:
        """One decoder step over ``[*prompt, <|startoftranscript|>]``: the probability of the no-speech
        token after ``<|startoftranscript|>`` per clip (raw logits), and the step's key/value cache
        (cross-attention included), from which greedy decoding goes on instead of computing those again."""
        import torch
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        from .nospeech import no_speech_prob

        n, prompt = encoded.last_hidden_state.shape[0], list(prompt or [])
        start = torch.tensor([[*prompt, self.sot_id]] * n, dtype=torch.long, device=encoded.last_hidden_state.device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        with torch.no_grad():
            out = self.model(encoder_outputs=encoded, decoder_input_ids=start, use_cache=True, **{_cache_arg(): cache})
        return no_speech_prob(out.logits, self.no_speech_id, sot_index=len(prompt)).tolist(), cache

    def _hypotheses(self, encoded, cap: int, temperature: float, no_speech: list[float],
                    prompt: list[int] | None = None, durations: list[float] | None = None,
                    cache=None) -> list[Hypothesis]:
        from .nospeech import avg_logprob

        out = self._generate(encoded, cap, temperature, prompt, cache)
        eos = self.whisper.generation_config.eos_token_id
        generated = out.sequences[:, out.prefix_length:]
        if out.sequence_scores is not None:
            sums, lengths = out.sequence_scores, [0] * len(out.sequence_scores)  # length-normalised already
        else:
            sums, lengths = [], []
            for row, scores in zip(generated.tolist(), out.token_logprobs):
                n = row.index(eos) if eos in row else len(row)  # text tokens; the EOT's log-prob counts too
                sums.append(float(scores[: n + 1].sum()))
                lengths.append(n)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        hyps = [_hypothesis(t, avg_logprob(s, n), p, temperature)
                for t, s, n, p in zip(texts, sums, lengths, no_speech)]
        self._segments(hyps, generated.tolist(), durations or [30.0] * len(hyps))
        return hyps

    def decode(self, audios: list[np.ndarray], references: list[str] | None = None,
               on_encoded: Callable | None = None, prompts: list[str | None] | None = None) -> list[Hypothesis]:
        """Hypotheses; ``on_encoded(encoder_outputs)`` lets a caller reuse the encoder pass (the
        teacher-forced dev loss in training); ``prompts``: a prompt per clip instead of the options' one."""
        from transformers.modeling_outputs import BaseModelOutput

        encoded = self.encode(audios)
        if on_encoded is not None:
            on_encoded(encoded)
        cap, seconds = self.cap(references), _seconds(audios)

        def group(idx: list[int], prompt: list[int]) -> list[Hypothesis]:
            subset = encoded if len(idx) == len(audios) else \
                BaseModelOutput(last_hidden_state=encoded.last_hidden_state[idx])
            return self._decode_group(subset, cap, prompt, [seconds[i] for i in idx])

        return self._decode_grouped(len(audios), prompts, cap, group)

    def _decode_group(self, encoded, cap: int, prompt: list[int], seconds: list[float]) -> list[Hypothesis]:
        """Hypotheses of clips that share one prompt: greedy, then the fallback and silence rules."""
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        no_speech, cache = self._first_step(encoded, prompt)
        cache = cache if self.options.num_beams == 1 else None  # beam search expands its own cache

        def redecode(idx: list[int], temperature: float) -> list[Hypothesis]:
            subset = BaseModelOutput(last_hidden_state=encoded.last_hidden_state[idx])
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(SAMPLING_SEED)
                return self._hypotheses(subset, cap, temperature, [no_speech[i] for i in idx], prompt,
                                        [seconds[i] for i in idx])

        return self._judge(self._hypotheses(encoded, cap, 0.0, no_speech, prompt, seconds, cache), redecode)


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
        self._eot = self.tokenizer.token_to_id("<|endoftext|>")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text.strip(), add_special_tokens=False).ids)

    def features(self, audios: list[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(self._features(audios).numpy())

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i < self._timestamp_begin], skip_special_tokens=True)

    @property
    def _timestamp_begin(self) -> int:
        return timestamp_begin(self.tokenizer)

    def start_tokens(self, prompt: list[int] | None = None) -> list[int]:
        """The decoder's first tokens: an optional ``<|startofprev|>`` prompt, then ``self.prompt``
        (``<|startoftranscript|>``, language, task, and ``<|notimestamps|>`` unless decoding timestamps).
        CTranslate2 reads the no-speech probability at the ``<|startoftranscript|>`` after a prompt."""
        return [*(prompt or []), *(self.prompt[:3] if self.options.timestamps else self.prompt)]

    def _results(self, features: np.ndarray, cap: int, temperature: float = 0.0, prompt: list[int] | None = None):
        import ctranslate2

        if temperature > 0:
            ctranslate2.set_random_seed(SAMPLING_SEED)
            sampling = {"beam_size": 1, "sampling_topk": 0, "sampling_temperature": temperature}
        else:
            sampling = {"beam_size": self.options.num_beams}
        # CTranslate2's Whisper decodes at most max_length / 2 tokens (openai's sample_len rule), and
        # fewer for max_length < 6 (measured with 4.8); ask for a little more and cut to the cap.
        start = self.start_tokens(prompt)
        return self.model.generate(ctranslate2.StorageView.from_array(features), [start] * len(features),
                                   max_length=2 * max(cap, 4), suppress_blank=True, suppress_tokens=[-1],
                                   return_scores=True, return_no_speech_prob=True, **sampling)

    def generate_ids(self, audios: list[np.ndarray], cap: int | None = None) -> list[list[int]]:
        """Greedy output ids per clip, without the prompt."""
        cap = cap or self.options.max_new_tokens
        return [r.sequences_ids[0][:cap] for r in self._results(self.features(audios), cap)]

    def _hypotheses(self, features: np.ndarray, cap: int, temperature: float, prompt: list[int] | None = None,
                    durations: list[float] | None = None) -> list[Hypothesis]:
        from .nospeech import avg_logprob

        hyps, all_ids = [], []
        for r in self._results(features, cap, temperature, prompt):
            ids = r.sequences_ids[0][:cap]
            # CTranslate2's score is the summed log-prob over the tokens (EOT included) / their number
            # (length_penalty 1): faster-whisper's reading, then openai's average
            n = len(r.sequences_ids[0])
            hyps.append(_hypothesis(self._text(ids), avg_logprob(r.scores[0] * n, n), r.no_speech_prob, temperature))
            all_ids.append(ids)
        self._segments(hyps, all_ids, durations or [30.0] * len(hyps))
        return hyps

    def decode(self, audios: list[np.ndarray], references: list[str] | None = None,
               on_encoded: Callable | None = None, prompts: list[str | None] | None = None) -> list[Hypothesis]:
        if on_encoded is not None:
            raise ValueError("a CTranslate2 model exposes no encoder outputs (no teacher-forced loss)")
        features, seconds = self.features(audios), _seconds(audios)
        cap = self.cap(references)

        def group(idx: list[int], prompt: list[int]) -> list[Hypothesis]:
            sub = features if len(idx) == len(audios) else np.ascontiguousarray(features[idx])
            secs = [seconds[i] for i in idx]
            return self._judge(self._hypotheses(sub, cap, 0.0, prompt, secs),
                               lambda j, t: self._hypotheses(np.ascontiguousarray(sub[j]), cap, t, prompt,
                                                             [secs[i] for i in j]))

        return self._decode_grouped(len(audios), prompts, cap, group)


def torch_device(device: str | None) -> str:
    """``device``, else "cuda" when there is a GPU, else "cpu"."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")
