"""asr_lora.nospeech: the no-speech token in both vocabulary spellings, the probability read at the
<|startoftranscript|> position, openai/whisper's compression ratio and decision rules; on the real base,
generated noise gets a higher no-speech probability than speech."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from asr_lora import nospeech
from asr_lora.audio import load_audio, log_mel_spectrogram

from .conftest import DEMO, bundled_ct2_data_dir

NOCAPTIONS = 50362  # <|nocaptions|> in the bundled (older multilingual) vocabulary


@pytest.fixture(scope="module")
def ct2_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundled_ct2_data_dir() / "tokenizer.json"))


def test_no_speech_token_in_the_bundled_vocabularies(ct2_tokenizer, tiny_whisper):
    from transformers import AutoTokenizer

    assert nospeech.no_speech_token_id(ct2_tokenizer) == NOCAPTIONS
    assert ct2_tokenizer.id_to_token(NOCAPTIONS) == "<|nocaptions|>"
    assert ct2_tokenizer.token_to_id("<|nospeech|>") is None
    hf = AutoTokenizer.from_pretrained(tiny_whisper)
    assert nospeech.no_speech_token_id(hf) == NOCAPTIONS
    # a plain lookup of the newer spelling silently falls back to the unknown token (<|endoftext|>)
    assert hf.convert_tokens_to_ids("<|nospeech|>") != NOCAPTIONS
    assert NOCAPTIONS == hf.convert_tokens_to_ids("<|notimestamps|>") - 1
    assert nospeech.no_speech_target(hf) == hf.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|nocaptions|>", "<|endoftext|>"])
    assert nospeech.no_speech_target(ct2_tokenizer) == nospeech.no_speech_target(hf)


def test_the_newer_spelling_is_found_and_a_vocabulary_without_either_is_an_error(tmp_path):
    from tokenizers import Tokenizer

    text = (bundled_ct2_data_dir() / "tokenizer.json").read_text(encoding="utf-8")
    assert text.count('"<|nocaptions|>"') >= 1
    (tmp_path / "new.json").write_text(text.replace('"<|nocaptions|>"', '"<|nospeech|>"'), encoding="utf-8")
    newer = Tokenizer.from_file(str(tmp_path / "new.json"))
    assert newer.token_to_id("<|nocaptions|>") is None
    assert nospeech.no_speech_token_id(newer) == NOCAPTIONS
    (tmp_path / "none.json").write_text(text.replace('"<|nocaptions|>"', '"<|somethingelse|>"'), encoding="utf-8")
    with pytest.raises(ValueError, match="no no-speech token"):
        nospeech.no_speech_token_id(Tokenizer.from_file(str(tmp_path / "none.json")))


def test_compression_ratio_is_openai_whispers():
    for text in ["", "안녕하세요. 오늘 날씨가 정말 좋네요.", "시원한" * 30, "the quick brown fox " * 3]:
        data = text.encode("utf-8")
        assert nospeech.compression_ratio(text) == len(data) / len(zlib.compress(data))
    assert nospeech.compression_ratio("안녕하세요. 오늘 날씨가 정말 좋네요.") < 1.0
    assert nospeech.compression_ratio("시원한" * 30) > nospeech.COMPRESSION_RATIO_THRESHOLD
    assert nospeech.compression_ratio("이곳은 " * 12) > nospeech.COMPRESSION_RATIO_THRESHOLD
    assert nospeech.compression_ratio("") == 0.0


def test_decision_rules_are_openai_whispers():
    # skip: no_speech_prob > 0.6, unless avg_logprob > -1.0
    assert nospeech.is_silent(0.9, -1.5)
    assert nospeech.is_silent(0.9, -1.0)  # not above the logprob threshold: still skipped
    assert not nospeech.is_silent(0.9, -0.5)  # a confident decoding overrules the no-speech probability
    assert not nospeech.is_silent(0.6, -3.0)  # not above the no-speech threshold
    assert nospeech.is_silent(0.9, -0.5, logprob_threshold=None)
    assert not nospeech.is_silent(0.99, -3.0, no_speech_threshold=None)
    # a confident loop is not confident when its compression ratio is given
    assert nospeech.is_silent(0.8, -0.2, compression=14.9)
    assert not nospeech.is_silent(0.8, -0.2, compression=1.1)
    assert not nospeech.is_silent(0.5, -0.2, compression=14.9)  # the no-speech probability still decides first
    # fallback: repetitive or unsure, except silence
    assert nospeech.needs_fallback(2.5, -0.2, 0.1)
    assert nospeech.needs_fallback(1.0, -1.2, 0.1)
    assert not nospeech.needs_fallback(1.0, -1.2, 0.7)  # silence: accepted as is
    assert nospeech.needs_fallback(2.5, -0.2, 0.7)  # confident but looping: not silence
    assert not nospeech.needs_fallback(1.0, -0.2, 0.1)
    assert nospeech.avg_logprob(-6.0, 5) == -1.0  # the end-of-text token counts


def test_no_speech_prob_is_read_at_the_startoftranscript_position():
    logits = torch.randn(2, 5, 30)
    logits[0, 0, 7] = 10.0  # position 0: the token after SOT
    got = nospeech.no_speech_prob(logits, 7)
    assert got.shape == (2,) and torch.allclose(got, logits[:, 0].softmax(-1)[:, 7])
    assert got[0] > 0.9
    with_prompt = nospeech.no_speech_prob(logits, 7, sot_index=3)  # <|startofprev|> a b <|startoftranscript|> ...
    assert torch.allclose(with_prompt, logits[:, 3].softmax(-1)[:, 7])
    assert nospeech.no_speech_prob(logits.half(), 7).dtype == torch.float32


def test_forced_tokens_after_sot_do_not_change_it(tiny_whisper):
    """The decoder is causal: reading at SOT over the whole forced prefix equals a run on SOT alone."""
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    tok = AutoTokenizer.from_pretrained(tiny_whisper)
    prefix = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|ko|>", "<|transcribe|>", "<|notimestamps|>"])
    features, _ = log_mel_spectrogram([load_audio(DEMO / "audio" / "dev" / "demo-dev-0001.flac")])
    with torch.no_grad():
        full = model(input_features=features, decoder_input_ids=torch.tensor([prefix])).logits
        sot = model(input_features=features, decoder_input_ids=torch.tensor([prefix[:1]])).logits
    token = nospeech.no_speech_token_id(tok)
    assert torch.allclose(nospeech.no_speech_prob(full, token), nospeech.no_speech_prob(sot, token), atol=1e-6)


@pytest.mark.slow
def test_real_base_gives_noise_a_higher_no_speech_prob_than_speech(bundled_base):
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(bundled_base).eval()
    tok = AutoTokenizer.from_pretrained(bundled_base)
    rows = [json.loads(line) for line in (DEMO / "dev.jsonl").read_text(encoding="utf-8").splitlines()][:2]
    speech = [load_audio(DEMO / r["audio"]) for r in rows]
    rng = np.random.default_rng(0)
    noise = [(rng.standard_normal(5 * 16000) * 0.03).astype(np.float32)]  # white noise, -30 dBFS RMS
    t = np.arange(5 * 16000) / 16000
    hum = [(0.05 * sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 8))).astype(np.float32)]  # 50 Hz hum
    features, _ = log_mel_spectrogram(speech + noise + hum, padding="max_length")
    prefix = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|ko|>", "<|transcribe|>", "<|notimestamps|>"])
    with torch.no_grad():
        logits = model(input_features=features, decoder_input_ids=torch.tensor([prefix] * 4)).logits
    p = nospeech.no_speech_prob(logits, nospeech.no_speech_token_id(tok)).tolist()
    speech_p, noise_p, hum_p = p[:2], p[2], p[3]
    assert noise_p > max(speech_p) + 0.2 and hum_p > max(speech_p) + 0.2, p
