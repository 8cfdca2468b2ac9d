"""Serving throughput: `asr-lora serve` with batching on and off, side by side, and `asr-lora transcribe`
on the same clips for reference.

For each mode the server is started as its own process on 127.0.0.1 (``--batch-size 8 --batch-wait-ms
10``, the defaults, vs ``--no-batching``), warmed up with two requests, then C client threads send a
fixed number of requests (demo test clips, round robin) through the official ``openai`` client, each
thread sending its next request as soon as its last is answered (a bounded loop). Reported per mode
and C: requests/s over the wall time of the loop, p50/p95 latency, and the server's own batch count.
The transcripts are checked against `asr-lora transcribe`'s for the same clips. `asr-lora transcribe`
itself runs on the same clips twice: the command end to end (process start and model load included),
and its decode loop alone in this process (the model already loaded, like a running server).

    python benchmarks/bench_serve.py --threads 1 --requests 32 --concurrency 1 8 --write
    python benchmarks/bench_serve.py --adapter runs/demo/best --label "the demo adapter" --threads 1 --write
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODES = {"batching on": ["--batch-size", "8", "--batch-wait-ms", "10"], "batching off": ["--no-batching"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(source: list[str], extra: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "asr_lora.cli", "serve", *source, "--port", str(port), *extra],
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready in 600 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_clients(url: str, model: str, clips: list[Path], n_requests: int, concurrency: int) -> dict:
    """``n_requests`` transcriptions from ``concurrency`` threads; latencies, wall time and texts."""
    import openai

    payloads = [(p.name, p.read_bytes()) for p in clips]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    lock, next_index = threading.Lock(), [0]
    latencies, texts = [0.0] * n_requests, [""] * n_requests

    def worker():
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= n_requests:
                return
            t0 = time.perf_counter()
            texts[i] = client.audio.transcriptions.create(model=model, file=payloads[i % len(payloads)]).text
            latencies[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_seconds": wall, "requests_per_second": n_requests / wall,
            "p50_seconds": float(np.percentile(latencies, 50)), "p95_seconds": float(np.percentile(latencies, 95)),
            "texts": texts}


def measure_server(mode: str, args, clips: list[Path], env: dict, work: Path, reference: list[str],
                   refs: list[str]) -> list[dict]:
    import httpx

    source = ["--adapter", f"bench={args.adapter}"] if args.adapter else ["--model", f"bench={args.model}"]
    proc, url = start_server(source, MODES[mode] + ["--max-new-tokens", str(args.max_new_tokens)], env,
                             work / f"server-{mode.replace(' ', '-')}.log")
    rows = []
    try:
        run_clients(url, "bench", clips[:2], 2, 1)  # warm-up
        for c in args.concurrency:
            before = httpx.get(f"{url}/health").json()
            print(f"# {mode}, {c} client(s), {args.requests} requests", file=sys.stderr, flush=True)
            result = run_clients(url, "bench", clips, args.requests, c)
            after = httpx.get(f"{url}/health").json()
            texts = result.pop("texts")
            same = sum(t == reference[i % len(reference)] for i, t in enumerate(texts))
            rows.append({"mode": mode, "concurrency": c, "requests": args.requests, **result,
                         "batches": after["batches"] - before["batches"], "same_as_transcribe": same,
                         "cer": cer(texts, refs)})
    finally:
        stop_server(proc)
    return rows


def cer(texts: list[str], refs: list[str]) -> float:
    """Corpus CER of request ``i``'s transcript against clip ``i % len(refs)``'s reference."""
    from asr_lora.metrics import score

    return score([refs[i % len(refs)] for i in range(len(texts))], texts).cer


def measure_transcribe(args, clips: list[Path], refs: list[str], env: dict) -> tuple[dict, list[str]]:
    """`asr-lora transcribe` on the clips: the command end to end, and its decode loop alone."""
    import io

    from asr_lora.sources import load_transcriber
    from asr_lora.transcribe import Writer, expand_inputs, transcribe_items

    source = ["--adapter", str(args.adapter)] if args.adapter else ["--model", args.model]
    paths = [str(clips[i % len(clips)]) for i in range(args.requests)]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "asr_lora.cli", "transcribe", *paths, *source, "--no-progress",
                          "--max-new-tokens", str(args.max_new_tokens)], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True)
    command_seconds = time.perf_counter() - t0
    texts = [line.split("\t", 1)[1] if "\t" in line else "" for line in out.stdout.splitlines()]

    from asr_lora.backends import DecodeOptions
    from asr_lora.sources import ModelSource

    kind = ModelSource("adapter", str(args.adapter)) if args.adapter else ModelSource("model", args.model)
    transcriber = load_transcriber(kind, DecodeOptions(max_new_tokens=args.max_new_tokens))
    items, _ = expand_inputs(paths)
    transcribe_items(transcriber, items[:2], Writer("txt", None, "ko", io.StringIO()), progress=False)  # warm-up
    t0 = time.perf_counter()
    transcribe_items(transcriber, items, Writer("txt", None, "ko", io.StringIO()), progress=False)
    loop_seconds = time.perf_counter() - t0
    return {"command_seconds": command_seconds, "loop_seconds": loop_seconds, "requests": args.requests,
            "cer": cer(texts, refs)}, texts


def markdown(results: dict) -> str:
    tx = results["transcribe"]
    n = tx["requests"]
    lines = [
        f"Measured {results['date']} on {results['device']} (torch threads: {results['threads']}; load average "
        f"{results['load_before']:.1f} before the run, {results['load_after']:.1f} after: other jobs shared the "
        f"machine), {results['model']}, {n} requests per row over {results['n_clips']} demo test clips (mean "
        f"{results['mean_clip_seconds']:.1f} s), greedy decoding capped at {results['max_new_tokens']} tokens, "
        "client and server on 127.0.0.1. Batching on: up to 8 pieces per batch, 10 ms wait; off: "
        "`--no-batching`.",
        "",
        "| mode | clients | requests/s | vs off | p50 latency | p95 latency | batches | CER | transcripts equal to `transcribe`'s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    off = {r["concurrency"]: r["requests_per_second"] for r in results["server"] if r["mode"] == "batching off"}
    for r in sorted(results["server"], key=lambda r: (r["concurrency"], r["mode"] != "batching on")):
        ratio = r["requests_per_second"] / off[r["concurrency"]] if r["concurrency"] in off else float("nan")
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests_per_second']:.2f} | {ratio:.2f}x | "
                     f"{r['p50_seconds']:.2f} s | {r['p95_seconds']:.2f} s | {r['batches']} | {r['cer']:.4f} | "
                     f"{r['same_as_transcribe']}/{r['requests']} |")
    lines += ["", f"`asr-lora transcribe` on the same {n} clips (batch 8): {n / tx['command_seconds']:.2f} clips/s "
              f"as a command ({tx['command_seconds']:.1f} s with process start and model load), "
              f"{n / tx['loop_seconds']:.2f} clips/s for its decode loop alone ({tx['loop_seconds']:.1f} s, model "
              f"loaded); CER {tx['cer']:.4f}.", "", "Numbers from one run."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:whisper-base", help="base model (default %(default)s)")
    parser.add_argument("--adapter", type=Path, default=None, help="serve this LoRA checkpoint instead of the base")
    parser.add_argument("--label", default=None, help="how the table names the model (default: its path)")
    parser.add_argument("--data", type=Path, default=REPO / "data/demo/test.jsonl")
    parser.add_argument("--clips", type=int, default=16, help="distinct clips, sent round robin (default %(default)s)")
    parser.add_argument("--requests", type=int, default=32, help="requests per row (default %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="client threads per row")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="OMP/torch threads of every process (default: torch's)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_training import device_name, write_benchmarks_md

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("ASR_LORA_API_KEY", None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines()][: args.clips]
    clips = [args.data.parent / r["audio"] for r in rows]
    work = Path(tempfile.mkdtemp(prefix="asr-lora-bench-serve-"))
    results = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "threads": torch.get_num_threads(),
               "model": args.label or (f"LoRA {args.adapter} on {args.model}" if args.adapter else args.model),
               "n_clips": len(clips), "mean_clip_seconds": float(np.mean([r["duration"] for r in rows])),
               "max_new_tokens": args.max_new_tokens, "load_before": os.getloadavg()[0], "server": []}
    print("# asr-lora transcribe", file=sys.stderr, flush=True)
    refs = [r["text"] for r in rows]
    results["transcribe"], reference = measure_transcribe(args, clips, refs, env)
    for mode in MODES:
        results["server"] += measure_server(mode, args, clips, env, work, reference, refs)
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    if args.write:
        what = "a LoRA adapter on the bundled base" if args.adapter else "the bundled base"
        write_benchmarks_md(markdown(results), "serve-adapter" if args.adapter else "serve",
                            f"Serving: `asr-lora serve` with {what}, batching on vs off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
