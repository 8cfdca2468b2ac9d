"""Trimmed audio context: encoder equivalence, no leaked state, the mode travels with the adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from asr_lora.trimmed import apply_audio_context, audio_context_of


def encode(model, features):
    return model.get_encoder()(features)


@pytest.fixture(scope="module")
def model(tiny_whisper):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()


def stock_encoder_with_sliced_positions(model, features):
    """Reference: a copy of the model whose position table is cut to N/2 rows, run by the stock HF encoder."""
    ref = copy.deepcopy(model)
    n = features.shape[-1] // 2
    enc = ref.model.encoder
    enc.embed_positions = torch.nn.Embedding.from_pretrained(enc.embed_positions.weight[:n].clone())
    enc.config.max_source_positions = n
    with torch.no_grad():
        return enc(features).last_hidden_state


@pytest.mark.parametrize("frames", [200, 512, 3000])
def test_trimmed_encoder_equals_sliced_reference(model, frames):
    torch.manual_seed(frames)
    features = torch.randn(2, 80, frames)
    expected = stock_encoder_with_sliced_positions(model, features)
    trimmed = apply_audio_context(copy.deepcopy(model), "trimmed")
    with torch.no_grad():
        got = encode(trimmed, features).last_hidden_state
    assert got.shape == (2, frames // 2, 64)
    assert torch.allclose(got, expected, atol=1e-6)


def test_full_mode_rejects_short_input_and_trimmed_rejects_odd(model):
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="3000"):
        encode(m, torch.randn(1, 80, 400))
    apply_audio_context(m, "trimmed")
    with pytest.raises(ValueError, match="even number of frames up to 3000"):
        encode(m, torch.randn(1, 80, 401))
    with pytest.raises(ValueError, match="up to 3000"):
        encode(m, torch.randn(1, 80, 3002))


def test_switching_modes_leaks_no_state(model):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    features = torch.randn(1, 80, 3000)
    with torch.no_grad():
        before = encode(model, features).last_hidden_state
    other = copy.deepcopy(model)
    apply_audio_context(other, "trimmed")
    assert audio_context_of(other) == "trimmed" and audio_context_of(model) == "full"
    assert "forward" not in vars(model.model.encoder)  # the other instance and the class are untouched
    assert WhisperEncoder.forward.__qualname__ == "WhisperEncoder.forward"
    with torch.no_grad():
        encode(other, torch.randn(1, 80, 300))
    apply_audio_context(other, "full")
    assert audio_context_of(other) == "full" and "forward" not in vars(other.model.encoder)
    with pytest.raises(ValueError, match="3000"):
        encode(other, torch.randn(1, 80, 300))
    with torch.no_grad():
        assert torch.equal(encode(model, features).last_hidden_state, before)
        assert torch.equal(encode(other, features).last_hidden_state, before)
    assert model.config.max_source_positions == 1500


def test_generation_from_trimmed_encoder_outputs(model):
    """generate(encoder_outputs=...) decodes from the trimmed encoder (no zero-padding to 3000)."""
    m = apply_audio_context(copy.deepcopy(model), "trimmed")
    features = torch.randn(2, 80, 400)
    with torch.no_grad():
        enc = encode(m, features)
        ids = m.generate(encoder_outputs=enc, language="ko", task="transcribe", max_new_tokens=3)
    assert enc.last_hidden_state.shape[1] == 200 and ids.shape[0] == 2


def test_peft_wrapped_model_switches(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    apply_audio_context(peft_model, "trimmed")
    assert audio_context_of(peft_model) == "trimmed"
    with torch.no_grad():
        assert encode(peft_model, torch.randn(1, 80, 100)).last_hidden_state.shape[1] == 50


def test_adapter_trained_trimmed_is_loaded_trimmed(tiny_whisper, tmp_path):
    """Training records the mode in asr_lora.json; loading the adapter applies it without being told."""
    import json

    from asr_lora.config import load_recipe
    from asr_lora.model import load_adapter_model
    from asr_lora.train import run_training

    from .conftest import DEMO

    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text(encoding="utf-8").splitlines()][:4]
    for r in rows:
        r["audio"] = str(DEMO / r["audio"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = load_recipe(None, [f"model.name={tiny_whisper}", "model.audio_context=trimmed",
                             "model.gradient_checkpointing=false", "lora.r=2", f"data.train={manifest}",
                             f"data.dev={manifest}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                             "train.batch_size=2", "train.eval_every=2", "train.save_every=2",
                             "eval.max_new_tokens=2"])
    trainer = run_training(cfg, progress=False)
    assert audio_context_of(trainer.model) == "trimmed"
    meta = json.loads((tmp_path / "run" / "final" / "asr_lora.json").read_text())
    assert meta["audio_context"] == "trimmed" and meta["language"] == "ko"
    loaded = load_adapter_model(tmp_path / "run" / "final")
    assert audio_context_of(loaded) == "trimmed"
    # the same base loaded plainly stays in full mode
    from asr_lora.model import load_model

    assert audio_context_of(load_model(str(tiny_whisper))) == "full"
