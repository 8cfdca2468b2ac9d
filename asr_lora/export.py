"""Ship a trained adapter: merge it into its base (with a parity check), export to CTranslate2 (with a
CER parity check).

``merge``: the base is loaded unquantised (fp32) whatever the training used, the LoRA weights are
folded in with peft's ``merge_and_unload``, and the result is cast to ``dtype`` and saved as
safetensors with its processor, a generation config that forces Korean transcription (or the
checkpoint's language) and its settings (:mod:`asr_lora.settings`). The saved folder is then reloaded and compared with the
unmerged adapter at the same precision on a few dev clips: greedy token ids must be identical and
teacher-forced logits within :data:`LOGIT_TOLERANCE`.

``export-ct2``: ctranslate2's own ``TransformersConverter`` on the merged folder, plus
``tokenizer.json`` and the ``preprocessor_config.json`` that faster-whisper reads (its mel-bin count
taken from the model config), then the CER of the export is compared with the merged HF model's.

Both write into a hidden temporary sibling of ``--out`` and rename it into place only when the check
passed; a failed check leaves only its report in ``<out>.failed/`` and is an error (exit status 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import finish_or_failed, staged_folder
from .backends import CT2Transcriber, DecodeOptions, HFTranscriber
from .defaults import PARITY_CLIPS, PARITY_MAX_NEW_TOKENS
from .errors import UserError
from .settings import ModelSettings, read_settings, write_settings
from .sources import ModelSource, load_hf

REPO = Path(__file__).resolve().parents[1]
DEMO_DEV = REPO / "data" / "demo" / "dev.jsonl"
MERGE_REPORT = "merge_report.json"
EXPORT_REPORT = "export_report.json"
# PARITY_CLIPS (defaults.py) is 32: 8 clips proved too few for int8: on the demo run's merged model, 8
# dev clips gave a CER increase of +0.021 where all 50 gave +0.0012 (one changed word moves 8 short
# clips' CER by ~0.01).
# Max |logit difference| between the merged model and base + adapter at the same precision. float32
# differs only by summation order; half precisions also round W + BA once where the adapter adds BAx
# to Wx. Measured on whisper-base with a random adapter (2 clips, 32 tokens): float32 6.7e-5,
# float16 0.059, bfloat16 1.04 (logits are O(10), bfloat16 keeps 8 bits of mantissa).
LOGIT_TOLERANCE = {"float32": 1e-3, "float16": 0.25, "bfloat16": 2.0}
# Max increase in CER (absolute) of the CTranslate2 export over the merged HF model on the parity clips.
# One-sided: the check guards against an export that transcribes worse; how often the two agree is
# reported as transcripts_identical_fraction.
CER_TOLERANCE = {"float32": 0.005, "float16": 0.01, "bfloat16": 0.01, "int8_float32": 0.02,
                 "int8": 0.02, "int8_float16": 0.02, "int8_bfloat16": 0.02}
QUANTIZATIONS = ("int8", "int8_float16", "float16", "float32")


class ParityError(UserError):
    """The merged or exported model does not reproduce the model it came from."""


@dataclass
class Clip:
    id: str
    audio: np.ndarray
    text: str


# --------------------------------------------------------------------------- parity data


def default_parity_data(folder: Path) -> Path:
    """Dev clips for a parity check of ``folder`` (a checkpoint or a merged model).

    The run's ``recipe.yaml`` ``data.dev`` (next to the checkpoint), else the manifest the merge
    report of a merged folder used, else ``data/demo/dev.jsonl`` of this repository.
    """
    recipe = folder.parent / "recipe.yaml"
    if recipe.is_file():
        from .config import load_recipe

        dev = load_recipe(recipe).data.dev
        for candidate in (Path(dev), folder.parent / dev, REPO / dev):
            if candidate.is_file():
                return candidate.resolve()
    report = folder / MERGE_REPORT
    if report.is_file():
        data = json.loads(report.read_text(encoding="utf-8")).get("data")
        if data and Path(data).is_file():
            return Path(data)
    if DEMO_DEV.is_file():
        return DEMO_DEV
    raise UserError(f"no dev clips found for the parity check of {folder}; give --data MANIFEST")


def parity_clips(manifest: Path, n: int) -> tuple[list[Clip], list[dict]]:
    """The first ``n`` readable clips (at most 30 s) of ``manifest``, and the rows skipped on the way."""
    from .audio import AudioError
    from .data.manifest import load_row_audio, read_rows

    rows, bad = read_rows(manifest, strict=False)
    clips, skipped = [], [{"id": f"line {b.line}", "reason": f"{b.reason}: {b.detail}".rstrip(": ")} for b in bad]
    for row in rows:
        try:
            clips.append(Clip(row.id, load_row_audio(row, max_seconds=30.0), row.text))
        except AudioError as e:
            skipped.append({"id": row.id, "reason": str(e)})
        if len(clips) >= n:
            break
    if not clips:
        raise UserError(f"{manifest}: no readable clip for the parity check ({len(skipped)} skipped)")
    return clips, skipped


# --------------------------------------------------------------------------- folders


def _prepare(out: Path, source: Path, data: str | Path | None, n_clips: int) -> tuple[Path, list[Clip], list[dict]]:
    """Refuse an existing ``out``; the parity manifest (``data``, else the default for ``source``), its
    clips and the rows skipped."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = Path(data) if data else default_parity_data(source)
    return (manifest, *parity_clips(manifest, n_clips))


def _finish(work: Path, out: Path, report: dict, report_name: str, heavy: tuple[str, ...], failure: str,
            hint: str = "") -> dict:
    """The shared end of merge and export-ct2: ``work`` becomes ``out`` when the check passed, else only
    its report stays, in ``<out>.failed/``, and :class:`ParityError` says so."""
    finish_or_failed(work, out, report, report_name, heavy)
    if not report["passed"]:
        failed = out.with_name(out.name + ".failed")
        raise ParityError(f"{failure}; nothing written to {out}; report in {failed / report_name}{hint}")
    return report


def _carried_settings(settings: ModelSettings) -> ModelSettings:
    """The settings a merged or exported folder carries: its source's. A training ``quant`` becomes
    ``trained_quant``: the merged weights are never quantised."""
    carried = dataclasses.replace(settings, extra=dict(settings.extra))
    if "quant" in carried.extra:
        carried.extra["trained_quant"] = carried.extra.pop("quant")
    return carried


# --------------------------------------------------------------------------- merge


def merge_weights(peft_model):
    """Fold the LoRA weights into the base layers and drop the peft wrappers."""
    return peft_model.merge_and_unload()


def _strip(ids: list[int], eos: int, prompt_len: int) -> list[int]:
    out = ids[prompt_len:]
    return out[: out.index(eos)] if eos in out else out


def _greedy(transcriber: HFTranscriber, clips: list[Clip], batch_size: int):
    """Padded greedy sequences (with prompt) per batch, for teacher forcing later."""
    return [transcriber.generate_ids([c.audio for c in clips[i:i + batch_size]])
            for i in range(0, len(clips), batch_size)]


def _logits(transcriber: HFTranscriber, clips: list[Clip], sequences, batch_size: int) -> list:
    """Teacher-forced logits (float32, CPU) of ``sequences`` for each batch."""
    import torch

    out = []
    with torch.no_grad():
        for b, seq in zip(range(0, len(clips), batch_size), sequences):
            encoded = transcriber.encode([c.audio for c in clips[b:b + batch_size]])
            logits = transcriber.model(encoder_outputs=encoded, decoder_input_ids=seq.to(transcriber.device)).logits
            out.append(logits.float().cpu())
    return out


def merge_adapter(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", data: str | Path | None = None,
                  n_clips: int = PARITY_CLIPS, max_new_tokens: int = PARITY_MAX_NEW_TOKENS,
                  tolerance: float | None = None, batch_size: int = 8, log=print) -> dict:
    """Merge the LoRA checkpoint into its base, save to ``out`` and verify; returns the report.

    Raises :class:`ParityError` when the merged model's greedy ids differ from the adapter's or its
    logits differ by more than ``tolerance`` (default from :data:`LOGIT_TOLERANCE`).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if dtype not in LOGIT_TOLERANCE:
        raise UserError(f"--dtype must be one of {', '.join(LOGIT_TOLERANCE)}, got {dtype!r}")
    tolerance = LOGIT_TOLERANCE[dtype] if tolerance is None else tolerance
    manifest, clips, skipped = _prepare(out, checkpoint, data, n_clips)
    times = {}

    t0 = time.perf_counter()
    options = DecodeOptions(max_new_tokens=max_new_tokens, temperatures=(0.0,), no_speech_threshold=None)
    peft_model, processor, settings = load_hf(ModelSource("adapter", str(checkpoint)), dtype=dtype)
    base = settings.base_model
    adapter = HFTranscriber(peft_model, processor.tokenizer, settings, options, f"adapter:{checkpoint}")
    times["load"] = time.perf_counter() - t0
    log(f"parity reference: base + adapter in {dtype} on {len(clips)} clips of {manifest}")
    t0 = time.perf_counter()
    ref_ids = _greedy(adapter, clips, batch_size)
    ref_logits = _logits(adapter, clips, ref_ids, batch_size)
    times["reference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    merged = merge_weights(peft_model)
    gen = merged.generation_config
    gen.language, gen.task, gen.forced_decoder_ids = settings.language, settings.task, None
    with staged_folder(out) as work:
        merged.save_pretrained(work)
        processor.save_pretrained(work)
        processor.feature_extractor.save_pretrained(work)  # preprocessor_config.json: older readers want it
        write_settings(work, _carried_settings(settings), dtype=dtype,
                       merged_from=str(checkpoint.resolve()))
        del merged, peft_model, adapter
        times["merge_save"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        reloaded, processor2, settings2 = load_hf(ModelSource("merged", str(work)), dtype=dtype)
        merged_t = HFTranscriber(reloaded, processor2.tokenizer, settings2, options, f"merged:{out}")
        new_ids = _greedy(merged_t, clips, batch_size)
        new_logits = _logits(merged_t, clips, ref_ids, batch_size)
        times["check"] = time.perf_counter() - t0

        eos = processor.tokenizer.eos_token_id
        prompt_len = 4
        ref_rows = [_strip(r.tolist(), eos, prompt_len) for batch in ref_ids for r in batch]
        new_rows = [_strip(r.tolist(), eos, prompt_len) for batch in new_ids for r in batch]
        decode = processor.tokenizer.decode
        mismatches = [{"id": c.id, "adapter": decode(a, skip_special_tokens=True).strip(),
                       "merged": decode(b, skip_special_tokens=True).strip()}
                      for c, a, b in zip(clips, ref_rows, new_rows) if a != b]
        diff = max(float((a - b).abs().max()) for a, b in zip(ref_logits, new_logits))
        passed = not mismatches and math.isfinite(diff) and diff <= tolerance
        report = {"n": len(clips), "transcripts_identical": not mismatches, "max_abs_logit_diff": diff,
                  "tolerance": tolerance, "dtype": dtype, "passed": passed, "mismatches": mismatches,
                  "checkpoint": str(checkpoint.resolve()), "base_model": base, "data": str(manifest.resolve()),
                  "ids": [c.id for c in clips], "skipped": skipped, "max_new_tokens": max_new_tokens,
                  "language": settings.language, "task": settings.task, "audio_context": settings.audio_context,
                  "seconds": {k: round(v, 3) for k, v in times.items()}}
        return _finish(work, out, report, MERGE_REPORT, ("*.safetensors",),
                       f"merge parity check failed: transcripts identical {not mismatches} ({len(mismatches)} of "
                       f"{len(clips)} differ), max |logit diff| {diff:.3g} (tolerance {tolerance:g})")


# --------------------------------------------------------------------------- CTranslate2


def write_preprocessor_config(merged: Path, out: Path, num_mel_bins: int) -> dict:
    """``preprocessor_config.json`` for faster-whisper: the merged folder's feature extractor with
    ``feature_size`` = the model's ``num_mel_bins`` (80 up to large-v2, 128 for large-v3)."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(merged)
    if extractor.feature_size != num_mel_bins:
        extractor = WhisperFeatureExtractor(**{**extractor.to_dict(), "feature_size": num_mel_bins})
    extractor.save_pretrained(out)
    return json.loads((out / "preprocessor_config.json").read_text(encoding="utf-8"))


def ct2_accepts_short_input(folder: Path, n_mels: int, frames: int = 200) -> bool:
    """Whether CTranslate2 encodes a mel input of ``frames`` (< 3000) frames (it does, as of 4.x)."""
    import ctranslate2

    model = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="default")
    features = ctranslate2.StorageView.from_array(np.zeros((1, n_mels, frames), dtype=np.float32))
    try:
        encoded = model.encode(features)
    except (RuntimeError, ValueError):
        return False
    return tuple(encoded.shape)[1] == frames // 2


def audio_context_note(settings: ModelSettings, accepts_short: bool | None) -> str:
    if settings.audio_context != "trimmed":
        return ("full 30 s context: inputs are padded to 3000 frames, as faster-whisper and other "
                "CTranslate2 front ends do.")
    if not accepts_short:
        return ("trimmed audio context, but this CTranslate2 refuses mel input shorter than 3000 frames: "
                "the export runs only with the full 30 s context it was not fine-tuned for.")
    return ("trimmed audio context: CTranslate2 accepts mel input shorter than 3000 frames (it refuses "
            "longer input) and its encoder then uses the first frames/2 positional embeddings, the same "
            "computation as the trimmed HF encoder. asr-lora's --ct2 backend feeds trimmed features, so "
            "this export runs as trained (the CER above is measured that way). faster-whisper always pads "
            "to 30 s, so there the model runs with the full context it was not fine-tuned for.")


def export_ct2(merged_dir: str | Path, out: str | Path, *, quantization: str = "int8",
               data: str | Path | None = None, n_clips: int = PARITY_CLIPS,
               max_new_tokens: int = PARITY_MAX_NEW_TOKENS, tolerance: float | None = None,
               batch_size: int = 8, log=print) -> dict:
    """Convert a merged HF Whisper folder to CTranslate2 in ``out`` and verify its CER; returns the report.

    Raises :class:`ParityError` when the export's CER exceeds the merged model's by more than
    ``tolerance`` (default from :data:`CER_TOLERANCE`).
    """
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    from .metrics import score

    merged_dir, out = Path(merged_dir), Path(out)
    source = ModelSource("merged", str(merged_dir))
    source.check()
    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    tolerance = CER_TOLERANCE[quantization] if tolerance is None else tolerance
    manifest, clips, skipped = _prepare(out, merged_dir, data, n_clips)
    settings = read_settings(merged_dir)
    num_mel_bins = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))["num_mel_bins"]
    times = {}

    with staged_folder(out) as work:
        t0 = time.perf_counter()
        log(f"converting {merged_dir} with ctranslate2 {ctranslate2.__version__} ({quantization})")
        TransformersConverter(str(merged_dir), copy_files=["tokenizer.json"]).convert(
            str(work), quantization=quantization, force=True)
        write_preprocessor_config(merged_dir, work, num_mel_bins)
        write_settings(work, _carried_settings(settings), quantization=quantization)
        times["convert"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        log(f"parity: CER of the export vs the merged model on {len(clips)} clips of {manifest}")
        options = DecodeOptions(max_new_tokens=max_new_tokens, temperatures=(0.0,), no_speech_threshold=None)
        hf_model, processor, hf_settings = load_hf(source)
        hf = HFTranscriber(hf_model, processor.tokenizer, hf_settings, options, f"merged:{merged_dir}")
        ct = CT2Transcriber(work, settings, options)
        audios = [c.audio for c in clips]
        hyps_hf, hyps_ct = [], []
        for i in range(0, len(audios), batch_size):
            hyps_hf += hf.transcribe_batch(audios[i:i + batch_size])
            hyps_ct += ct.transcribe_batch(audios[i:i + batch_size])
        times["check"] = time.perf_counter() - t0
        refs, ids = [c.text for c in clips], [c.id for c in clips]
        cer_hf, cer_ct = score(refs, hyps_hf, ids).cer, score(refs, hyps_ct, ids).cer
        diff = cer_ct - cer_hf
        same = [a == b for a, b in zip(hyps_hf, hyps_ct)]
        accepts_short = ct2_accepts_short_input(work, num_mel_bins) if settings.audio_context == "trimmed" else None
        passed = math.isfinite(diff) and diff <= tolerance
        report = {"n": len(clips), "cer_hf": cer_hf, "cer_ct2": cer_ct, "cer_diff": diff,
                  "transcripts_identical_fraction": sum(same) / len(same), "quantization": quantization,
                  "passed": passed, "tolerance": tolerance, "audio_context": settings.audio_context,
                  "audio_context_note": audio_context_note(settings, accepts_short),
                  "ct2_accepts_short_input": accepts_short, "feature_size": num_mel_bins,
                  "ctranslate2": ctranslate2.__version__, "merged": str(merged_dir.resolve()),
                  "data": str(manifest.resolve()), "ids": ids, "skipped": skipped, "max_new_tokens": max_new_tokens,
                  "language": settings.language,
                  "mismatches": [{"id": c.id, "hf": a, "ct2": b}
                                 for c, a, b, s in zip(clips, hyps_hf, hyps_ct, same) if not s],
                  "seconds": {k: round(v, 3) for k, v in times.items()}}
        return _finish(work, out, report, EXPORT_REPORT, ("model.bin",),
                       f"export parity check failed: CER {cer_ct:.4f} (CTranslate2 {quantization}) vs {cer_hf:.4f} "
                       f"(merged HF), +{diff:.4f} > tolerance {tolerance:g}",
                       ". A few clips give a noisy CER: --n-clips raises the sample, --tolerance the limit, or "
                       "export a wider type")
