"""merge and export-ct2: parity checks and their reports, what the folders hold, a failed check leaves
no finished folder, a plain transformers pipeline runs the merged model, trimmed audio context."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from asr_lora.cli import main
from asr_lora.errors import UserError

from .conftest import ASSETS, DEMO, build_tiny_whisper, write_manifest

TOKENS = "4"  # generation cap: the random tiny model never stops by itself
MERGE_KEYS = {"n", "transcripts_identical", "max_abs_logit_diff", "tolerance", "dtype", "passed", "mismatches"}
EXPORT_KEYS = {"n", "cer_hf", "cer_ct2", "cer_diff", "transcripts_identical_fraction", "quantization", "passed",
               "audio_context", "audio_context_note"}
CLIPS = [("ko-greeting", "ko_greeting.flac", "안녕하세요. 오늘 날씨가 정말 좋네요."),
         ("ko-finetune", "ko_finetune.flac", "음성 인식 모델을 한국어로 미세 조정합니다."),
         ("en-fox", "en_fox.flac", "The quick brown fox jumps over the lazy dog.")]


def make_adapter(base: Path, out: Path, seed: int = 0, scale: float = 0.05) -> Path:
    """A saved LoRA adapter (q_proj, v_proj) on ``base`` with random lora_B, so merging changes weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(base)
    with torch.random.fork_rng():  # lora_A's init draws from the global RNG: seed it, so test order never matters
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = str(base)
    peft_model.save_pretrained(out)
    return out


def clips_manifest(path: Path, clips=CLIPS) -> Path:
    """A manifest of (id, asset file name, text) clips from tests/assets."""
    return Path(write_manifest(path, [{"id": uid, "audio": str(ASSETS / name), "text": text}
                                      for uid, name, text in clips]))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return clips_manifest(tmp_path_factory.mktemp("data") / "dev.jsonl")


@pytest.fixture(scope="module")
def adapter(tiny_whisper, tmp_path_factory) -> Path:
    return make_adapter(tiny_whisper, tmp_path_factory.mktemp("run") / "step-000010")


@pytest.fixture(scope="module")
def merged(adapter, manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    assert main(["merge", str(adapter), "--out", str(out), "--data", str(manifest), "--max-new-tokens", TOKENS]) == 0
    return out


@pytest.fixture(scope="module")
def exported(merged, manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ct2") / "model"
    assert main(["export-ct2", str(merged), "--out", str(out), "--quantization", "float32", "--data", str(manifest),
                 "--max-new-tokens", TOKENS]) == 0
    return out


def _hidden_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- merge


def test_merge_parity_report_and_files(merged, adapter, manifest):
    report = json.loads((merged / "merge_report.json").read_text())
    assert MERGE_KEYS <= set(report)
    assert report["passed"] is True and report["transcripts_identical"] is True and report["mismatches"] == []
    assert report["n"] == 3 and report["dtype"] == "float32" and report["tolerance"] == 1e-3
    assert 0 <= report["max_abs_logit_diff"] <= 1e-3
    assert report["data"] == str(manifest.resolve()) and report["checkpoint"] == str(adapter.resolve())
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "preprocessor_config.json", "asr_lora.json"):
        assert (merged / name).is_file(), name
    assert not any(merged.glob("adapter_*"))
    gen = json.loads((merged / "generation_config.json").read_text())
    assert gen["language"] == "ko" and gen["task"] == "transcribe" and not gen.get("forced_decoder_ids")
    settings = json.loads((merged / "asr_lora.json").read_text())
    assert settings["audio_context"] == "full" and settings["language"] == "ko" and settings["dtype"] == "float32"
    assert _hidden_leftovers(merged.parent) == []


def test_merge_is_not_trivial(merged, tiny_whisper):
    """The random lora_B really changes the weights that the parity check compares."""
    from safetensors.torch import load_file

    base, new = load_file(tiny_whisper / "model.safetensors"), load_file(merged / "model.safetensors")
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert (base[name] - new[name]).abs().max() > 1e-2
    k = "model.decoder.layers.0.self_attn.k_proj.weight"  # not a LoRA target
    assert torch.equal(base[k], new[k])


def test_merge_failure_leaves_no_finished_folder(adapter, manifest, tmp_path, monkeypatch, capsys):
    from asr_lora import export

    real = export.merge_weights

    def perturbed(peft_model):
        model = real(peft_model)
        weight = model.model.decoder.layers[0].self_attn.q_proj.weight
        with torch.no_grad():  # random, not constant: a constant vanishes against layer-normed inputs
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
        return model

    monkeypatch.setattr(export, "merge_weights", perturbed)
    out = tmp_path / "merged"
    code = main(["merge", str(adapter), "--out", str(out), "--data", str(manifest), "--max-new-tokens", TOKENS])
    err = capsys.readouterr().err
    assert code == 2 and "parity check failed" in err and "Traceback" not in err
    assert not out.exists()
    failed = tmp_path / "merged.failed"
    report = json.loads((failed / "merge_report.json").read_text())
    assert report["passed"] is False and report["max_abs_logit_diff"] > report["tolerance"]
    assert not any(failed.glob("*.safetensors"))
    assert _hidden_leftovers(tmp_path) == []


def test_merge_refuses_existing_output(adapter, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("x")
    assert main(["merge", str(adapter), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_plain_pipeline_runs_merged_folder(merged, tmp_path):
    """transformers.pipeline(model=DIR) with no arguments decodes with <|ko|><|transcribe|> forced."""
    import soundfile as sf
    from transformers import pipeline

    folder = tmp_path / "merged"
    shutil.copytree(merged, folder)
    gen_path = folder / "generation_config.json"  # only to keep the random tiny model's loop short
    gen = json.loads(gen_path.read_text())
    gen_path.write_text(json.dumps({**gen, "max_length": 8}))

    asr = pipeline("automatic-speech-recognition", model=str(folder))
    assert asr.model.generation_config.language == "ko" and asr.model.generation_config.task == "transcribe"
    prompts = []
    hook = asr.model.model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: prompts.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    audio, sr = sf.read(ASSETS / "ko_greeting.flac", dtype="float32")
    result = asr({"raw": audio, "sampling_rate": sr})  # a file path would need ffmpeg
    hook.remove()
    assert isinstance(result["text"], str)
    tok = asr.tokenizer
    assert prompts[0] == tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|ko|>", "<|transcribe|>",
                                                     "<|notimestamps|>"])


def test_default_parity_data_follows_the_recipe(tmp_path, manifest):
    from asr_lora.export import DEMO_DEV, default_parity_data

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    assert default_parity_data(run / "best") == DEMO_DEV
    (run / "recipe.yaml").write_text(f"data:\n  dev: {manifest}\n")
    assert default_parity_data(run / "best") == manifest.resolve()
    assert DEMO_DEV == DEMO / "dev.jsonl"


def test_merge_records_trimmed_audio_context(adapter, manifest, tmp_path):
    """asr_lora.json saying trimmed is applied (parity runs trimmed) and copied to the merged folder."""
    from asr_lora.backends import DecodeOptions
    from asr_lora.export import merge_adapter
    from asr_lora.sources import ModelSource, load_transcriber

    ckpt = tmp_path / "step-000001"
    shutil.copytree(adapter, ckpt)
    trained_on = {"min_seconds": 1.4, "max_seconds": 20.0, "chars_per_second": 4.5, "chars_per_second_low": 3.6}
    (ckpt / "asr_lora.json").write_text(json.dumps({"audio_context": "trimmed", "language": "ko",
                                                    "task": "transcribe", "quant": "8bit", "trained_on": trained_on}))
    report = merge_adapter(ckpt, tmp_path / "merged", data=manifest, max_new_tokens=int(TOKENS), log=lambda *_: None)
    assert report["passed"] and report["audio_context"] == "trimmed"
    settings = json.loads((tmp_path / "merged" / "asr_lora.json").read_text())
    assert settings["audio_context"] == "trimmed"
    assert settings["trained_on"] == trained_on  # transcription keeps cutting pieces for what it was trained on
    assert "quant" not in settings and settings["trained_quant"] == "8bit"  # merged weights are never 8-bit
    transcriber = load_transcriber(ModelSource("merged", str(tmp_path / "merged")), DecodeOptions(max_new_tokens=2))
    assert transcriber.padding == "longest"
    assert transcriber.features([torch.zeros(16000).numpy()]).shape[-1] == 100  # 1 s, not 30 s


# --------------------------------------------------------------------------- export-ct2


def test_export_files_and_report(exported):
    for name in ("model.bin", "config.json", "tokenizer.json", "preprocessor_config.json", "asr_lora.json"):
        assert (exported / name).is_file(), name
    pre = json.loads((exported / "preprocessor_config.json").read_text())
    assert pre["feature_size"] == 80 and pre["sampling_rate"] == 16000 and pre["hop_length"] == 160
    report = json.loads((exported / "export_report.json").read_text())
    assert EXPORT_KEYS <= set(report)
    assert report["passed"] is True and report["quantization"] == "float32" and report["n"] == 3
    assert report["cer_diff"] == report["cer_ct2"] - report["cer_hf"]
    assert report["transcripts_identical_fraction"] == 1.0  # float32: CTranslate2 decodes like transformers
    assert report["audio_context"] == "full"
    assert _hidden_leftovers(exported.parent) == []


def test_export_128_mel_model(tmp_path, manifest):
    from asr_lora.export import export_ct2

    model = build_tiny_whisper(tmp_path / "tiny128", num_mel_bins=128)
    report = export_ct2(model, tmp_path / "ct2", quantization="int8", data=manifest, n_clips=1,
                        max_new_tokens=2, tolerance=10.0, log=lambda *_: None)
    assert report["feature_size"] == 128
    assert json.loads((tmp_path / "ct2" / "preprocessor_config.json").read_text())["feature_size"] == 128


def test_export_failure_leaves_no_finished_folder(merged, manifest, tmp_path, capsys):
    out = tmp_path / "ct2"
    code = main(["export-ct2", str(merged), "--out", str(out), "--data", str(manifest), "--n-clips", "1",
                 "--max-new-tokens", "2", "--tolerance", "-1"])
    assert code == 2 and "parity check failed" in capsys.readouterr().err
    assert not out.exists()
    report = json.loads((tmp_path / "ct2.failed" / "export_report.json").read_text())
    assert report["passed"] is False and not (tmp_path / "ct2.failed" / "model.bin").exists()


def test_export_refuses_an_adapter_folder(adapter, tmp_path):
    from asr_lora.export import export_ct2

    with pytest.raises(UserError, match="merge it first"):
        export_ct2(adapter, tmp_path / "ct2")


def test_export_trimmed_context_runs_trimmed_in_ct2(merged, manifest, tmp_path):
    """CTranslate2 takes < 3000 mel frames; with a trimmed model the export matches the trimmed HF model."""
    from asr_lora.export import export_ct2

    folder = tmp_path / "merged"
    shutil.copytree(merged, folder)
    settings = json.loads((folder / "asr_lora.json").read_text())
    trained_on = {"min_seconds": 1.4, "max_seconds": 20.0, "chars_per_second": 4.5, "chars_per_second_low": 3.6}
    (folder / "asr_lora.json").write_text(json.dumps({**settings, "audio_context": "trimmed",
                                                      "trained_on": trained_on}))
    report = export_ct2(folder, tmp_path / "ct2", quantization="float32", data=manifest,
                        max_new_tokens=int(TOKENS), log=lambda *_: None)
    assert report["audio_context"] == "trimmed" and report["ct2_accepts_short_input"] is True
    assert "shorter than 3000 frames" in report["audio_context_note"]
    assert report["transcripts_identical_fraction"] == 1.0 and report["passed"]
    assert json.loads((tmp_path / "ct2" / "asr_lora.json").read_text())["audio_context"] == "trimmed"
    from asr_lora.sources import ModelSource, load_transcriber

    ct2 = load_transcriber(ModelSource("ct2", str(tmp_path / "ct2")))
    assert ct2.settings.trained_on.max_seconds == 20.0 and ct2.settings.max_input_seconds == 20.0


# --------------------------------------------------------------------------- real base (slow)


@pytest.mark.slow
def test_real_adapter_merge_and_int8_export(bundled_base, tmp_path):
    """LoRA with small random B on the real whisper-base, trained-trimmed and English (where the base
    is confident, so int8 should not change transcripts): merge passes parity with logits within
    1e-3, and the int8 CTranslate2 export, run trimmed, keeps the CER."""
    from asr_lora.export import export_ct2, merge_adapter

    adapter = make_adapter(bundled_base, tmp_path / "run" / "step-000001", scale=0.001)
    (adapter / "asr_lora.json").write_text(json.dumps({"audio_context": "trimmed", "language": "en",
                                                       "task": "transcribe", "base_model": str(bundled_base)}))
    data = clips_manifest(tmp_path / "dev.jsonl", [
        ("fox", "en_fox.flac", "The quick brown fox jumps over the lazy dog."),
        ("callback", "en_callback.flac", "Please call me back tomorrow morning, I will be at home.")])
    quiet = lambda *_: None  # noqa: E731
    merged = merge_adapter(adapter, tmp_path / "merged", data=data, max_new_tokens=24, log=quiet)
    assert merged["passed"] and merged["transcripts_identical"] and merged["max_abs_logit_diff"] < 1e-3
    assert merged["audio_context"] == "trimmed" and merged["language"] == "en"
    exported = export_ct2(tmp_path / "merged", tmp_path / "ct2", quantization="int8", data=data,
                          max_new_tokens=24, log=quiet)
    assert exported["passed"] and exported["n"] == 2 and exported["ct2_accepts_short_input"] is True
    assert exported["cer_hf"] < 0.2 and abs(exported["cer_diff"]) <= 0.02
