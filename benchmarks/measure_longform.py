"""Does transcription keep every sentence? Long files and multi-sentence clips made of demo test clips.

What a user gets, through the commands a user runs (``asr-lora transcribe``, ``asr-lora serve`` with the
official ``openai`` client, ``asr-lora eval``), for one model:

- **2-minute file**: demo test clips in manifest order, 0.5 s of silence between them, until 120 s.
  ``transcribe`` CER on it against the same clips transcribed one by one, and how many utterances are
  missing (half or more of their characters deleted in the alignment).
- **two-sentence clips**: consecutive test clips in pairs, 0.4 s apart; how many keep both sentences
  (each with less than half of its characters deleted).
- **fallback**: every piece ``transcribe`` decoded, its kept avg log-prob against a greedy decoding of
  the same piece; a kept result below greedy's is one the fallback made worse.
- with ``--serve`` (and a source tree that has ``eval --as-transcribe``): ``serve`` CER over all these
  inputs against the eval mode that decodes as transcribe does.

Runs the CLI of the source tree it sits in (``python -m asr_lora.cli``), so the same script measures an
older checkout. Usage::

    python benchmarks/measure_longform.py --adapter runs/demo/best --out /tmp/longform [--serve]
    python benchmarks/measure_longform.py --ct2 models/demo-ct2 --out /tmp/longform-ct2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asr_lora.audio import SAMPLE_RATE, load_audio  # noqa: E402
from asr_lora.metrics import score  # noqa: E402
from asr_lora.text import normalize  # noqa: E402

DEMO = REPO / "data" / "demo"
FILE_SECONDS = 120.0
FILE_PAUSE = 0.5
PAIR_PAUSE = 0.4


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asr_lora.cli", *args], cwd=REPO, capture_output=True, text=True,
                          check=True, **kwargs)


def test_rows() -> list[dict]:
    rows = [json.loads(line) for line in (DEMO / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r["audio"] = str(DEMO / r["audio"])
    return rows


def join(rows: list[dict], pause: float) -> np.ndarray:
    gap = np.zeros(int(pause * SAMPLE_RATE), dtype=np.float32)
    parts = []
    for k, r in enumerate(rows):
        parts += ([gap] if k else []) + [load_audio(r["audio"])]
    return np.concatenate(parts)


def build(out: Path) -> dict:
    """The inputs: long.flac, pair-NN.flac, their manifests (single clips, pairs, everything)."""
    rows = test_rows()
    used, seconds = [], 0.0
    for r in rows:
        if seconds >= FILE_SECONDS:
            break
        used.append(r)
        seconds += r["duration"] + FILE_PAUSE
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    sf.write(audio_dir / "long.flac", join(used, FILE_PAUSE), SAMPLE_RATE)
    pairs = []
    for k in range(0, len(rows) - 1, 2):
        pair = rows[k:k + 2]
        path = audio_dir / f"pair-{k // 2 + 1:02d}.flac"
        sf.write(path, join(pair, PAIR_PAUSE), SAMPLE_RATE)
        pairs.append({"id": path.stem, "audio": str(path), "text": " ".join(r["text"] for r in pair),
                      "sentences": [r["text"] for r in pair]})
    long_row = {"id": "long", "audio": str(audio_dir / "long.flac"), "text": " ".join(r["text"] for r in used),
                "sentences": [r["text"] for r in used]}

    def manifest(name: str, items: list[dict]) -> Path:
        path = out / name
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sentences"}, ensure_ascii=False)
                                + "\n" for r in items), encoding="utf-8")
        return path

    return {"used": used, "long": long_row, "pairs": pairs,
            "singles_manifest": manifest("singles.jsonl", used), "pairs_manifest": manifest("pairs.jsonl", pairs),
            "all_manifest": manifest("all.jsonl", [long_row, *pairs, *rows])}


def transcribe_json(model_args: list[str], manifest: Path, out: Path) -> dict[str, dict]:
    """``asr-lora transcribe MANIFEST --format json --out DIR``: the JSON of each row, by id."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cli("transcribe", str(manifest), *model_args, "--format", "json", "--out", str(out), "--no-progress")
    seconds = time.perf_counter() - t0
    results = {}
    for line in manifest.read_text(encoding="utf-8").splitlines():
        uid = json.loads(line)["id"]
        results[uid] = json.loads((out / f"{uid}.json").read_text(encoding="utf-8"))
    results["_seconds"] = seconds
    return results


def deleted_share(sentences: list[str], hyp: str) -> list[float]:
    """Per sentence, the share of its characters (spaces left out) deleted when the hypothesis is aligned
    to the sentences joined."""
    import jiwer

    refs = [normalize(s).replace(" ", "") for s in sentences]
    ref, hyp = "".join(refs), normalize(hyp).replace(" ", "")
    owner = np.repeat(np.arange(len(refs)), [len(r) for r in refs])
    deleted = np.zeros(len(ref), dtype=bool)
    if hyp:
        out = jiwer.process_characters(ref, hyp)
        for chunk in out.alignments[0]:
            if chunk.type == "delete":
                deleted[chunk.ref_start_idx:chunk.ref_end_idx] = True
    else:
        deleted[:] = True
    return [float(deleted[owner == k].mean()) if len(r) else 0.0 for k, r in enumerate(refs)]


def fallback_check(source_args: tuple[str, str], results: dict[str, dict], inputs: dict[str, str]) -> dict:
    """Every decoded piece: its kept avg log-prob against greedy decoding of the same piece."""
    from asr_lora.backends import DecodeOptions
    from asr_lora.sources import ModelSource, load_transcriber

    greedy = load_transcriber(ModelSource(*source_args), DecodeOptions(temperatures=(0.0,)))
    pieces, worse, resampled = 0, [], 0
    for uid, result in results.items():
        if uid.startswith("_"):
            continue
        audio = load_audio(inputs[uid])
        decoded = [s for s in result["segments"] if s.get("avg_logprob") is not None]
        clips = [audio[int(round(s["start"] * SAMPLE_RATE)):int(round(s["end"] * SAMPLE_RATE))] for s in decoded]
        for s, h in zip(decoded, greedy.decode(clips) if clips else []):
            pieces += 1
            if s["temperature"] > 0:
                resampled += 1
                if h.avg_logprob is not None and s["avg_logprob"] < round(h.avg_logprob, 4) - 1e-4:
                    worse.append({"id": uid, "start": s["start"], "kept": s["text"], "kept_avg_logprob": s["avg_logprob"],
                                  "temperature": s["temperature"], "greedy": h.text,
                                  "greedy_avg_logprob": round(h.avg_logprob, 4)})
    return {"pieces": pieces, "resampled": resampled, "kept_below_greedy": len(worse), "examples": worse[:5]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_vs_eval(serve_args: list[str], eval_args: list[str], manifest: Path, out: Path) -> dict:
    """CER of ``serve`` (openai client, json) and of ``eval --as-transcribe`` over ``manifest``."""
    import openai

    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "asr_lora.cli", "serve", *serve_args, "--port", str(port)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        for _ in range(600):
            try:
                names = [m.id for m in client.models.list().data]  # the tuned model and its base
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"the server did not come up: {server.stderr.read()[-2000:] if server.poll() else ''}")
        name = "tuned"
        assert name in names, names
        hyps, t0 = [], time.perf_counter()
        for r in rows:
            with open(r["audio"], "rb") as f:
                hyps.append(client.audio.transcriptions.create(model=name, file=f, response_format="json").text)
        serve_seconds = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=60)
    (out / "served.jsonl").write_text("".join(json.dumps({"id": r["id"], "hyp": h}, ensure_ascii=False) + "\n"
                                              for r, h in zip(rows, hyps)), encoding="utf-8")
    served = score([r["text"] for r in rows], hyps)
    cli("eval", *eval_args, "--data", str(manifest), "--as-transcribe", "--out", str(out / "eval"), "--no-progress")
    summary = json.loads((out / "eval" / "summary.json").read_text())
    return {"n": len(rows), "serve_seconds": round(serve_seconds, 1), "serve_cer": served.cer, "eval_transcribe_cer": summary["transcribe"]["cer"],
            "eval_clip_cer": summary["cer"], "serve_minus_eval": served.cer - summary["transcribe"]["cer"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--adapter", help="a LoRA checkpoint folder")
    group.add_argument("--merged", help="an 'asr-lora merge' folder")
    group.add_argument("--ct2", help="an 'asr-lora export-ct2' folder")
    parser.add_argument("--out", required=True, help="work folder (inputs and outputs)")
    parser.add_argument("--serve", action="store_true", help="also serve vs eval --as-transcribe")
    parser.add_argument("--serve-only", action="store_true", help="only serve vs eval --as-transcribe")
    args = parser.parse_args()
    kind, path = next((k, p) for k, p in (("adapter", args.adapter), ("merged", args.merged), ("ct2", args.ct2)) if p)
    path = str(Path(path).resolve())
    model_args = [f"--{kind}", path]
    out = Path(args.out)
    material = build(out)
    if args.serve_only:
        report = serve_vs_eval([f"--{kind}", f"tuned={path}"], model_args, material["all_manifest"], out)
        print(json.dumps(report, ensure_ascii=False, indent=2))
        (out / "serve_vs_eval.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        return
    inputs = {r["id"]: r["audio"] for r in [material["long"], *material["pairs"], *material["used"]]}

    singles = transcribe_json(model_args, material["singles_manifest"], out / "singles")
    long_result = transcribe_json(model_args, _one(out, material["long"]), out / "long")
    pairs = transcribe_json(model_args, material["pairs_manifest"], out / "pairs")

    used = material["used"]
    one_by_one = score([r["text"] for r in used], [singles[r["id"]]["text"] for r in used])
    long_hyp = long_result["long"]["text"]
    long_score = score([material["long"]["text"]], [long_hyp])
    missing = [k for k, d in enumerate(deleted_share(material["long"]["sentences"], long_hyp)) if d >= 0.5]
    pair_shares = [deleted_share(p["sentences"], pairs[p["id"]]["text"]) for p in material["pairs"]]
    both = sum(all(d < 0.5 for d in shares) for shares in pair_shares)
    pair_score = score([p["text"] for p in material["pairs"]], [pairs[p["id"]]["text"] for p in material["pairs"]])
    decoded = [s for s in long_result["long"]["segments"] if s.get("avg_logprob") is not None]
    report = {
        "model": path,
        "long_file": {"seconds": round(sum(r["duration"] for r in used) + FILE_PAUSE * (len(used) - 1), 1),
                      "utterances": len(used), "cer": long_score.cer,
                      "deletion_rate": long_score.chars.deletions / max(long_score.chars.ref, 1),
                      "chars_ref": long_score.chars.ref, "chars_hyp": long_score.chars.hyp,
                      "missing_utterances": len(missing), "pieces": len(decoded),
                      "redecoded_pieces": sum(1 for s in decoded if s.get("redecoded")),
                      "transcribe_seconds": round(long_result["_seconds"], 1)},
        "one_by_one": {"cer": one_by_one.cer, "utterances": len(used)},
        "long_minus_one_by_one": long_score.cer - one_by_one.cer,
        "two_sentence_clips": {"n": len(material["pairs"]), "both_kept": both, "cer": pair_score.cer},
        "fallback": fallback_check((kind, path), {**pairs, "long": long_result["long"], **singles}, inputs),
    }
    print(json.dumps(report, ensure_ascii=False, indent=2), flush=True)
    if args.serve:
        report["serve_vs_eval"] = serve_vs_eval([f"--{kind}", f"tuned={path}"], model_args, material["all_manifest"],
                                                out)
        print(json.dumps(report["serve_vs_eval"], ensure_ascii=False, indent=2))
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")


def _one(out: Path, row: dict) -> Path:
    path = out / "long.jsonl"
    path.write_text(json.dumps({k: v for k, v in row.items() if k != "sentences"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    return path


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()  # as the CLI does
    main()
