"""Collator: labels with the language/task prefix, -100 padding, both padding modes, bad rows skipped."""

from __future__ import annotations

import pytest
import torch

from asr_lora.audio import load_audio, log_mel_spectrogram
from asr_lora.data.collator import IGNORE_INDEX, WhisperCollator

from .conftest import ASSETS, make_row


@pytest.fixture(scope="module")
def tokenizer(tiny_whisper):
    from transformers import WhisperTokenizer

    return WhisperTokenizer.from_pretrained(tiny_whisper)


def rows():
    return [make_row("a", ASSETS / "ko_greeting.flac", "안녕하세요"),
            make_row("b", ASSETS / "en_fox.flac", "the quick brown fox")]


def test_labels_prefix_and_padding(tokenizer):
    batch = WhisperCollator(tokenizer)(rows())
    labels = batch["labels"]
    ko, transcribe, notimestamps, eot = tokenizer.convert_tokens_to_ids(
        ["<|ko|>", "<|transcribe|>", "<|notimestamps|>", "<|endoftext|>"])
    # <|startoftranscript|> is dropped: the model prepends decoder_start_token_id when shifting
    assert labels[:, :3].tolist() == [[ko, transcribe, notimestamps]] * 2
    first = [t for t in labels[0].tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(first[3:-1]) == "안녕하세요" and first[-1] == eot
    assert (labels == IGNORE_INDEX).sum() > 0  # the shorter row is padded with -100 only at the end
    short = labels[0] if len(first) < labels.shape[1] else labels[1]
    pad_start = (short != IGNORE_INDEX).sum()
    assert (short[pad_start:] == IGNORE_INDEX).all()
    assert batch["ids"] == ["a", "b"] and batch["skipped"] == []


def test_model_loss_uses_labels(tiny_whisper, tokenizer):
    """The labels drive a finite loss; the model's shift prepends <|startoftranscript|>."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper)
    batch = WhisperCollator(tokenizer)(rows())
    out = model(input_features=batch["input_features"], labels=batch["labels"])
    assert torch.isfinite(out.loss)


def test_max_length_mode_equals_feature_extractor_padding(tokenizer):
    from transformers import WhisperFeatureExtractor

    batch = WhisperCollator(tokenizer, padding="max_length")(rows())
    assert batch["input_features"].shape == (2, 80, 3000)
    ref = WhisperFeatureExtractor(feature_size=80)(
        [load_audio(r.audio) for r in rows()], sampling_rate=16000, return_tensors="pt").input_features
    assert (batch["input_features"] - ref).abs().max() < 1e-4
    # silence padding is the extractor's value, not zeros
    assert batch["input_features"][0, :, -1].abs().min() > 0


def test_longest_mode_pads_to_batch(tokenizer):
    batch = WhisperCollator(tokenizer, padding="longest", pad_to_multiple_of=8)(rows())
    longest = max(len(load_audio(r.audio)) for r in rows())
    frames = batch["input_features"].shape[-1]
    assert frames % 8 == 0 and frames >= longest / 160 and frames < longest / 160 + 9
    full = WhisperCollator(tokenizer, padding="max_length")(rows())["input_features"]
    assert torch.allclose(batch["input_features"], full[..., :frames], atol=1e-5)


def test_bad_rows_are_skipped_not_fatal(tokenizer, tmp_path):
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"garbage")
    data = rows() + [
        make_row("missing", tmp_path / "nope.wav", "없음"),
        make_row("broken", broken, "깨짐"),
        make_row("long", ASSETS / "ko_greeting.flac", "가 " * 500),
    ]
    batch = WhisperCollator(tokenizer, max_label_tokens=448)(data)
    assert batch["ids"] == ["a", "b"]
    assert [uid for uid, _ in batch["skipped"]] == ["missing", "broken", "long"]
    assert "nope.wav" in batch["skipped"][0][1] and "448" in batch["skipped"][2][1]
    assert batch["input_features"].shape[0] == batch["labels"].shape[0] == 2


def test_segment_rows(tokenizer):
    row = make_row("seg", ASSETS / "ko_greeting.flac", "안녕", offset=0.5, end=1.5)
    batch = WhisperCollator(tokenizer, padding="longest")([row])
    assert batch["n_frames"].tolist() == [100]
    expected, _ = log_mel_spectrogram([load_audio(row.audio, offset=0.5, end=1.5)], padding="longest",
                                      pad_to_multiple_of=2)
    assert torch.allclose(batch["input_features"], expected)


def test_nonspeech_row_targets_whispers_nospeech_token(tokenizer):
    """An intended non-speech row is trained towards Whisper's own target: <|startoftranscript|> then
    <|nospeech|> (<|nocaptions|> in this vocabulary) and <|endoftext|>, no language or task token."""
    from asr_lora.nospeech import no_speech_token_id

    row = make_row("noise", ASSETS / "ko_greeting.flac", "", extra={"nonspeech": True})
    batch = WhisperCollator(tokenizer)([row] + rows())
    first = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert first == [no_speech_token_id(tokenizer), tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(first[0]) in ("<|nocaptions|>", "<|nospeech|>")
    assert batch["ids"] == ["noise", "a", "b"]


def test_forced_nonspeech_rows_read_the_prefix_and_target_the_uniform(tokenizer, tiny_whisper):
    """train.nonspeech_forced_probability: a drawn non-speech row reads <|startoftranscript|><|ko|>
    <|transcribe|> and <|notimestamps|> (or <|0.00|> when its timestamp draw says so), with no loss on
    the prefix and one UNSURE label at the first text position, whose loss is the cross-entropy to the
    uniform distribution; speech rows in the same batch are unchanged; the draws are keyed."""
    from transformers import WhisperForConditionalGeneration

    from asr_lora.data.collator import UNSURE_INDEX
    from asr_lora.nospeech import no_speech_token_id
    from asr_lora.prompting import draw, timestamp_id
    from asr_lora.train import decoder_inputs, token_loss_sum

    noise = make_row("noise", ASSETS / "ko_greeting.flac", "", extra={"nonspeech": True})
    speech = rows()
    keys = [(0, 7), (0, 1), (0, 2)]
    batch = WhisperCollator(tokenizer, nonspeech_forced_probability=1.0)([noise, *speech], keys=keys)
    plain = WhisperCollator(tokenizer)([noise, *speech], keys=keys)
    prefix = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|ko|>", "<|transcribe|>", "<|notimestamps|>"])
    assert batch["decoder_input_ids"][0, :4].tolist() == prefix
    assert batch["labels"][0].tolist()[:4] == [IGNORE_INDEX] * 3 + [UNSURE_INDEX]
    assert set(batch["labels"][0].tolist()[4:]) <= {IGNORE_INDEX}
    assert torch.equal(batch["labels"][1:], plain["labels"][1:])
    assert plain["labels"][0].tolist()[:2] == [no_speech_token_id(tokenizer), tokenizer.eos_token_id]
    for k in (1, 2):  # speech rows read their own labels, shifted right
        n = int((batch["labels"][k] != IGNORE_INDEX).sum())
        assert batch["decoder_input_ids"][k, 1:n].tolist() == batch["labels"][k, : n - 1].tolist()

    stamped = WhisperCollator(tokenizer, nonspeech_forced_probability=1.0, timestamp_probability=1.0)([noise], keys=[(0, 7)])
    assert stamped["decoder_input_ids"][0].tolist() == [*prefix[:3], timestamp_id(tokenizer, 0.0)]

    half = WhisperCollator(tokenizer, nonspeech_forced_probability=0.5, seed=3)
    forced = [UNSURE_INDEX in half([noise], keys=[(0, i)])["labels"][0].tolist() for i in range(40)]
    assert forced == [draw(3, 0, i, "nonspeech_forced") < 0.5 for i in range(40)] and 5 < sum(forced) < 35

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    with torch.no_grad():
        out = model(input_features=batch["input_features"], **decoder_inputs(batch, "cpu"))
    loss, n = token_loss_sum(out.logits, batch["labels"])
    z = out.logits[0, 3]
    uniform = -torch.log_softmax(z, -1).mean()
    speech_labels = batch["labels"][1:]
    by_hand = torch.nn.functional.cross_entropy(out.logits[1:].reshape(-1, z.shape[-1]), speech_labels.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
    assert n == 1 + int((speech_labels != IGNORE_INDEX).sum())
    assert torch.allclose(loss, uniform + by_hand, rtol=1e-5)
