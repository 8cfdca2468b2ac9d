"""Whisper's own no-speech signal, as openai/whisper computes and combines it (pure functions).

How openai/whisper decides that a 30 s window holds no speech (``whisper/decoding.py`` and
``whisper/transcribe.py``, release 20250625; faster-whisper does the same with the same defaults):

1. **no_speech_prob.** At the first decoding step the decoder runs over the initial tokens (an
   optional ``<|startofprev|>`` prompt, then ``<|startoftranscript|> <|ko|> <|transcribe|> ...``); the
   probability is read from the logits **at the ``<|startoftranscript|>`` position** (``sot_index``:
   0 without a prompt), i.e. from the distribution of the token that would follow SOT, where the model
   predicts the language token or the no-speech token: ``softmax(logits[:, sot_index])[no_speech]``,
   on the raw logits (before any suppression; the no-speech token is always suppressed for sampling).
   The language/task tokens forced after SOT do not change it: the decoder is causal.
   CTranslate2's ``Whisper.generate(..., return_no_speech_prob=True)`` returns the same number
   (measured on the bundled base: equal to 4 decimals on 5 clips).
2. **avg_logprob.** The log-probabilities of the sampled tokens, each from ``log_softmax`` of the
   logits *after* the logit filters (suppressed tokens, timestamp rules), summed over the text tokens
   and the ``<|endoftext|>``, divided by (number of text tokens + 1). See :func:`avg_logprob`.
3. **compression_ratio** of the decoded text: UTF-8 bytes / zlib-compressed bytes
   (:func:`compression_ratio`); a repetition loop compresses well.
4. **Temperature fallback** (``decode_with_fallback``): decode at temperature 0; the result "needs
   fallback" if ``compression_ratio > 2.4`` (too repetitive) or ``avg_logprob < -1.0``, except that a
   result with ``no_speech_prob > 0.6`` **and** ``avg_logprob < -1.0`` is accepted as silence; then
   retry at 0.2, 0.4, ..., 1.0 (:func:`needs_fallback`).
5. **Skip.** On the final result the window is silent, and skipped with no segment, when
   ``no_speech_prob > no_speech_threshold`` (0.6) **and not** ``avg_logprob > logprob_threshold``
   (-1.0): a high no-speech probability alone is overruled by a confident decoding
   (:func:`is_silent`). Without a logprob threshold, the no-speech probability alone decides.

**Whisper's training target for a segment without speech** (Radford et al. 2022, "Robust Speech
Recognition via Large-Scale Weak Supervision", §2.3 "Multitask format" and Figure 1): after
``<|startoftranscript|>`` the model predicts the language token, or, when the segment holds no speech,
the no-speech token, and the sequence ends there: ``<|startoftranscript|> <|nospeech|> <|endoftext|>``
(no language, task or timestamp token; :func:`no_speech_target`). Segments without speech were kept,
sub-sampled, as training data for voice activity detection (§2.1). openai/whisper ships no training code, but
its inference reads the no-speech probability at exactly the position where this format puts the
token (point 1). The token is spelled ``<|nospeech|>`` in openai/whisper's tiktoken vocabulary and in
newer Hugging Face vocabularies, ``<|nocaptions|>`` in the older multilingual ones (the bundled
base's, id 50362); it is always the id just before ``<|notimestamps|>``.
"""

from __future__ import annotations

import zlib

NO_SPEECH_TOKENS = ("<|nospeech|>", "<|nocaptions|>")  # newer spelling first
NO_SPEECH_THRESHOLD = 0.6  # openai/whisper and faster-whisper default
LOGPROB_THRESHOLD = -1.0  # openai/whisper and faster-whisper default
COMPRESSION_RATIO_THRESHOLD = 2.4  # openai/whisper and faster-whisper default


def _vocab(tokenizer) -> dict[str, int]:
    """Token -> id with the special tokens, for a transformers tokenizer or a ``tokenizers.Tokenizer``."""
    try:
        return tokenizer.get_vocab(with_added_tokens=True)  # tokenizers.Tokenizer
    except TypeError:
        return tokenizer.get_vocab()  # transformers: added tokens included


def no_speech_token_id(tokenizer) -> int:
    """Id of Whisper's no-speech token, ``<|nospeech|>`` or (older multilingual vocabularies)
    ``<|nocaptions|>``, for a transformers Whisper tokenizer or a ``tokenizers.Tokenizer``
    (``tokenizer.json``); ``ValueError`` when the vocabulary has neither."""
    vocab = _vocab(tokenizer)
    for token in NO_SPEECH_TOKENS:
        if token in vocab:
            return vocab[token]
    raise ValueError(f"the tokenizer has no no-speech token ({' or '.join(NO_SPEECH_TOKENS)}); is it Whisper's?")


def no_speech_target(tokenizer) -> list[int]:
    """Whisper's label sequence for a segment without speech:
    ``<|startoftranscript|> <|nospeech|> <|endoftext|>`` (see the module docstring)."""
    vocab = _vocab(tokenizer)
    return [vocab["<|startoftranscript|>"], no_speech_token_id(tokenizer), vocab["<|endoftext|>"]]


def no_speech_prob(logits, no_speech_id: int, sot_index: int = 0):
    """Probability of the no-speech token from decoder ``logits`` (batch, positions, vocab) of the
    initial tokens: the softmax, in float32, at the ``<|startoftranscript|>`` position (``sot_index``,
    0 unless a ``<|startofprev|>`` prompt comes first). Returns a (batch,) tensor."""
    return logits[:, sot_index].float().softmax(dim=-1)[:, no_speech_id]


def avg_logprob(sum_logprob: float, n_text_tokens: int) -> float:
    """openai/whisper's average log-probability of a decoding: the summed log-probabilities of the
    sampled tokens, ``<|endoftext|>`` included, over ``n_text_tokens + 1``."""
    return sum_logprob / (n_text_tokens + 1)


def compression_ratio(text: str) -> float:
    """UTF-8 length of ``text`` over its zlib-compressed length (openai/whisper's ``compression_ratio``);
    above :data:`COMPRESSION_RATIO_THRESHOLD` the text is likely a repetition loop."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def is_silent(no_speech_p: float, avg_lp: float | None, no_speech_threshold: float | None = NO_SPEECH_THRESHOLD,
              logprob_threshold: float | None = LOGPROB_THRESHOLD, compression: float | None = None,
              compression_ratio_threshold: float = COMPRESSION_RATIO_THRESHOLD) -> bool:
    """openai/whisper's skip rule: no speech if ``no_speech_p > no_speech_threshold`` unless the
    decoding is confident (``avg_lp > logprob_threshold``). A ``None`` threshold turns that part off.

    With ``compression`` (the text's :func:`compression_ratio`) given, a repetitive decoding
    (``compression > compression_ratio_threshold``) does not count as confident. openai/whisper gets
    there by re-decoding such a result at higher temperatures first (:func:`needs_fallback`); this is
    the deterministic shortcut. Measured on the bundled base (benchmarks/measure_nospeech.py): greedy
    loops on noise ("아, 아, 아, ...") have avg_logprob near -0.2, so the plain rule keeps them.
    """
    if no_speech_threshold is None or not no_speech_p > no_speech_threshold:
        return False
    if compression is not None and compression > compression_ratio_threshold:
        return True
    return logprob_threshold is None or avg_lp is None or not avg_lp > logprob_threshold


def needs_fallback(compression: float, avg_lp: float, no_speech_p: float,
                   compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD,
                   logprob_threshold: float | None = LOGPROB_THRESHOLD,
                   no_speech_threshold: float | None = NO_SPEECH_THRESHOLD) -> bool:
    """openai/whisper's rule for retrying a decoding at the next temperature: too repetitive
    (``compression > compression_ratio_threshold``) or too unsure (``avg_lp < logprob_threshold``),
    unless it is silence (``no_speech_p > no_speech_threshold`` and ``avg_lp < logprob_threshold``)."""
    unsure = logprob_threshold is not None and avg_lp < logprob_threshold
    if no_speech_threshold is not None and no_speech_p > no_speech_threshold and unsure:
        return False
    repetitive = compression_ratio_threshold is not None and compression > compression_ratio_threshold
    return repetitive or unsure
