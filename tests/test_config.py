"""Recipe config: typed dataclasses, validation, overrides, helpful unknown-key errors."""

from __future__ import annotations

import pytest

from asr_lora.config import ConfigError, RecipeConfig, describe, load_recipe


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file():
    cfg = load_recipe(None)
    assert isinstance(cfg, RecipeConfig)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.language == "ko"


def test_yaml_values_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  quant: 8bit\ntrain:\n  lr: 1.0e-4\n  max_steps: 50\n")
    cfg = load_recipe(path, ["train.lr=3e-4", "lora.target_modules=[q_proj,k_proj,v_proj]", "eval.max_samples=20"])
    assert cfg.model.quant == "8bit"
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 50
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.eval.max_samples == 20


def test_int_accepted_for_float_and_none_for_optional(tmp_path):
    cfg = load_recipe(write(tmp_path, "train:\n  lr: 1\neval:\n  max_samples: null\n"))
    assert cfg.train.lr == 1.0 and cfg.eval.max_samples is None


def test_yaml_boolean_words_read_as_choices(tmp_path):
    """YAML 1.1 reads an unquoted ``no`` as False; a choice field that offers "no" takes it as "no"."""
    cfg = load_recipe(write(tmp_path, "train:\n  mixed_precision: no\n"))
    assert cfg.train.mixed_precision == "no"
    cfg = load_recipe(write(tmp_path, "train:\n  mixed_precision: bf16\n"), ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"model.quant: True is not one of"):
        load_recipe(write(tmp_path, "model:\n  quant: yes\n"))


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        ("train:\n  lrr: 0.1\n", [], r"unknown key 'train.lrr'; did you mean 'train.lr'"),
        ("trian:\n  lr: 0.1\n", [], r"unknown key 'trian'; did you mean 'train'"),
        ("", ["train.max_step=5"], r"did you mean 'train.max_steps'"),
        ("", ["lora.rank=8"], r"unknown key 'lora.rank'"),
        ("model:\n  quant: 3bit\n", [], r"model.quant: '3bit' is not one of 'none', '8bit', '4bit'"),
        ("train:\n  max_steps: ten\n", [], r"train.max_steps: expected int"),
        ("train:\n  max_steps: 0\n", [], r"train.max_steps must be positive"),
        ("lora:\n  dropout: 1.5\n", [], r"lora.dropout must be in"),
        ("model: 5\n", [], r"expected a mapping"),
        ("", ["train.lr"], r"section.key=value"),
        ("", ["train.lr.x=1"], r"train.lr is a value, not a section"),
        ("model:\n  gradient_checkpointing: maybe\n", [], r"expected true/false"),
    ],
)
def test_invalid_recipes_are_clear_errors(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(write(tmp_path, text), overrides)


def test_error_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_recipe(path)
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(write(tmp_path, "train: [unclosed\n"))


def test_every_field_is_documented():
    lines = describe()
    assert any(line.startswith("train.lr = 0.001") for line in lines)
    undocumented = [line for line in lines if line.rstrip().endswith("#")]
    assert undocumented == []
