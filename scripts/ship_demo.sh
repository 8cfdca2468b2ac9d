#!/usr/bin/env bash
# The ship path on a finished demo run, as a new user would walk it:
# merge (parity) -> export-ct2 int8 and float32 (parity) -> eval adapter / merged / CT2 int8 /
# CT2 float32 on the test split -> a 2-minute file made of test clips transcribed to SRT.
# (float32 shows the conversion itself is exact; int8 adds quantisation noise.)
#   bash scripts/ship_demo.sh [RUN_DIR] [WORK_DIR]
set -euo pipefail
run=${1:-runs/demo}
work=${2:-runs/demo-ship}
mkdir -p "$work"
rm -rf "$work/merged" "$work/ct2" "$work/ct2-float32" "$work"/eval-*
asr-lora merge "$run/best" --out "$work/merged"
asr-lora export-ct2 "$work/merged" --out "$work/ct2" --quantization int8
asr-lora export-ct2 "$work/merged" --out "$work/ct2-float32" --quantization float32
for kind in adapter merged ct2 ct2-float32; do
  case $kind in
    adapter) src=(--adapter "$run/best") ;;
    merged) src=(--merged "$work/merged") ;;
    ct2) src=(--ct2 "$work/ct2") ;;
    ct2-float32) src=(--ct2 "$work/ct2-float32") ;;
  esac
  asr-lora eval --data data/demo/test.jsonl "${src[@]}" --out "$work/eval-$kind" --no-progress
done
python3 - "$work" <<'PY'
import json, sys
from pathlib import Path
import numpy as np, soundfile as sf
work = Path(sys.argv[1])
rows = [json.loads(l) for l in Path("data/demo/test.jsonl").read_text(encoding="utf-8").splitlines()]
audio, texts, t = [], [], 0.0
for r in rows:
    a, sr = sf.read(Path("data/demo") / r["audio"], dtype="float32")
    audio += [a, np.zeros(int(0.5 * sr), dtype="float32")]
    texts.append(r["text"])
    t += len(a) / sr + 0.5
    if t >= 120:
        break
sf.write(work / "two_minutes.flac", np.concatenate(audio), 16000)
(work / "two_minutes.txt").write_text(" ".join(texts), encoding="utf-8")
print(f"two_minutes.flac: {t:.1f} s from {len(texts)} test clips")
PY
asr-lora transcribe "$work/two_minutes.flac" --adapter "$run/best" --format srt --out "$work/srt"
python3 - "$work" <<'PY'
import json, re, sys
from pathlib import Path
from asr_lora.metrics import score
work = Path(sys.argv[1])
for kind in ("adapter", "merged", "ct2", "ct2-float32"):
    s = json.loads((work / f"eval-{kind}" / "summary.json").read_text())
    print(f"{kind:>11}: test CER {s['cer']:.4f}  CER-ns {s['cer_nospace']:.4f}  RTF {s['rtf']:.3f}")
srt = (work / "srt" / "two_minutes.srt").read_text(encoding="utf-8")
hyp = " ".join(l for l in srt.splitlines() if l and not l.isdigit() and "-->" not in l)
ref = (work / "two_minutes.txt").read_text(encoding="utf-8")
print(f"two-minute SRT: {srt.count('-->')} segments, CER vs the clips' texts {score([ref], [hyp]).cer:.4f}")
PY
du -sh "$work/merged" "$work/ct2" "$work/ct2-float32"
