#!/usr/bin/env python3
"""Whisper's no-speech signal on the demo clips: no_speech_prob and greedy avg_logprob, speech vs non-speech.

For every clip: full 30 s features (``log_mel_spectrogram(padding="max_length")``, as openai/whisper and
faster-whisper feed the model); ``no_speech_prob`` from the decoder's logits at the
``<|startoftranscript|>`` position (:mod:`asr_lora.nospeech`); a greedy decoding with Korean and
transcription forced (the model's generation config: its suppressed tokens), its ``avg_logprob``
(log-softmax of the processed logits, ``<|endoftext|>`` included, over text tokens + 1) and
``compression_ratio``. Then, for openai/whisper's rule (``no_speech_prob > T`` and not
``avg_logprob > L``) over a grid of T and L, the share of non-speech clips found silent and the share
of speech clips wrongly found silent.

    python benchmarks/measure_nospeech.py                      # the bundled base, dev clips (~4 min on 2 cores)
    python benchmarks/measure_nospeech.py --model models/demo-merged --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from asr_lora import nospeech  # noqa: E402
from asr_lora.audio import load_audio, log_mel_spectrogram  # noqa: E402

DEMO = REPO / "data" / "demo"


def read_clips(manifest: Path, limit: int | None) -> list[tuple[dict, np.ndarray]]:
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    return [(row, load_audio(manifest.parent / row["audio"])) for row in rows]


@torch.no_grad()
def measure(model, tokenizer, audios: list[np.ndarray], language: str, max_new_tokens: int) -> list[dict]:
    """no_speech_prob, avg_logprob, compression_ratio and text of one batch of clips."""
    vocab = tokenizer.get_vocab()
    prefix = [vocab["<|startoftranscript|>"], vocab[f"<|{language}|>"], vocab["<|transcribe|>"],
              vocab["<|notimestamps|>"]]
    eot, no_speech = vocab["<|endoftext|>"], nospeech.no_speech_token_id(tokenizer)
    features, _ = log_mel_spectrogram(audios, n_mels=model.config.num_mel_bins, padding="max_length")
    encoded = model.get_encoder()(features)
    logits = model(encoder_outputs=encoded, decoder_input_ids=torch.tensor([prefix] * len(audios))).logits
    p_no_speech = nospeech.no_speech_prob(logits, no_speech, sot_index=0).tolist()
    out = model.generate(encoder_outputs=encoded, language=language, task="transcribe",
                         max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
                         return_dict_in_generate=True, output_scores=True)
    results = []
    for b in range(len(audios)):
        generated = out.sequences[b, len(prefix):].tolist()
        sum_logprob, n_text = 0.0, 0
        for step, token in enumerate(generated):
            sum_logprob += torch.log_softmax(out.scores[step][b].float(), dim=-1)[token].item()
            if token == eot:
                break
            n_text += 1
        text = tokenizer.decode(generated[:n_text], skip_special_tokens=True).strip()
        avg = nospeech.avg_logprob(sum_logprob, n_text)
        results.append({"no_speech_prob": p_no_speech[b], "avg_logprob": avg, "n_tokens": n_text,
                        "compression_ratio": nospeech.compression_ratio(text), "text": text})
    return results


def silent(r: dict, threshold: float | None = nospeech.NO_SPEECH_THRESHOLD,
           logprob: float | None = nospeech.LOGPROB_THRESHOLD, loops: bool = False) -> bool:
    """openai/whisper's rule; ``loops``: a repetitive decoding does not count as confident."""
    return nospeech.is_silent(r["no_speech_prob"], r["avg_logprob"], threshold, logprob,
                              compression=r["compression_ratio"] if loops else None)


def summary(name: str, rows: list[dict]) -> str:
    p = [r["no_speech_prob"] for r in rows]
    lp = [r["avg_logprob"] for r in rows]
    n = len(rows)
    return (f"{name:15s} {n:3d}  {sum(bool(r['text']) for r in rows) / n:6.3f}"
            f"  {statistics.median(p):6.3f} {min(p):6.3f} {max(p):6.3f}  {sum(x > 0.6 for x in p) / n:5.3f}"
            f"  {statistics.median(lp):7.3f}  {sum(x < -1.0 for x in lp) / n:6.3f}"
            f"  {sum(r['compression_ratio'] > 2.4 for r in rows) / n:6.3f}  {sum(map(silent, rows)) / n:6.3f}"
            f"  {sum(silent(r, loops=True) for r in rows) / n:6.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled:whisper-base", help="bundled name or HF model folder")
    parser.add_argument("--speech", type=Path, default=DEMO / "dev.jsonl")
    parser.add_argument("--nonspeech", type=Path, default=DEMO / "nonspeech_dev.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="clips per manifest")
    parser.add_argument("--language", default="ko")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="write every clip's numbers here")
    parser.add_argument("--from-json", type=Path, default=None, help="print the tables of an earlier --json run")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text(encoding="utf-8"))
        print(f"model {saved['model']} (from {args.from_json})\n")
        report(saved["results"])
        return 0

    from transformers import AutoTokenizer, WhisperForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from asr_lora.bundled import resolve_model

    hf_logging.set_verbosity_error()
    path = resolve_model(args.model)
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    groups = {"speech": read_clips(args.speech, args.limit), "non-speech": read_clips(args.nonspeech, args.limit)}
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for group, clips in groups.items():
        results[group] = []
        for i in range(0, len(clips), args.batch_size):
            batch = clips[i:i + args.batch_size]
            for (row, _), r in zip(batch, measure(model, tokenizer, [a for _, a in batch], args.language,
                                                   args.max_new_tokens)):
                results[group].append({"id": row["id"], "kind": row.get("kind", "speech"), **r})
    print(f"model {args.model}; {sum(map(len, groups.values()))} clips in {time.perf_counter() - start:.0f} s; "
          f"max_new_tokens {args.max_new_tokens}\n")

    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "results": results}, ensure_ascii=False, indent=1) + "\n",
                             encoding="utf-8")
    report(results)
    return 0


def report(results: dict[str, list[dict]]) -> None:
    print("per clip: no_speech_prob  avg_logprob  compression  silent(0.6, -1.0)  text")
    for group, rows in results.items():
        for r in rows:
            print(f"  {r['id']:20s} {r['kind']:12s} {r['no_speech_prob']:6.3f} {r['avg_logprob']:7.3f}"
                  f" {r['compression_ratio']:6.2f} {'silent' if silent(r) else '      '}  {r['text'][:50]!r}")

    print("\nshares of clips: with output text; no_speech_prob median, min, max, share > 0.6; avg_logprob median,"
          " share < -1.0; compression ratio > 2.4; silent by openai's rule (0.6, -1.0); the same with loops not"
          " counting as confident")
    print("                  n  output  nsp med    min    max   >0.6  lp med  < -1.0  cr>2.4  openai  +loops")
    kinds = sorted({r["kind"] for r in results["non-speech"]})
    for group, rows in results.items():
        print(summary(group, rows))
    for kind in kinds:
        print(summary(f"  {kind}", [r for r in results["non-speech"] if r["kind"] == kind]))

    for loops in (False, True):
        print(f"\nopenai/whisper's rule{' with loops (compression ratio > 2.4) not counting as confident' if loops else ''}"
              " at other thresholds: non-speech clips found silent / speech clips found silent")
        logprob_thresholds = [-1.0, -0.7, -0.5, -0.3, None]
        print("no_speech_threshold " + "".join(f"  L={'none' if t is None else t:>12}" for t in logprob_thresholds))
        for threshold in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
            cells = []
            for lp in logprob_thresholds:
                ns = [silent(r, threshold, lp, loops) for r in results["non-speech"]]
                sp = [silent(r, threshold, lp, loops) for r in results["speech"]]
                cells.append(f"  {sum(ns) / len(ns):6.3f} / {sum(sp) / len(sp):5.3f}")
            print(f"{threshold:19.1f} " + "".join(cells))


if __name__ == "__main__":
    sys.exit(main())
