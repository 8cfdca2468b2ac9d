"""CTranslate2 -> HF conversion of the bundled Whisper base, and its verification."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from asr_lora import bundled
from asr_lora.bundled import BundledModelError, assemble_and_verify
from asr_lora.convert import ConversionError, build_tokenizer, read_ct2_model

from .conftest import ASSETS, DEMO, bundled_ct2_data_dir

PROMPT = ["<|startoftranscript|>", "<|{lang}|>", "<|transcribe|>", "<|notimestamps|>"]


def test_tokenizer_matches_ct2_vocabulary():
    tok = build_tokenizer(bundled_ct2_data_dir())
    assert len(tok) == 51865
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|ko|>", "<|notimestamps|>", "<|0.00|>", "<|30.00|>"]) == [
        50257, 50264, 50363, 50364, 51864,
    ]
    tok.set_prefix_tokens(language="ko", task="transcribe")
    ids = tok("안녕하세요").input_ids
    assert ids[:4] == [50258, 50264, 50359, 50363] and ids[-1] == 50257
    assert tok.decode(ids, skip_special_tokens=True) == "안녕하세요"


def _clips() -> list[tuple[str, str]]:
    """(path, language): Korean demo test clips and the English/Korean assets."""
    korean = sorted((DEMO / "audio" / "test").glob("*.flac"))[:4]
    return [(str(p), "ko") for p in korean] + [
        (str(ASSETS / "ko_greeting.flac"), "ko"),
        (str(ASSETS / "en_fox.flac"), "en"),
        (str(ASSETS / "en_callback.flac"), "en"),
    ]


@pytest.mark.slow
def test_bundled_matches_ctranslate2(bundled_base, tmp_path):
    """Greedy transcripts of the converted HF model == CTranslate2's on the original model.bin."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from asr_lora.audio import load_audio

    ct2_dir = tmp_path / "ct2"
    ct2_dir.mkdir()
    spec = bundled.BUNDLED["whisper-base"]
    assemble_and_verify(spec, ct2_dir / "model.bin")
    for f in spec.extra_files:
        shutil.copy(bundled_ct2_data_dir() / f, ct2_dir / f)

    model = WhisperForConditionalGeneration.from_pretrained(bundled_base).eval()
    processor = WhisperProcessor.from_pretrained(bundled_base)
    ct2 = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    cap = 64
    clips = _clips()
    assert len(clips) >= 6 and {lang for _, lang in clips} == {"ko", "en"}
    for path, lang in clips:
        feats = processor.feature_extractor(load_audio(path), sampling_rate=16000, return_tensors="pt").input_features
        prompt = processor.tokenizer.convert_tokens_to_ids([t.format(lang=lang) for t in PROMPT])
        with torch.no_grad():
            hf_ids = model.generate(feats, language=lang, task="transcribe", max_new_tokens=cap)[0].tolist()
        result = ct2.generate(ctranslate2.StorageView.from_array(feats.numpy()), [prompt], beam_size=1,
                              max_length=cap, return_logits_vocab=(path == clips[0][0]))[0]
        ct_ids = result.sequences_ids[0]
        hf_ids = [i for i in hf_ids if i != processor.tokenizer.eos_token_id]
        # CTranslate2 may stop earlier at its length cap; everything it produced must agree.
        assert ct_ids and hf_ids[: len(ct_ids)] == ct_ids, path
        if len(hf_ids) < cap // 2:  # finished naturally well inside both caps: whole transcript equal
            assert hf_ids == ct_ids, path
        if path == clips[0][0]:
            ct_logits = np.asarray(result.logits[0]).reshape(-1, model.config.vocab_size)
            with torch.no_grad():
                hf_logits = model(input_features=feats,
                                  decoder_input_ids=torch.tensor([prompt + ct_ids])).logits[0, len(prompt) - 1:]
            hf_logits = hf_logits[: len(ct_logits)].numpy()
            kept = ct_logits > -1e9  # CT2 reports suppressed tokens as -inf / lowest float
            assert kept.mean() > 0.99
            assert np.abs(ct_logits[kept] - hf_logits[kept]).max() < 1e-3


def test_corrupted_part_is_refused(tmp_path, monkeypatch):
    """One byte changed in a part: refused, naming the files and both hashes."""
    spec = bundled.BUNDLED["whisper-base"]
    parts = bundled.part_paths(spec)
    bad = tmp_path / "model.bin.part2"
    shutil.copy(parts[1], bad)
    with open(bad, "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(bundled, "part_paths", lambda s: [parts[0], bad])
    monkeypatch.setenv("ASR_LORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BundledModelError) as err:
        bundled.build_bundled("bundled:whisper-base")
    msg = str(err.value)
    assert str(bad) in msg and spec.sha256 in msg and "sha256" in msg
    got = msg.split("has sha256 ")[1].split()[0]
    assert len(got) == 64 and got != spec.sha256
    # nothing half-built left behind
    models = tmp_path / "cache" / "models"
    assert not bundled.bundled_path("bundled:whisper-base").exists()
    assert list(models.iterdir()) == []


def test_interrupted_build_leaves_no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ASR_LORA_CACHE", str(tmp_path))

    def boom(ct2_dir, out_dir):
        Path(out_dir).mkdir()
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(bundled, "convert_ct2_to_hf", boom)
    with pytest.raises(KeyboardInterrupt):
        bundled.build_bundled("bundled:whisper-base")
    assert not bundled.bundled_path("bundled:whisper-base").exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_non_bundled_names_pass_through(tmp_path):
    assert bundled.resolve_model("openai/whisper-large-v3") == "openai/whisper-large-v3"
    assert bundled.resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(BundledModelError, match="unknown bundled model"):
        bundled.resolve_model("bundled:whisper-huge")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ASR_LORA_CACHE", str(tmp_path / "c"))
    assert bundled.bundled_path("bundled:whisper-base").parent == tmp_path / "c" / "models"
    monkeypatch.delenv("ASR_LORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert bundled.cache_dir() == tmp_path / "x" / "asr-lora"


def test_import_ct2_rejects_incomplete_folder(tmp_path):
    from asr_lora.convert import convert_ct2_to_hf

    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00")
    with pytest.raises(ConversionError, match="missing config.json, tokenizer.json, vocabulary.txt"):
        convert_ct2_to_hf(tmp_path, tmp_path / "out")


def test_truncated_model_bin_is_a_clear_error(tmp_path):
    part = bundled.part_paths(bundled.BUNDLED["whisper-base"])[0]
    with open(part, "rb") as fh:
        (tmp_path / "model.bin").write_bytes(fh.read(5000))
    with pytest.raises(ConversionError, match="truncated"):
        read_ct2_model(tmp_path / "model.bin")
