"""Loading Whisper for (Q)LoRA training: LoRA placement and counts, gradients through fp32, 8-bit and
4-bit bases, gradient checkpointing equivalence, and adapter save/reload parity."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from asr_lora.config import LoraConfig, ModelConfig
from asr_lora.errors import UserError
from asr_lora.model import (
    build_training_model,
    load_adapter_model,
    quantization_config,
    trainable_parameters,
)


def count_lora_modules(model) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(module, LoraLayer) for module in model.modules())


def _skip_unless_bnb_runs(quant: str) -> None:
    """bitsandbytes >= 0.48 has CPU kernels; skip quantised cases only on an install without them."""
    if quant == "none" or torch.cuda.is_available():
        return
    import bitsandbytes as bnb

    if "cpu" not in getattr(bnb, "supported_torch_devices", set()):
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU backend and there is no GPU for {quant}")


def _build(tiny_whisper, quant="none", gradient_checkpointing=True, r=8):
    _skip_unless_bnb_runs(quant)
    model_cfg = ModelConfig(name=str(tiny_whisper), quant=quant, gradient_checkpointing=gradient_checkpointing)
    return build_training_model(model_cfg, LoraConfig(r=r, alpha=2 * r, dropout=0.0))


def _batch(model, batch_size=2, n_labels=12, seed=0):
    """Random log-mel features (30 s, as Whisper's encoder requires) and label ids with some padding."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch_size, model.config.num_mel_bins, 3000, generator=gen)
    labels = torch.randint(0, 50_000, (batch_size, n_labels), generator=gen)
    labels[-1, -3:] = -100
    return features.to(model.device), labels.to(model.device)


def _lora_params(model, which: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if f"lora_{which}" in n}


def _randomise_lora_b(model, seed=1) -> None:
    """Make the adapter non-trivial (B starts at zero) so LoRA changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _lora_params(model, "B").values():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------- placement and counts


def test_lora_goes_on_q_and_v_of_all_three_attentions(tiny_whisper):
    from peft.tuners.lora import LoraLayer

    model = _build(tiny_whisper, r=8)
    # 2 encoder layers x (self q, v) + 2 decoder layers x (self q, v + cross q, v)
    assert count_lora_modules(model) == 2 * 2 + 2 * 4 == 12
    names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert sum(".encoder." in n and ".self_attn." in n for n in names) == 4
    assert sum(".decoder." in n and ".self_attn." in n for n in names) == 4
    assert sum(".decoder." in n and ".encoder_attn." in n for n in names) == 4
    assert all(n.endswith(("q_proj", "v_proj")) for n in names)

    expected = sum(8 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoraLayer))
    trainable, total = trainable_parameters(model)
    assert trainable == expected == 12 * 8 * (64 + 64)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    assert re.fullmatch(r"12,288 of [\d,]+", f"{trainable:,} of {total:,}")


def test_4bit_total_counts_unpacked_weights(tiny_whisper):
    model = _build(tiny_whisper, quant="4bit")
    reference = _build(tiny_whisper, quant="none")
    assert trainable_parameters(model) == trainable_parameters(reference)


def test_quantization_config_choices():
    assert quantization_config("none") is None
    assert quantization_config("8bit").load_in_8bit
    cpu = quantization_config("4bit", on_gpu=False)
    assert cpu.load_in_4bit and cpu.bnb_4bit_quant_type == "nf4" and cpu.bnb_4bit_use_double_quant
    assert cpu.bnb_4bit_compute_dtype == torch.float32
    assert quantization_config("4bit", on_gpu=True).bnb_4bit_compute_dtype in (torch.bfloat16, torch.float16)
    assert quantization_config("4bit", torch.float16).bnb_4bit_compute_dtype == torch.float16
    with pytest.raises(UserError, match="8bit"):
        quantization_config("int3")


def test_training_model_settings(tiny_whisper):
    model = _build(tiny_whisper)
    assert model.config.use_cache is False
    gen = model.generation_config
    assert (gen.language, gen.task) == ("ko", "transcribe")
    assert getattr(gen, "forced_decoder_ids", None) is None
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_whisper)

    # generation goes through the PeftModel and is prompted <|startoftranscript|><|ko|><|transcribe|>
    seen = []
    decoder = model.get_base_model().model.decoder
    hook = decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    model.eval()
    features, _ = _batch(model, batch_size=1)
    with torch.no_grad():
        model.generate(input_features=features, max_new_tokens=2)
    hook.remove()
    ids = gen.decoder_start_token_id, gen.lang_to_id["<|ko|>"], gen.task_to_id["transcribe"]
    assert seen[0][0, :3].tolist() == list(ids)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("quant,checkpointing", [("none", False), ("none", True), ("8bit", True), ("4bit", True)])
def test_forward_backward_trains_only_lora(tiny_whisper, quant, checkpointing):
    model = _build(tiny_whisper, quant=quant, gradient_checkpointing=checkpointing)
    model.train()
    features, labels = _batch(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_a, lora_b = _lora_params(model, "A"), _lora_params(model, "B")
    assert len(lora_a) == len(lora_b) == 12
    assert all(not model.get_parameter(n).requires_grad for n in base)

    loss = model(input_features=features, labels=labels).loss
    assert math.isfinite(loss.item())
    loss.backward()
    # B starts at zero, so every B (encoder included) gets a gradient and no A does yet
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b.values()), quant
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lora_a.values())
    assert all(model.get_parameter(n).grad is None for n in base)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    model(input_features=features, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_a.values()), quant
    assert all(torch.equal(model.get_parameter(n).detach(), before) for n, before in base.items())


def test_gradient_checkpointing_matches_plain_backward(tiny_whisper):
    models = {gc: _build(tiny_whisper, gradient_checkpointing=gc) for gc in (False, True)}
    _randomise_lora_b(models[False])
    lora = {n: p for n, p in models[False].state_dict().items() if "lora_" in n}
    assert not models[True].load_state_dict(lora, strict=False).unexpected_keys  # same adapter in both
    results = {}
    for gc, model in models.items():
        assert model.get_base_model().is_activation_checkpointing is gc
        model.train()
        calls = []
        inner = model.get_base_model().model.encoder.layers[0].fc1  # inside the checkpointed forward
        hook = inner.register_forward_hook(lambda *_: calls.append(1))
        features, labels = _batch(model)
        loss = model(input_features=features, labels=labels).loss
        loss.backward()
        hook.remove()
        results[gc] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert len(calls) == (2 if gc else 1)  # checkpointing reruns the layer's forward during backward
    (loss_off, grads_off), (loss_on, grads_on) = results[False], results[True]
    assert loss_on == pytest.approx(loss_off, abs=1e-5)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        assert torch.allclose(grads_on[name], grads_off[name], atol=1e-5), name


# --------------------------------------------------------------------------- saved adapters


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_saved_adapter_reloads_with_identical_logits(tiny_whisper, tmp_path, quant):
    model = _build(tiny_whisper, quant=quant)
    _randomise_lora_b(model)
    model.eval()
    features, labels = _batch(model)
    decoder_input_ids = labels.clamp(min=0)
    with torch.no_grad():
        expected = model(input_features=features, decoder_input_ids=decoder_input_ids).logits

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter_model.bin").exists()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_whisper)
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]

    loaded = load_adapter_model(tmp_path, quant=quant)
    assert not loaded.training
    assert count_lora_modules(loaded) == 12
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        got = loaded(input_features=features.to(loaded.device), decoder_input_ids=decoder_input_ids.to(loaded.device))
    assert torch.allclose(got.logits.cpu(), expected.cpu(), atol=1e-5)


def test_load_adapter_refuses_non_safetensors(tiny_whisper, tmp_path):
    with pytest.raises(UserError, match="adapter_config.json"):
        load_adapter_model(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_whisper)}))
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="safetensors"):
        load_adapter_model(tmp_path)


# --------------------------------------------------------------------------- the real base


@pytest.mark.slow
def test_whisper_base_lora_r32(bundled_base):
    model = build_training_model(ModelConfig(name=str(bundled_base)), LoraConfig(r=32))
    # q_proj/v_proj in 6 encoder layers (self) and 6 decoder layers (self + cross): 6*2 + 6*4
    assert count_lora_modules(model) == 36
    assert trainable_parameters(model) == (1_179_648, 73_773_568)
    trainable, total = trainable_parameters(model)
    assert f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)" == "1,179,648 of 73,773,568 (1.60%)"


def test_adapter_folder_errors_name_the_problem(tmp_path):
    from asr_lora.model import adapter_base_name

    with pytest.raises(UserError, match="nope: no such folder"):
        adapter_base_name(tmp_path / "nope")
    with pytest.raises(UserError, match="no adapter_config.json; is this a LoRA adapter folder"):
        adapter_base_name(tmp_path)
