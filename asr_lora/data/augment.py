"""Train-only augmentation (the recipe's ``augment:`` section), deterministic in (seed, epoch, row).

Two kinds, both off by default:

* **Waveform** (:class:`WaveAugment`, run by the collator, so in DataLoader workers too): speed
  perturbation by resampling (tempo and pitch, as Kaldi's), a noise clip mixed in at an SNR drawn
  from a range, and a gain. Each utterance draws from its own generator seeded by
  ``(train.seed, epoch, row index)``, never from a global RNG: the same row at the same point of
  training gets the same audio with 0 or N workers, on any rank, and after a resume.
* **SpecAugment** through transformers' own Whisper masking (``WhisperModel._mask_input_features``):
  :func:`apply_spec_augment` sets the masking keys on the model config at training setup. It runs
  only in train mode and only in ``WhisperModel.forward`` given ``input_features``; evaluation and
  generation call the encoder directly in eval mode, so they never mask. The collator hands the
  training forward an ``attention_mask`` of each clip's real frames (:func:`frame_mask`), so time
  masks fall on audio, not on the padding of a shorter clip in the batch. transformers draws the
  masks from numpy's global RNG: checkpoints save it (:func:`host_rng_state`) and a resume restores it.

The noise mixing, gain and speed change are a few lines of numpy and soxr here rather than
audiomentations' transforms: those draw from numpy's and Python's global RNGs (which SpecAugment's
masks also draw from) and read whole files, where noise clips may be manifest segments.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..audio import N_SAMPLES, SAMPLE_RATE, resample
from .manifest import ManifestRow, load_row_audio

SILENT_RMS = 1e-6  # below this a clip has no level to set an SNR against: no noise mixed in
NOISE_CACHE = 64  # decoded noise clips kept per process


@dataclass(frozen=True)
class WaveAugment:
    """Speed, noise and gain for one utterance at a time, each with its probability.

    Intended non-speech rows get speed and gain but no noise: they are noise already, an SNR has no
    speech to refer to, and their target (<|nospeech|>) stays right either way.
    """

    seed: int
    noise: tuple[ManifestRow, ...] = ()
    noise_prob: float = 0.0
    snr_db: tuple[float, float] = (10.0, 30.0)
    speed_prob: float = 0.0
    speeds: tuple[float, float] = (0.9, 1.1)
    gain_prob: float = 0.0
    gain_db: tuple[float, float] = (-6.0, 6.0)

    def __post_init__(self):
        if self.noise_prob > 0 and not self.noise:
            raise ValueError("noise_prob > 0 needs noise clips")

    def __call__(self, audio: np.ndarray, row: ManifestRow, position: tuple[int, int] | None) -> np.ndarray:
        """``audio`` (16 kHz float32) of ``row`` augmented for ``position`` = (epoch, row index)."""
        if position is None or position[0] is None:
            raise ValueError("waveform augmentation needs each row's (epoch, row index): collate through "
                             "asr_lora.data.loader.micro_batches with (epoch, batch) pairs")
        epoch, index = position
        u = utterance_rng(self.seed, epoch, index).random(8)  # always 8 draws: each knob keeps its own
        if u[0] < self.speed_prob:
            audio = change_speed(audio, _between(self.speeds, u[1]))
        if u[2] < self.noise_prob and not row.nonspeech:
            clip = noise_audio(self.noise[int(u[3] * len(self.noise))])
            audio = mix_at_snr(audio, noise_window(clip, len(audio), u[4]), _between(self.snr_db, u[5]))
        if u[6] < self.gain_prob:
            audio = audio * np.float32(10 ** (_between(self.gain_db, u[7]) / 20))
        return np.ascontiguousarray(audio, dtype=np.float32)


def wave_augment(cfg) -> WaveAugment | None:
    """The waveform augmentation of a recipe (``RecipeConfig``), or None when it is all off. Noise
    clips come from ``augment.noise``, else ``data.nonspeech``."""
    from .manifest import nonspeech_rows

    a = cfg.augment
    if not (a.noise_prob or a.speed_prob or a.gain_prob):
        return None
    noise = nonspeech_rows(a.noise or cfg.data.nonspeech) if a.noise_prob > 0 else []
    return WaveAugment(seed=cfg.train.seed, noise=tuple(noise), noise_prob=a.noise_prob, snr_db=tuple(a.snr_db),
                       speed_prob=a.speed_prob, speeds=tuple(a.speeds), gain_prob=a.gain_prob,
                       gain_db=tuple(a.gain_db))


def utterance_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one utterance at one point of training (independent of process and order)."""
    return np.random.default_rng([seed % 2**64, epoch, index])


def _between(bounds: Sequence[float], u: float) -> float:
    return float(bounds[0] + (bounds[1] - bounds[0]) * u)


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """``audio`` played ``factor`` times faster (shorter, higher), by resampling; the factor is
    lowered when needed so that the clip stays within Whisper's 30 s window."""
    rate = max(round(SAMPLE_RATE * factor), math.ceil(SAMPLE_RATE * len(audio) / N_SAMPLES))
    return audio if rate == SAMPLE_RATE else resample(audio, rate, SAMPLE_RATE)


@functools.lru_cache(maxsize=NOISE_CACHE)
def _noise_clip(audio: str, offset: float | None, end: float | None) -> np.ndarray:
    return load_row_audio(ManifestRow(line=0, audio=audio, text="", offset=offset, end=end))


def noise_audio(row: ManifestRow) -> np.ndarray:
    """A noise clip's samples (decoded once per process, a few dozen kept)."""
    return _noise_clip(row.audio, row.offset, row.end)


def noise_window(noise: np.ndarray, n: int, u: float) -> np.ndarray:
    """``n`` samples of ``noise`` from a start at fraction ``u`` of where one can start; a clip
    shorter than ``n`` is looped."""
    if len(noise) == 0:
        return np.zeros(n, dtype=np.float32)
    if len(noise) >= n:
        start = int(u * (len(noise) - n + 1))
        return noise[start:start + n]
    start = int(u * len(noise))
    return np.tile(noise, math.ceil((start + n) / len(noise)))[start:start + n]


def mix_at_snr(audio: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``audio`` plus ``noise`` scaled to ``snr_db`` below it (RMS over the clip, as audiomentations'
    AddBackgroundNoise); unchanged when either is silent."""
    signal_rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    noise_rms = float(np.sqrt(np.mean(np.square(noise, dtype=np.float64))))
    if signal_rms < SILENT_RMS or noise_rms < SILENT_RMS:
        return audio
    return audio + noise * np.float32(signal_rms / 10 ** (snr_db / 20) / noise_rms)


def frame_mask(n_frames: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, width) 1 on each clip's real log-mel frames, 0 on its padding: the ``attention_mask``
    transformers' SpecAugment confines time masks to."""
    return (torch.arange(width, device=n_frames.device)[None, :] < n_frames[:, None]).long()


def apply_spec_augment(model: torch.nn.Module, augment) -> torch.nn.Module:
    """Set SpecAugment (``augment``: an ``AugmentConfig``) on every Whisper config inside ``model``:
    ``apply_spec_augment``, ``mask_time_prob``/``length``, ``mask_feature_prob``/``length`` (and
    Whisper's default minimum mask counts, 2 time masks and 0 frequency masks per clip). Set
    explicitly even when off, so a base saved with masking on trains without it unless asked."""
    from transformers.models.whisper.modeling_whisper import WhisperModel

    for module in model.modules():
        if isinstance(module, WhisperModel):
            config = module.config
            config.apply_spec_augment = augment.spec_time_prob > 0 or augment.spec_feature_prob > 0
            config.mask_time_prob, config.mask_time_length = augment.spec_time_prob, augment.spec_time_length
            config.mask_feature_prob = augment.spec_feature_prob
            config.mask_feature_length = augment.spec_feature_length
            config.mask_time_min_masks, config.mask_feature_min_masks = 2, 0
    return model


def host_rng_state() -> dict:
    """numpy's and Python's global RNG states as tensors and numbers, for a checkpoint's ``rng.pt``
    (``torch.load(weights_only=True)`` reads them back): SpecAugment's masks come from numpy's."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def restore_host_rng_state(rng: dict) -> None:
    """Set numpy's and Python's global RNGs from :func:`host_rng_state` (a checkpoint without them,
    from before they were saved, leaves them as they are)."""
    if "numpy" in rng:
        n = rng["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                             float(n["cached_gaussian"])))
    if "python" in rng:
        p = rng["python"]
        random.setstate((int(p["version"]), tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
