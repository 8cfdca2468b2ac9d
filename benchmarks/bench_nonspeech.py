#!/usr/bin/env python3
"""Does a model invent text for non-speech? The share of non-speech clips that get any output.

For each model (the untuned base, and any number of LoRA checkpoints), on the demo's held-out
non-speech clips (``data/demo/nonspeech_test.jsonl``: noise of several colours and levels, tones,
chords, clicks, hum, music-like sequences, mixtures), side by side in one run:

- ``no gating``: every clip decoded greedily, no silence rule, no VAD (what a plain generate loop does);
- ``silence rule``: asr-lora's decode path (no-speech probability, average log-probability,
  compression ratio, temperature fallback), no VAD;
- ``VAD + rule``: ``asr-lora transcribe``'s default (Silero VAD first, then the rule);
- ``faster-whisper``: with ``--ct2 NAME=DIR``, the CTranslate2 export served by faster-whisper with its
  defaults (``WhisperModel.transcribe(language="ko")``: its own no-speech and log-prob thresholds, no VAD).

And, as a check that gating costs no speech, the CER on the demo's speech test clips for each model
under ``silence rule``.

    python benchmarks/bench_nonspeech.py --adapter tuned=runs/demo/best --adapter plain=runs/plain/best \
        --ct2 base=/path/to/bundled-ct2 --ct2 tuned=models/demo-ct2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from asr_lora.audio import load_audio  # noqa: E402
from asr_lora.backends import DecodeOptions  # noqa: E402
from asr_lora.data.manifest import read_rows  # noqa: E402
from asr_lora.sources import ModelSource, load_transcriber  # noqa: E402

DEMO = REPO / "data" / "demo"


def share_with_output(transcriber, clips, vad: bool) -> float:
    from asr_lora.transcribe import pieces

    outputs = 0
    for audio in clips:
        cuts = [audio[a:b] for a, b, reason, _ in pieces(audio, "windows", vad) if reason is None]
        texts = [h.text for h in transcriber.decode(cuts)] if cuts else []
        outputs += any(texts)
    return outputs / len(clips)


def measure_hf(name: str, source: ModelSource, clips, speech, fallback: bool) -> dict:
    plain = DecodeOptions(no_speech_threshold=None, logprob_threshold=None, compression_ratio_threshold=None,
                          temperatures=(0.0,), max_new_tokens=64)
    gated = DecodeOptions(max_new_tokens=64, **({} if fallback else {"temperatures": (0.0,)}))
    t0 = time.perf_counter()
    transcriber = load_transcriber(source, plain)
    row = {"model": name, "no_gating": share_with_output(transcriber, clips, vad=False)}
    transcriber.options = gated
    row["silence_rule"] = share_with_output(transcriber, clips, vad=False)
    row["vad_and_rule"] = share_with_output(transcriber, clips, vad=True)
    from asr_lora.evaluate import evaluate_rows

    transcriber.options = DecodeOptions(max_new_tokens=64, temperatures=(0.0,), bound_by_reference=True)
    row["speech_cer_with_rule"] = evaluate_rows(transcriber, speech, batch_size=16).report.cer
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def measure_faster_whisper(folder: str, clips, speech) -> dict:
    """faster-whisper with its defaults on a CTranslate2 export: the share of the non-speech clips that
    got any output, and on the speech test clips the number left empty and the CER (silence must not
    cost speech)."""
    from faster_whisper import WhisperModel

    from asr_lora.metrics import score

    model = WhisperModel(folder, device="cpu", compute_type="default")

    def text(audio) -> str:
        segments, _ = model.transcribe(audio, language="ko")
        return " ".join(s.text.strip() for s in segments).strip()

    share = sum(bool(text(audio)) for audio in clips) / len(clips)
    hyps = [text(load_audio(r.audio, offset=r.offset, end=r.end)) for r in speech]
    return {"nonspeech_share": share, "speech_empty": sum(not h for h in hyps),
            "speech_cer": score([r.text for r in speech], hyps).cer}


def long_form(source: ModelSource, vad: bool, seconds: float = 120.0) -> dict:
    """A 2-minute file of demo test speech with noise and music-like gaps between utterances: cues
    inside the gaps, looping cues, and CER of the whole text against the clips' texts."""
    import importlib.util

    from asr_lora.evaluate import hypothesis_loops
    from asr_lora.metrics import score
    from asr_lora.transcribe import piece_limits, pieces

    spec = importlib.util.spec_from_file_location("make_nonspeech", REPO / "scripts" / "make_nonspeech.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    audio, speech = make.build_longform(seconds=seconds, seed=0)
    transcriber = load_transcriber(source, DecodeOptions(max_new_tokens=96, temperatures=(0.0,)))
    cues = []
    for a, b, reason, _ in pieces(audio, "pauses", vad, *piece_limits(transcriber.settings)):
        if reason is None:
            hyp = transcriber.decode([audio[a:b]])[0]
            if hyp.text:
                cues.append((a / 16000, b / 16000, hyp.text))
    gaps = [(x[1] + 0.75, y[0] - 0.75) for x, y in zip(speech, speech[1:]) if y[0] - x[1] >= 2.0]
    inside = sum(any(c0 < g1 and c1 > g0 for g0, g1 in gaps) for c0, c1, _ in cues)
    loops = sum(hypothesis_loops(text) for *_, text in cues)
    cer = score([" ".join(t for *_, t in speech)], [" ".join(t for *_, t in cues)]).cer
    return {"seconds": round(len(audio) / 16000, 1), "utterances": len(speech), "cues": len(cues),
            "cues_inside_gaps": inside, "looping_cues": loops, "cer": cer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="bundled:whisper-base")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--ct2", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--clips", default=str(DEMO / "nonspeech_test.jsonl"))
    parser.add_argument("--speech", default=str(DEMO / "test.jsonl"))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--no-fallback", action="store_true",
                        help="the silence rule without temperature fallback (faster: an untuned model loops and "
                        "is re-decoded up to 5 times per clip)")
    parser.add_argument("--long-form", default=None, metavar="NAME=DIR",
                        help="also transcribe a 2-minute speech + noise/music file with this adapter, VAD on and off")
    args = parser.parse_args()

    rows, _ = read_rows(args.clips)
    clips = [load_audio(r.audio, offset=r.offset, end=r.end) for r in rows]
    speech, _ = read_rows(args.speech)
    fallback = not args.no_fallback
    sources = [("base (untuned)", ModelSource("model", args.base))]
    sources += [(spec.split("=", 1)[0], ModelSource("adapter", spec.split("=", 1)[1])) for spec in args.adapter]
    results = []
    for name, source in sources:  # each row as soon as it is measured: a long run keeps what it has
        results.append(measure_hf(name, source, clips, speech, fallback))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    fw = {}
    for spec in args.ct2:
        name, folder = spec.split("=", 1)
        fw[name] = measure_faster_whisper(folder, clips, speech)
    print(f"share of {len(clips)} non-speech clips ({args.clips}) that got any output (lower is better); "
          f"silence rule {'with' if fallback else 'without'} temperature fallback")
    print(f"| model | no gating | silence rule | VAD + rule | speech test CER (rule) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['no_gating']:.3f} | {r['silence_rule']:.3f} | {r['vad_and_rule']:.3f} | "
              f"{r['speech_cer_with_rule']:.4f} |")
    if fw:
        print("\nfaster-whisper with its defaults on the CTranslate2 exports:")
        for name, r in fw.items():
            print(f"  {name}: {r['nonspeech_share']:.3f} of the non-speech clips got output "
                  f"({round((1 - r['nonspeech_share']) * len(clips))} silent); speech test clips: "
                  f"{r['speech_empty']} of {len(speech)} empty, CER {r['speech_cer']:.4f}")
    longform = {}
    if args.long_form:
        name, folder = args.long_form.split("=", 1)
        for vad in (True,):
            longform["vad" if vad else "no_vad"] = r = long_form(ModelSource("adapter", folder), vad)
            print(f"\nlong form ({name}, {'VAD + rule' if vad else 'rule only, pauses'}): {r['seconds']} s, "
                  f"{r['utterances']} utterances -> {r['cues']} cues, {r['cues_inside_gaps']} inside the gaps, "
                  f"{r['looping_cues']} looping, CER {r['cer']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"models": results, "faster_whisper": fw, "long_form": longform},
                                              indent=2))


if __name__ == "__main__":
    main()
