"""Train-only augmentation: per-utterance determinism, SNR/speed/gain, the same batches from workers,
SpecAugment on real frames only (and never in eval), RNG state in checkpoints."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from asr_lora.audio import SAMPLE_RATE
from asr_lora.config import ConfigError, load_recipe
from asr_lora.data.augment import (WaveAugment, apply_spec_augment, change_speed, host_rng_state, mix_at_snr,
                                   noise_audio, restore_host_rng_state, wave_augment)
from asr_lora.data.loader import micro_batches
from asr_lora.data.manifest import load_row_audio, nonspeech_rows
from asr_lora.data.samplers import BatchPlan

from .conftest import DEMO, make_row, write_manifest

NOISE = DEMO / "nonspeech_train.jsonl"


def speech_rows(n: int):
    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text(encoding="utf-8").splitlines()][:n]
    return [make_row(r["id"], DEMO / r["audio"], r["text"], duration=r["duration"]) for r in rows]


def all_on(seed: int = 42) -> WaveAugment:
    return WaveAugment(seed=seed, noise=tuple(nonspeech_rows(NOISE)[:6]), noise_prob=1.0, speed_prob=1.0,
                       gain_prob=1.0)


@pytest.fixture(scope="module")
def collator(tiny_whisper):
    from transformers import WhisperProcessor

    from asr_lora.data.collator import WhisperCollator

    tokenizer = WhisperProcessor.from_pretrained(tiny_whisper).tokenizer
    return WhisperCollator(tokenizer, padding="longest")


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# --------------------------------------------------------------------------- waveform


def test_same_position_same_audio_other_position_other_audio():
    row = speech_rows(1)[0]
    audio = load_row_audio(row)
    aug = all_on()
    a = aug(audio, row, (0, 3))
    assert np.array_equal(a, all_on()(audio, row, (0, 3)))  # a fresh augmenter, same (seed, epoch, index)
    assert not np.array_equal(a, audio)
    for other in [aug(audio, row, (0, 4)), aug(audio, row, (1, 3)), all_on(seed=7)(audio, row, (0, 3))]:
        assert len(other) != len(a) or not np.array_equal(other, a)
    with pytest.raises(ValueError, match="epoch, row index"):
        aug(audio, row, None)


def test_noise_is_mixed_at_the_snr_drawn():
    rng = np.random.default_rng(0)
    speech = rng.normal(0, 0.1, SAMPLE_RATE).astype(np.float32)
    noise = rng.normal(0, 0.5, SAMPLE_RATE).astype(np.float32)
    for snr in (0.0, 10.0, 25.0):
        mixed = mix_at_snr(speech, noise, snr)
        assert 20 * np.log10(rms(speech) / rms(mixed - speech)) == pytest.approx(snr, abs=1e-3)
    silent = np.zeros(SAMPLE_RATE, dtype=np.float32)
    assert np.array_equal(mix_at_snr(silent, noise, 10.0), silent)  # no level to refer to: left alone


def test_speed_changes_duration_within_the_30_s_window():
    audio = np.sin(np.arange(2 * SAMPLE_RATE) * 0.05).astype(np.float32)
    assert len(change_speed(audio, 1.1)) == pytest.approx(2 * SAMPLE_RATE / 1.1, abs=2)
    assert len(change_speed(audio, 0.9)) == pytest.approx(2 * SAMPLE_RATE / 0.9, abs=2)
    for seconds in (29.0, 29.5, 29.99):
        long = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)
        assert 30 * SAMPLE_RATE - 40 <= len(change_speed(long, 0.9)) <= 30 * SAMPLE_RATE  # slowed only to 30 s


def test_nonspeech_rows_get_no_noise_but_speed_and_gain():
    clip = nonspeech_rows(NOISE)[0]
    audio = load_row_audio(clip)
    noise_only = WaveAugment(seed=1, noise=tuple(nonspeech_rows(NOISE)[1:3]), noise_prob=1.0)
    assert np.array_equal(noise_only(audio, clip, (0, 0)), audio)
    speech = speech_rows(1)[0]
    assert not np.array_equal(noise_only(load_row_audio(speech), speech, (0, 0)), load_row_audio(speech))
    gained = WaveAugment(seed=1, gain_prob=1.0, gain_db=(6.0, 6.0))(audio, clip, (0, 0))
    assert rms(gained) == pytest.approx(rms(audio) * 10 ** (6 / 20), rel=1e-4)


def test_recipe_keys_off_by_default_and_checked(tiny_whisper, tmp_path):
    cfg = load_recipe(None)
    assert wave_augment(cfg) is None and cfg.augment.spec_time_prob == 0 == cfg.augment.spec_feature_prob
    on = load_recipe(None, [f"data.nonspeech={NOISE}", "augment.noise_prob=0.5", "augment.gain_prob=0.2"])
    aug = wave_augment(on)
    assert aug.noise_prob == 0.5 and len(aug.noise) == 120 and aug.noise[0].nonspeech  # default: data.nonspeech
    with pytest.raises(ConfigError, match="augment.noise or data.nonspeech"):
        load_recipe(None, ["augment.noise_prob=0.5"])
    with pytest.raises(ConfigError, match="augment.snr_db"):
        load_recipe(None, ["augment.snr_db=[30, 10]"])
    with pytest.raises(ConfigError, match="augment.speed_prob"):
        load_recipe(None, ["augment.speed_prob=1.5"])


# --------------------------------------------------------------------------- loader


def test_workers_give_the_augmented_batches_of_the_loop(collator):
    """With augmentation on, 2 worker processes give bit for bit the batches of the loop (each row's
    audio seeded by its (epoch, index), not by a process's RNG); augmentation did change them, and a
    row's audio differs between epochs."""
    from dataclasses import replace

    rows = speech_rows(8)
    augmented = replace(collator, augment=all_on())
    plan = BatchPlan([r.duration for r in rows], seed=0, batch_size=4)
    order = list(plan.rank_epoch_batches(0, 0, 1, 4))  # 2 epochs of 2 batches
    assert [e for e, _ in order] == [0, 0, 1, 1]
    in_loop = list(micro_batches(rows, augmented, order, len(order), num_workers=0))
    background = list(micro_batches(rows, augmented, order, len(order), num_workers=2))
    plain = list(micro_batches(rows, collator, order, len(order), num_workers=0))
    for a, b, p in zip(in_loop, background, plain):
        assert a["indices"] == b["indices"] == p["indices"]
        assert torch.equal(a["input_features"], b["input_features"]) and torch.equal(a["n_frames"], b["n_frames"])
        assert torch.equal(a["attention_mask"], b["attention_mask"])
        assert not torch.equal(a["n_frames"], p["n_frames"])  # speed perturbation changed the lengths
    first = {i: (k, b) for b in in_loop[:2] for k, i in enumerate(b["indices"])}
    second = {i: (k, b) for b in in_loop[2:] for k, i in enumerate(b["indices"])}
    i = next(iter(first))
    (k0, b0), (k1, b1) = first[i], second[i]
    assert int(b0["n_frames"][k0]) != int(b1["n_frames"][k1]) or not torch.equal(
        b0["input_features"][k0], b1["input_features"][k1])


def test_noise_clips_are_decoded_once_per_process():
    clip = nonspeech_rows(NOISE)[5]
    assert noise_audio(clip) is noise_audio(clip)


# --------------------------------------------------------------------------- SpecAugment


def masked_frames(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(batch, frames) True where a time mask zeroed the whole frame (all mel bins)."""
    return ((after == 0) & (before != 0)).all(dim=1)


def test_spec_augment_masks_real_frames_only_and_never_in_eval(tiny_whisper, collator):
    """In the trimmed context a batch pads to its longest clip: with the collator's attention_mask,
    transformers' time masks fall on each clip's real frames, none on the padding of the shorter clip;
    without it they do (what the mask prevents). In eval mode nothing is masked."""
    from transformers import WhisperForConditionalGeneration

    from asr_lora.config import AugmentConfig
    from asr_lora.trimmed import apply_audio_context

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper)
    apply_audio_context(model, "trimmed")
    apply_spec_augment(model, AugmentConfig(spec_time_prob=0.4, spec_time_length=5))
    seen = []
    model.model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    rows = speech_rows(8)
    short, long = sorted(rows, key=lambda r: r.duration)[0], sorted(rows, key=lambda r: r.duration)[-1]
    batch = collator([short, long])
    n_frames, features = batch["n_frames"], batch["input_features"]
    assert n_frames[0] < n_frames[1] - 50 and features.shape[-1] >= n_frames[1]

    def masks(attention_mask, train=True):
        model.train(train)
        np.random.seed(0)
        with torch.no_grad():
            model(input_features=features.clone(), attention_mask=attention_mask, labels=batch["labels"])
        return masked_frames(features, seen[-1])

    masked = masks(batch["attention_mask"])
    for k in range(2):
        assert not masked[k, int(n_frames[k]):].any()  # no masked frame in this clip's padding
        assert masked[k, :int(n_frames[k])].sum() >= 5  # masking happens on its real frames
    unmasked_padding = [masks(None)[0, int(n_frames[0]):].any() for _ in range(3)]
    assert any(unmasked_padding)  # without the attention mask, masks land in the short clip's padding
    assert not masks(batch["attention_mask"], train=False).any()  # eval: no SpecAugment
    assert torch.equal(seen[-1], features)


def test_trainer_passes_the_real_frames_and_keeps_settings_clean(tiny_whisper, tmp_path, monkeypatch):
    """A training step with SpecAugment on masks the encoder input on real frames only, and the
    checkpoint carries no masking setting into inference (its settings and adapter config)."""
    from asr_lora.data.collator import WhisperCollator
    from asr_lora.train import Trainer

    from .test_train import recipe

    train = write_manifest(tmp_path / "train.jsonl", [{"audio": r.audio, "text": r.text, "duration": r.duration}
                                                      for r in speech_rows(4)])
    cfg = recipe(tiny_whisper, (train, train), tmp_path / "run", "train.max_steps=1", "train.batch_size=4",
                 "train.eval_every=1", "train.save_every=1", "model.audio_context=trimmed",
                 "augment.spec_time_prob=0.3", "augment.spec_time_length=5")
    batches, inputs, collate = [], [], WhisperCollator.__call__

    def keep(self, *args, **kwargs):  # the batch as collated (the forward masks its features in place)
        batches.append(collate(self, *args, **kwargs))
        return {**batches[-1], "input_features": batches[-1]["input_features"].clone()}

    monkeypatch.setattr(WhisperCollator, "__call__", keep)
    trainer = Trainer(cfg, progress=False)
    try:
        trainer.setup()
        encoder = trainer.accelerator.unwrap_model(trainer.model).get_encoder()
        encoder.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()) if module.training
                                          else None)
        trainer.train()
    finally:
        trainer.cleanup()
    (batch,), (seen,) = batches, inputs
    masked = masked_frames(batch["input_features"], seen)
    for k, n in enumerate(batch["n_frames"].tolist()):
        assert masked[k, :n].any() and not masked[k, n:].any()
    assert batch["n_frames"].min() < seen.shape[-1]  # a clip shorter than the batch: padding was there to hit
    text = "".join(p.read_text() for p in (tmp_path / "run" / "final").glob("*.json"))
    assert "mask_time" not in text and "spec_augment" not in text


# --------------------------------------------------------------------------- RNG state


def test_host_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    np.random.seed(3)
    random.seed(3)
    np.random.rand(5)
    random.random()
    torch.save(host_rng_state(), tmp_path / "rng.pt")
    expected = (np.random.rand(4), random.random(), np.random.choice(100, 3, replace=False))
    np.random.seed(99)
    random.seed(99)
    restore_host_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (np.random.rand(4), random.random(), np.random.choice(100, 3, replace=False))
    assert np.array_equal(expected[0], got[0]) and expected[1] == got[1] and np.array_equal(expected[2], got[2])
    restore_host_rng_state({"torch": torch.get_rng_state()})  # an older checkpoint: left as is
