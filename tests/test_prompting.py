"""Timestamps and prompts kept: training labels, deterministic draws, kspon --prompts, resume, decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asr_lora.audio import SAMPLE_RATE, load_audio
from asr_lora.data.collator import IGNORE_INDEX, WhisperCollator
from asr_lora.prompting import MAX_PROMPT_TOKENS, draw, prompt_ids, timestamp_id, timestamp_segments
from asr_lora.settings import ModelSettings

from .conftest import ASSETS, DEMO, demo_rows, make_row, write_manifest

GREETING = ASSETS / "ko_greeting.flac"
PROMPT = "카메라를 새로 샀어요"


@pytest.fixture(scope="module")
def tokenizer(tiny_whisper):
    from transformers import WhisperTokenizer

    return WhisperTokenizer.from_pretrained(tiny_whisper)


def ids(tokenizer, *tokens: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(tokens))


def test_timestamped_label_exact_ids(tokenizer):
    """timestamp_probability 1: <|ko|><|transcribe|><|0.00|> text <|T|><|endoftext|>, T the clip's
    duration on the 0.02 s grid, no <|notimestamps|>; the model's own shift is right (no decoder_input_ids)."""
    row = make_row("a", GREETING, "안녕하세요")
    batch = WhisperCollator(tokenizer, timestamp_probability=1.0)([row], keys=[(0, 0)])
    seconds = len(load_audio(GREETING)) / SAMPLE_RATE
    ko, transcribe, t0, eot = ids(tokenizer, "<|ko|>", "<|transcribe|>", "<|0.00|>", "<|endoftext|>")
    text = tokenizer.encode("안녕하세요", add_special_tokens=False)
    end = ids(tokenizer, f"<|{round(seconds / 0.02) * 0.02:.2f}|>")[0]
    assert tokenizer.convert_ids_to_tokens(end) == "<|3.54|>"  # 3.5498 s: the nearest grid point
    assert batch["labels"].tolist() == [[ko, transcribe, t0, *text, end, eot]]
    assert "decoder_input_ids" not in batch
    assert timestamp_id(tokenizer, 31.0) == ids(tokenizer, "<|30.00|>")[0]


def test_prompt_tokens_carry_no_loss_and_decoder_inputs_start_with_them(tokenizer):
    """prompt_probability 1: the decoder reads <|startofprev|> prompt <|startoftranscript|> ...; the
    labels are -100 over the prompt and line up with the decoder inputs shifted by one."""
    rows = [make_row("a", GREETING, "안녕하세요", extra={"prompt": PROMPT}),
            make_row("b", ASSETS / "en_fox.flac", "fox")]
    batch = WhisperCollator(tokenizer, prompt_probability=1.0)(rows, keys=[(0, 0), (0, 1)])
    sop, sot, ko, transcribe, nots, eot = ids(tokenizer, "<|startofprev|>", "<|startoftranscript|>", "<|ko|>",
                                             "<|transcribe|>", "<|notimestamps|>", "<|endoftext|>")
    prompt = tokenizer.encode(" " + PROMPT, add_special_tokens=False)
    text = tokenizer.encode("안녕하세요", add_special_tokens=False)
    n = len(prompt) + 1
    assert batch["decoder_input_ids"][0].tolist() == [sop, *prompt, sot, ko, transcribe, nots, *text]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * n + [ko, transcribe, nots, *text, eot]
    # the row without a prompt: what the model's own shift would give, padded
    fox = tokenizer.encode("fox", add_special_tokens=False)
    width = batch["labels"].shape[1]
    assert batch["labels"][1].tolist() == [ko, transcribe, nots, *fox, eot] + [IGNORE_INDEX] * (width - 4 - len(fox))
    assert batch["decoder_input_ids"][1].tolist()[:4 + len(fox)] == [sot, ko, transcribe, nots, *fox]
    for inputs, labels in zip(batch["decoder_input_ids"].tolist(), batch["labels"].tolist()):
        counted = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
        assert all(labels[i] == inputs[i + 1] for i in counted[:-1])  # teacher forcing lines up


def test_prompt_loss_counts_only_the_transcript(tiny_whisper, tokenizer):
    """The training loss of a prompted row is the loss over its transcript tokens, read after the prompt:
    equal to a cross-entropy computed by hand on the logits of the positions after <|startoftranscript|>."""
    from transformers import WhisperForConditionalGeneration

    from asr_lora.train import decoder_inputs, token_loss_sum

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    row = make_row("a", GREETING, "안녕하세요", extra={"prompt": PROMPT})
    batch = WhisperCollator(tokenizer, prompt_probability=1.0)([row], keys=[(0, 0)])
    with torch.no_grad():
        out = model(input_features=batch["input_features"], labels=batch["labels"], **decoder_inputs(batch, "cpu"))
    loss, n = token_loss_sum(out.logits, batch["labels"])
    plain = WhisperCollator(tokenizer)([row])["labels"][0]
    n_prompt = len(tokenizer.encode(" " + PROMPT, add_special_tokens=False)) + 1
    by_hand = torch.nn.functional.cross_entropy(out.logits[0, n_prompt:], plain, reduction="sum")
    assert n == len(plain) and torch.allclose(loss, by_hand)


def test_long_prompts_are_cut_from_the_left_to_fit(tokenizer):
    words = " ".join(f"단어{i}" for i in range(400))
    assert len(prompt_ids(tokenizer, words)) == MAX_PROMPT_TOKENS + 1
    assert tokenizer.decode(prompt_ids(tokenizer, words)[1:]).strip().endswith("단어399")
    row = make_row("a", GREETING, "안녕하세요", extra={"prompt": words})
    collator = WhisperCollator(tokenizer, prompt_probability=1.0, max_label_tokens=40)
    inputs, labels = collator.training_sequence(row, 3.5, (0, 0))
    n_prompt = labels.count(IGNORE_INDEX)
    assert len(inputs) == len(labels) == 39  # the 40 tokens of the sequence, less one: inputs and shifted labels
    assert n_prompt == 40 - len(collator.label_ids("안녕하세요")) - 1
    assert tokenizer.decode(inputs[1:n_prompt]).strip().endswith("단어399")


def test_draws_are_deterministic_per_seed_epoch_and_row(tokenizer):
    assert draw(42, 3, 7, "prompt") == draw(42, 3, 7, "prompt")
    assert len({draw(42, e, 7, "prompt") for e in range(5)}) == 5
    assert draw(42, 0, 7, "prompt") != draw(42, 0, 7, "timestamps") != draw(43, 0, 7, "timestamps")
    share = np.mean([draw(0, 0, i, "timestamps") < 0.2 for i in range(2000)])
    assert 0.17 < share < 0.23
    collator = WhisperCollator(tokenizer, timestamp_probability=0.5, prompt_probability=0.5, seed=1)
    rows = [make_row(f"r{i}", GREETING, "안녕하세요", extra={"prompt": PROMPT}) for i in range(12)]
    keys = [(0, i) for i in range(12)]
    a, b = collator(rows, keys), collator(rows, keys)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["decoder_input_ids"], b["decoder_input_ids"])
    starts = [collator.training_sequence(r, 3.5, k)[1][0] == IGNORE_INDEX for r, k in zip(rows, keys)]
    assert 0 < sum(starts) < 12  # some rows prompted, some not
    nonspeech = make_row("n", GREETING, "", extra={"nonspeech": True})
    label = collator.row_label(nonspeech)
    assert collator.training_sequence(nonspeech, 3.5, (0, 0)) == ([ids(tokenizer, "<|startoftranscript|>")[0],
                                                                   *label[:-1]], label)
    # without keys (evaluation): the plain labels, whatever the probabilities
    assert collator([rows[0]])["labels"][0].tolist() == collator.row_label(rows[0])


def test_timestamp_segments_read_as_openai_does():
    begin, eot = 1000, 999
    ts = lambda s: begin + round(s / 0.02)  # noqa: E731
    assert timestamp_segments([ts(0), 1, 2, ts(1.2), ts(1.2), 3, ts(2.0), eot, 5], begin, 3.0, eot) == [
        (0.0, 1.2, [1, 2]), (1.2, 2.0, [3])]
    # text after a closing timestamp opens a segment there; one left open ends at the clip's end;
    # times past the clip are clamped and stay monotonic
    assert timestamp_segments([ts(0), 1, ts(1.0), 2, ts(5.0), 3], begin, 2.5, eot) == [
        (0.0, 1.0, [1]), (1.0, 2.5, [2]), (2.5, 2.5, [3])]
    assert timestamp_segments([1, 2], begin, 2.5) == [(0.0, 2.5, [1, 2])]


def test_manifest_prompt_field_read_kept_and_checked(tiny_whisper, tmp_path):
    from asr_lora.data.manifest import prepare_manifest, read_rows

    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": "a", "audio": str(GREETING), "text": "안녕하세요", "prompt": PROMPT},
        {"id": "b", "audio": str(GREETING), "text": "안녕하세요"},
        {"id": "c", "audio": str(GREETING), "text": "안녕하세요", "prompt": 3}])
    rows, bad = read_rows(manifest, strict=False)
    assert [r.prompt for r in rows] == [PROMPT, None]
    assert [b.reason for b in bad] == ["malformed_line"] and "prompt" in bad[0].detail
    prepare_manifest(Path(manifest), tmp_path / "out", str(tiny_whisper), progress=False)
    kept = [json.loads(line) for line in (tmp_path / "out" / "m.jsonl").read_text().splitlines()]
    assert [r.get("prompt") for r in kept] == [PROMPT, None]


# --------------------------------------------------------------------------- kspon --prompts


def test_kspon_prompts_fill_the_previous_text_of_the_same_session(tmp_path):
    from asr_lora.cli import main

    second = 16_000 * 2
    listing = [("KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000001.pcm", "어/ 안녕"),
               ("KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000002.pcm", "b/ n/"),  # noise only: dropped
               ("KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000003.pcm", "반가워"),
               ("KsponSpeech_01/KsponSpeech_0001/KsponSpeech_000004.pcm", "(3시)/(세 시)에 봐"),
               ("KsponSpeech_01/KsponSpeech_0002/KsponSpeech_001001.pcm", "다른 대화야")]
    root = tmp_path / "kspon"
    for rel, _ in listing:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(bytes(second))
    (root / "scripts").mkdir()
    (root / "scripts" / "train.trn").write_text("".join(f"{rel} :: {raw}\n" for rel, raw in listing), encoding="utf-8")
    assert main(["prepare", "kspon", "--root", str(root), "--out", str(tmp_path / "out"), "--prompts",
                 "--workers", "1", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["text"], r.get("prompt")) for r in rows] == [
        ("KsponSpeech_000001", "어 안녕", None),
        ("KsponSpeech_000003", "반가워", "어 안녕"),
        ("KsponSpeech_000004", "3시에 봐", "반가워"),
        ("KsponSpeech_001001", "다른 대화야", None)]  # another session (folder): no prompt
    assert main(["prepare", "kspon", "--root", str(root), "--out", str(tmp_path / "plain"), "--workers", "1",
                 "--no-progress"]) == 0
    assert "prompt" not in (tmp_path / "plain" / "train.jsonl").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def prompted_data(tmp_path_factory):
    """8 demo train rows, each with the previous row's text as its prompt, and 3 dev rows."""
    folder = tmp_path_factory.mktemp("prompted")

    train = demo_rows("train", 8)
    for before, row in zip(train, train[1:]):
        row["prompt"] = before["text"]
    return write_manifest(folder / "train.jsonl", train), write_manifest(folder / "dev.jsonl", demo_rows("dev", 3))


def test_training_with_timestamps_and_prompts_resumes_exactly(tiny_whisper, prompted_data, tmp_path, monkeypatch):
    """Both probabilities at 0.5 with 2 background workers: a run stopped after step 2 and resumed has
    the losses and weights of a straight run loading in the loop, bit for bit, across an epoch; the
    dev loss (plain labels) is recorded."""
    from asr_lora.train import Trainer, run_training

    from .test_train import lora_weights, losses, recipe

    args = ["train.max_steps=5", "train.batch_size=3", "train.eval_every=5", "train.save_every=1",
            "train.timestamp_probability=0.5", "train.prompt_probability=0.5", "model.audio_context=trimmed"]
    straight = tmp_path / "straight"
    run_training(recipe(tiny_whisper, prompted_data, straight, *args, "train.num_workers=0"), progress=False)
    original = Trainer.save_checkpoint

    def stop_after_2(self, metrics=None):
        path = original(self, metrics)
        if self.state.step == 2:
            raise KeyboardInterrupt("simulated stop")
        return path

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(Trainer, "save_checkpoint", stop_after_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(recipe(tiny_whisper, prompted_data, interrupted, *args, "train.num_workers=2"), progress=False)
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    trainer = run_training(recipe(tiny_whisper, prompted_data, interrupted, *args, "train.num_workers=2"),
                           resume=True, progress=False)
    assert trainer.state.epoch >= 1
    assert losses(interrupted) == losses(straight) and list(losses(straight)) == [1, 2, 3, 4, 5]
    for key, value in lora_weights(straight, "final").items():
        assert torch.equal(value, lora_weights(interrupted, "final")[key]), key
    evals = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines() if "cer" in line]
    assert evals and np.isfinite(evals[-1]["eval_loss"])
    # the draws reached the training batches: the same run without them has other losses
    plain = tmp_path / "plain"
    run_training(recipe(tiny_whisper, prompted_data, plain, *args[:4], "model.audio_context=trimmed"), progress=False)
    assert losses(plain)[1] != losses(straight)[1]


def test_probabilities_are_checked():
    from asr_lora.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="timestamp_probability"):
        load_recipe(None, ["train.timestamp_probability=1.5"])


# --------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def tiny_ct2(tiny_whisper, tmp_path_factory) -> Path:
    from ctranslate2.converters import TransformersConverter

    out = tmp_path_factory.mktemp("tiny-ct2") / "model"
    TransformersConverter(str(tiny_whisper), copy_files=["tokenizer.json"]).convert(str(out), quantization="float32")
    return out


def test_prompt_changes_the_decoder_input_hf_and_ct2(tiny_whisper, tiny_ct2, monkeypatch):
    """--prompt puts <|startofprev|> tokens before <|startoftranscript|> in both backends; the no-speech
    probability is read at the <|startoftranscript|> after them, and HF and CTranslate2 agree on it."""
    from transformers import WhisperForConditionalGeneration, WhisperTokenizer

    from asr_lora.backends import CT2Transcriber, DecodeOptions, HFTranscriber
    from asr_lora.settings import ModelSettings

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    tok = WhisperTokenizer.from_pretrained(tiny_whisper)
    audio = [load_audio(GREETING)]
    options = DecodeOptions(prompt=PROMPT, max_new_tokens=4, temperatures=(0.0,))
    hf = HFTranscriber(model, tok, ModelSettings(), options)
    prompt = hf.prompt_ids(PROMPT, 4)
    assert prompt == [tok.convert_tokens_to_ids("<|startofprev|>"),
                      *tok.encode(" " + PROMPT, add_special_tokens=False)]
    seen = []
    generate = hf._generate
    monkeypatch.setattr(hf, "_generate", lambda *a, **kw: seen.append(generate(*a, **kw)) or seen[-1])
    with_prompt = hf.decode(audio)[0]
    assert seen[0].sequences[0, :len(prompt) + 1].tolist() == [*prompt, hf.sot_id]  # what the decoder read
    assert seen[0].prefix_length == len(prompt) + 4  # then <|lang|><|task|><|notimestamps|>
    without = HFTranscriber(model, tok, ModelSettings(), DecodeOptions(max_new_tokens=4, temperatures=(0.0,)))
    no_prompt = without.decode(audio)[0]
    assert with_prompt.no_speech_prob != pytest.approx(no_prompt.no_speech_prob, rel=1e-3)
    assert with_prompt.text != no_prompt.text

    ct2 = CT2Transcriber(tiny_ct2, ModelSettings(), options, device="cpu")
    assert ct2.start_tokens(prompt) == [*prompt, *ct2.prompt] and ct2.prompt[0] == tok.convert_tokens_to_ids(
        "<|startoftranscript|>")
    calls = []
    original = ct2.model.generate
    monkeypatch.setattr(ct2, "model", type("M", (), {"generate": lambda self, f, p, **kw: calls.append(p) or
                                                     original(f, p, **kw)})())
    ct2_hyp = ct2.decode(audio)[0]
    assert calls[0] == [[*prompt, *ct2.prompt]]
    assert ct2_hyp.no_speech_prob == pytest.approx(with_prompt.no_speech_prob, rel=1e-3)
    ct2_plain = CT2Transcriber(tiny_ct2, ModelSettings(), DecodeOptions(max_new_tokens=4, temperatures=(0.0,)),
                               device="cpu").decode(audio)[0]
    assert ct2_plain.no_speech_prob == pytest.approx(no_prompt.no_speech_prob, rel=1e-3)


@pytest.mark.slow
def test_transcribe_timestamps_cues_inside_the_pieces_real_base(bundled_base, tmp_path):
    """The real base with --timestamps: a file of two utterances 3 s apart gives cues from the model's
    own timestamps, monotonic, each inside a VAD piece, and finer than the pieces' boundaries."""
    import soundfile as sf

    from asr_lora.cli import main
    from asr_lora.vad import vad_pieces

    rows = [json.loads(line) for line in (DEMO / "test.jsonl").read_text(encoding="utf-8").splitlines()][:2]
    gap = np.zeros(3 * SAMPLE_RATE, dtype=np.float32)
    audio = np.concatenate([load_audio(DEMO / rows[0]["audio"]), gap, load_audio(DEMO / rows[1]["audio"])])
    sf.write(tmp_path / "two.wav", audio, SAMPLE_RATE)
    out = tmp_path / "out"
    assert main(["transcribe", str(tmp_path / "two.wav"), "--model", str(bundled_base), "--format", "json",
                 "--out", str(out), "--timestamps", "--no-progress", "--no-fallback"]) == 0
    cues = [s for s in json.loads((out / "two.json").read_text())["segments"] if s["text"]]
    pieces = [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b, speech in vad_pieces(audio) if speech]
    assert cues and len(pieces) >= 1
    for cue in cues:
        assert any(a - 1e-3 <= cue["start"] <= cue["end"] <= b + 1e-3 for a, b in pieces), (cue, pieces)
    starts = [c["start"] for c in cues]
    assert starts == sorted(starts) and all(x["end"] <= y["start"] + 1e-3 for x, y in zip(cues, cues[1:]))
    # the cues come from timestamp tokens: not just the VAD pieces' boundaries
    assert {(c["start"], c["end"]) for c in cues} != {(round(a, 3), round(b, 3)) for a, b in pieces}
    assert main(["transcribe", str(tmp_path / "two.wav"), "--model", str(bundled_base), "--format", "srt",
                 "--out", str(tmp_path / "srt"), "--timestamps", "--no-progress", "--no-fallback"]) == 0
    assert (tmp_path / "srt" / "two.srt").read_text().count(" --> ") == len(cues)


class PromptSpy:
    """Answers each piece with its index; records the prompts it was given; piece 1 needs temperature 0.8."""

    settings = ModelSettings(audio_context="full")

    def __init__(self, prompt=None):
        from asr_lora.backends import DecodeOptions

        self.options, self.prompts, self.n = DecodeOptions(prompt=prompt), [], 0

    def decode(self, pieces, prompts=None):
        from asr_lora.backends import Hypothesis

        self.prompts += list(prompts or [None] * len(pieces))
        out = [Hypothesis(f"piece{self.n + k}", temperature=0.8 if self.n + k == 1 else 0.0) for k in range(len(pieces))]
        self.n += len(pieces)
        return out


def test_condition_on_previous_text_chains_pieces_and_restarts_after_a_hot_fallback(tmp_path):
    import soundfile as sf

    from asr_lora.transcribe import Item, Writer, transcribe_items

    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(100 * SAMPLE_RATE) * 0.1).astype(np.float32)  # 4 windows of 25-30 s
    sf.write(tmp_path / "long.wav", audio, SAMPLE_RATE)
    items = [Item(str(tmp_path / "long.wav"), str(tmp_path / "long.wav"))]
    spy = PromptSpy(prompt="이름")
    writer = Writer("json", tmp_path / "out", "ko", None)
    assert transcribe_items(spy, items, writer, progress=False, split="windows", vad=False,
                            condition_on_previous_text=True) == []
    assert spy.prompts == ["이름", "이름 piece0", "이름", "이름 piece2"]  # piece1 needed t=0.8: the chain restarts
    doc = json.loads((tmp_path / "out" / "long.json").read_text())
    assert [s["text"] for s in doc["segments"]] == ["piece0", "piece1", "piece2", "piece3"]
    spy = PromptSpy()  # off: batched, no prompts
    assert transcribe_items(spy, items, Writer("json", tmp_path / "off", "ko", None), progress=False,
                            split="windows", vad=False) == []
    assert spy.prompts == [None] * 4
