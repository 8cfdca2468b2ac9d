"""``asr-lora report``: one self-contained HTML page per run, or several runs side by side.

A fine-tune is judged by looking and listening: the dev error rates per checkpoint (with the
untuned model's zero-shot point), which checkpoint is best, hallucination indicators, and above all
the utterances the best checkpoint gets wrong, with audio and a character diff. The page is one
file: CSS, JS and SVG plots inline, audio as Ogg/Opus data URIs up to a size budget and linked by
relative path beyond it, so that it opens offline and a run with 10,000 dev utterances still gives
a page of a few hundred KB (only the worst N utterances are shown).

Inputs (read leniently: a missing optional file or key becomes a note on the page, never a crash):
  training run folder   recipe.yaml, run_info.json, metrics.jsonl, best/{trainer_state,metrics}.json,
                        eval/step-NNNNNN.jsonl (one line per dev utterance per evaluation)
  ``asr-lora eval`` out summary.json, utterances.jsonl
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .errors import UserError

REPORT_NAME = "report.html"
WORST_N = 20  # worst dev utterances shown per run
LISTED_N = 10  # looping hypotheses / non-speech clips with output listed per run
AUDIO_BUDGET_BYTES = 1_500_000  # encoded audio embedded per page (~10 min of speech); beyond it, linked
OPUS_LEVEL = 0.95  # libsndfile compression level for Ogg/Opus: ~20 kbit/s, clear speech at 16 kHz
STEP_FILE = re.compile(r"^step-(\d{6,})\.jsonl$")
RUN_FILES = ("metrics.jsonl", "recipe.yaml", "run_info.json", "best", "eval")
EVAL_FILES = ("summary.json", "utterances.jsonl")
RATE_KEYS = (("cer", "CER"), ("cer_nospace", "CER without spaces"), ("wer", "WER"), ("swer", "sWER"))


# --------------------------------------------------------------------------- character diff

def char_diff(ref: str, hyp: str) -> list[tuple[str, str, str]]:
    """The character alignment behind CER, as runs ``(op, ref_text, hyp_text)`` with ``op`` one of
    equal, substitute, delete, insert. Both texts go through the scoring normaliser first (NFKC, so a
    Hangul syllable is one character and is never split into jamo) and are aligned by jiwer, as
    :func:`asr_lora.metrics.score` does: the runs' errors add up to the utterance's character errors."""
    import jiwer

    from .text import normalize

    ref, hyp = normalize(ref), normalize(hyp)
    if not ref or not hyp:  # jiwer needs two non-empty texts
        return [op for op in (("delete", ref, ""), ("insert", "", hyp)) if op[1] or op[2]]
    chunks = jiwer.process_characters(ref, hyp).alignments[0]
    return [(c.type, ref[c.ref_start_idx:c.ref_end_idx], hyp[c.hyp_start_idx:c.hyp_end_idx]) for c in chunks]


def diff_errors(ops: list[tuple[str, str, str]]) -> int:
    """Character errors of a :func:`char_diff` (a substitution run of unequal sides also inserts or deletes)."""
    return sum(max(len(r), len(h)) for op, r, h in ops if op != "equal")


def diff_html(ops: list[tuple[str, str, str]]) -> tuple[str, str]:
    """The reference and hypothesis lines of a diff as HTML, errors in ``<span class="sub|del|ins">``
    (an erroneous space shows as ␣)."""
    ref, hyp = [], []
    for op, r, h in ops:
        if op == "equal":
            ref.append(html.escape(r))
            hyp.append(html.escape(h))
            continue
        for side, text, cls in ((ref, r, "sub" if op == "substitute" else "del"),
                                (hyp, h, "sub" if op == "substitute" else "ins")):
            if text:
                side.append(f'<span class="{cls}">{html.escape(text.replace(" ", "␣"))}</span>')
    return "".join(ref), "".join(hyp)


# --------------------------------------------------------------------------- reading runs

@dataclass
class Source:
    """One folder given to the report: a training run or an ``asr-lora eval`` output."""

    path: Path
    kind: str  # "run" | "eval"
    name: str = ""
    notes: list[str] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # one per evaluation, indicators merged in
    train: list[dict] = field(default_factory=list)  # training records (step, loss, lr, ...)
    best_step: int | None = None
    recipe: dict | None = None
    recipe_text: str | None = None
    info: dict = field(default_factory=dict)  # run_info.json, or the eval's meta
    utterances: list[dict] = field(default_factory=list)  # at the shown step
    shown_step: int | None = None

    def shown_record(self) -> dict | None:
        """The evaluation whose utterances are shown (the best checkpoint's, or the eval folder's)."""
        if self.kind == "eval":
            return self.evals[0] if self.evals else None
        matches = [r for r in self.evals if r.get("step") == self.shown_step and not r.get("zero_shot")]
        return matches[-1] if matches else None

    def zero_shot(self) -> dict | None:
        return next((r for r in self.evals if r.get("zero_shot")), None)


def load_source(path: str | Path) -> Source:
    """Read a run folder or an eval folder; anything else is a ``UserError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder (give a training run folder or an 'asr-lora eval' output folder)")
    if not path.is_dir():
        raise UserError(f"{path}: is a file; give a training run folder or an 'asr-lora eval' output folder")
    if any((path / name).exists() for name in RUN_FILES):
        return _load_run(path)
    if any((path / name).exists() for name in EVAL_FILES):
        return _load_eval(path)
    raise UserError(f"{path}: neither a training run folder ({', '.join(RUN_FILES)}) nor an 'asr-lora eval' "
                    f"output folder ({', '.join(EVAL_FILES)})")


def _read_json(path: Path, notes: list[str]) -> dict | None:
    if not path.is_file():
        notes.append(f"{path.name} not found: left out")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError as e:
        notes.append(f"{path.name} is not valid JSON ({e}): left out")
        return None
    if not isinstance(value, dict):
        notes.append(f"{path.name} is not a JSON object: left out")
        return None
    return value


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    """The JSON objects of a JSONL file; other lines (cut short by a kill, say) are counted in a note."""
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} unreadable line(s) left out")
    return records


def _number(value) -> float | None:
    """A finite or infinite float from a JSON value, None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _load_run(path: Path) -> Source:
    src = Source(path=path, kind="run")
    notes = src.notes
    recipe = path / "recipe.yaml"
    if recipe.is_file():
        import yaml

        src.recipe_text = recipe.read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(src.recipe_text)
            src.recipe = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError as e:
            notes.append(f"recipe.yaml does not parse ({str(e).splitlines()[0]}): shown as text only")
    else:
        notes.append("recipe.yaml not found: left out")
    src.info = _read_json(path / "run_info.json", notes) or {}

    records = _read_jsonl(path / "metrics.jsonl", notes) if (path / "metrics.jsonl").is_file() else []
    if not (path / "metrics.jsonl").is_file():
        notes.append("metrics.jsonl not found: no curves")
    src.train = [r for r in records if _number(r.get("step")) is not None and "loss" in r and "cer" not in r]
    latest: dict[tuple[bool, int], dict] = {}  # a resumed run may repeat a step: the last record wins
    for r in records:
        if _number(r.get("step")) is not None and _number(r.get("cer")) is not None:
            latest[(bool(r.get("zero_shot")), int(r["step"]))] = dict(r)
    src.evals = [latest[k] for k in sorted(latest, key=lambda k: (k[0] is False, k[1]))]
    if records and not src.evals:
        notes.append("metrics.jsonl holds no evaluation (no record with 'cer')")

    src.best_step = _best_step(path, src.evals, notes)
    files = _step_files(path)
    for r in src.evals:
        step_file = files.get(r["step"])
        if step_file is not None:
            for key, value in utterance_indicators(_read_jsonl(step_file, notes)).items():
                r.setdefault(key, value)
    if src.best_step in files:
        src.shown_step = src.best_step
    elif files:
        src.shown_step = max(files)
        why = f"eval/step-{src.best_step:06d}.jsonl not found" if src.best_step is not None else "no best step known"
        notes.append(f"{why}: the utterances shown are step {src.shown_step}'s")
    else:
        notes.append("no eval/step-NNNNNN.jsonl: no per-utterance results to show")
    if src.shown_step is not None:
        src.utterances = _read_jsonl(files[src.shown_step], [])
    return src


def _best_step(path: Path, evals: list[dict], notes: list[str]) -> int | None:
    """best/trainer_state.json's best_step, else best/metrics.json's step, else the lowest dev CER logged."""
    for name, key in (("trainer_state.json", "best_step"), ("metrics.json", "step")):
        value = (_read_json(path / "best" / name, []) or {}).get(key)
        if _number(value) is not None:
            return int(value)
    trained = [r for r in evals if not r.get("zero_shot")]
    if trained:
        best = min(trained, key=lambda r: (r["cer"], r["step"]))
        notes.append(f"best/ has no best step: best = lowest dev CER in metrics.jsonl (step {best['step']})")
        return int(best["step"])
    return None


def _step_files(path: Path) -> dict[int, Path]:
    folder = path / "eval"
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in folder.iterdir() if (m := STEP_FILE.match(p.name))}


def _load_eval(path: Path) -> Source:
    src = Source(path=path, kind="eval")
    summary = _read_json(path / "summary.json", src.notes) or {}
    src.info = {k: v for k, v in summary.items() if k not in ("skipped_rows",)}
    if (path / "utterances.jsonl").is_file():
        src.utterances = _read_jsonl(path / "utterances.jsonl", src.notes)
    else:
        src.notes.append("utterances.jsonl not found: no per-utterance results to show")
    record = {k: summary[k] for k in ("n", "cer", "cer_nospace", "wer", "swer", "insertion_rate", "length_ratio",
                                      "nonspeech_share", "guard_wer") if k in summary}
    if "loop_fraction" in summary:
        record["loop_share"] = summary["loop_fraction"]
    for key, value in (utterance_indicators(src.utterances) if src.utterances else {}).items():
        record.setdefault(key, value)
    if _number(record.get("cer")) is not None:
        src.evals = [record]
    return src


def utterance_indicators(lines: list[dict]) -> dict:
    """Hallucination indicators of one evaluation from its utterance lines: on speech clips the share
    of looping hypotheses, character insertion rate, hypothesis/reference length ratio and share of
    empty hypotheses; on non-speech clips (``nonspeech: true``) the share that got any output."""
    from .metrics import score

    speech = [u for u in lines if not u.get("nonspeech") and isinstance(u.get("ref"), str)]
    out: dict = {}
    if speech:
        hyps = [u.get("hyp") if isinstance(u.get("hyp"), str) else "" for u in speech]
        report = score([u["ref"] for u in speech], hyps)
        out.update(loop_share=sum(bool(u.get("loop")) for u in speech) / len(speech),
                   n_loops=sum(bool(u.get("loop")) for u in speech),
                   insertion_rate=report.insertion_rate, length_ratio=report.length_ratio,
                   empty_share=sum(not h.strip() for h in hyps) / len(speech), n_utterances=len(speech))
    nonspeech = [u for u in lines if u.get("nonspeech")]
    if nonspeech:
        out["nonspeech_share"] = sum(bool(str(u.get("hyp") or "").strip()) for u in nonspeech) / len(nonspeech)
        out["n_nonspeech"] = len(nonspeech)
    return out


# --------------------------------------------------------------------------- audio

class AudioShelf:
    """Audio players for utterance lines: each clip (file, offset, end) encoded once as Ogg/Opus and
    embedded while the page's budget lasts, then linked by a path relative to the page."""

    def __init__(self, page_dir: Path, budget: int = AUDIO_BUDGET_BYTES):
        self.page_dir, self.budget = page_dir, budget
        self.clips: dict[str, str] = {}  # clip id -> data URI
        self._ids: dict[tuple, str] = {}  # (file, offset, end) -> clip id
        self._over: set[tuple] = set()  # clips that did not fit (or could not be read): linked
        self.used = self.linked = self.missing = 0

    def player(self, line: dict, base: Path) -> str:
        raw = line.get("audio")
        if not isinstance(raw, str) or not raw:
            self.missing += 1
            return '<span class="na">no audio path</span>'
        path = Path(raw)
        if not path.is_absolute() and not path.exists() and (base / path).exists():
            path = base / path
        offset, end = _number(line.get("offset")), _number(line.get("end"))
        if not path.is_file():
            self.missing += 1
            return f'<span class="na">audio not found: {html.escape(path.name)}</span>'
        key = (str(path.resolve()), offset, end)
        if key not in self._ids and key not in self._over:
            data = self._encode(path, offset, end)
            if data is not None and self.used + len(data) <= self.budget:
                self._ids[key] = f"c{len(self.clips)}"
                self.clips[self._ids[key]] = "data:audio/ogg;base64," + base64.b64encode(data).decode("ascii")
                self.used += len(data)
            else:
                self._over.add(key)
        if key in self._ids:
            return f'<audio controls preload="metadata" data-clip="{self._ids[key]}"></audio>'
        self.linked += 1
        url = quote(Path(os.path.relpath(path.resolve(), self.page_dir.resolve())).as_posix())
        if offset is not None or end is not None:
            url += f"#t={offset or 0:g}" + (f",{end:g}" if end is not None else "")
        return f'<audio controls preload="none" src="{html.escape(url)}"></audio>'

    def _encode(self, path: Path, offset: float | None, end: float | None) -> bytes | None:
        import soundfile as sf

        from .audio import SAMPLE_RATE, AudioError, load_audio

        try:
            audio = load_audio(path, offset=offset, end=end)
        except AudioError:
            return None
        if not len(audio):
            return None
        buf = io.BytesIO()
        sf.write(buf, audio, SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=OPUS_LEVEL)
        return buf.getvalue()


# --------------------------------------------------------------------------- plots

def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def _svg(fig, salt: str) -> str:
    """The figure as an inline ``<svg>`` (text kept as text, ids unique to this figure)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg"):], flags=re.S)


def run_plot(src: Source, salt: str) -> str | None:
    """Dev error rates, losses and (when logged) hallucination indicators per step, as an SVG."""
    if not src.evals or src.kind != "run":
        return None
    hallu = [k for k in ("nonspeech_share", "guard_wer", "loop_share", "insertion_rate", "longform_cer",
                         "longfile_cer", "longfile_deletion_rate")
             if any(k in r for r in src.evals)]
    fig, axes = _figure(11 if hallu else 8, 3.1, 3 if hallu else 2)
    for key, label in RATE_KEYS:
        _line(axes[0], src.evals, key, label)
    zero = src.zero_shot()
    if zero is not None:
        axes[0].plot([zero["step"]], [zero["cer"]], marker="o", markersize=9, fillstyle="none", color="k",
                     linestyle="none", label="zero-shot CER")
    _finish(axes[0], "dev error rates", src.best_step)
    _line(axes[1], src.train, "loss", "train loss", linewidth=1, alpha=0.8, marker=None)
    _line(axes[1], src.evals, "eval_loss", "dev loss")
    _finish(axes[1], "loss", src.best_step, percent=False)
    if hallu:
        labels = {"nonspeech_share": "non-speech clips with output", "loop_share": "looping hypotheses",
                  "insertion_rate": "character insertion rate", "guard_wer": "guard WER (second language)",
                  "longform_cer": "long-form CER (20-30 s inputs)", "longfile_cer": "long-form file CER",
                  "longfile_deletion_rate": "long-form file deletions"}
        for key in hallu:
            _line(axes[2], src.evals, key, labels[key])
        title = "guards and hallucination indicators" if "guard_wer" in hallu else "hallucination indicators"
        _finish(axes[2], title, src.best_step)
    fig.tight_layout()
    return _svg(fig, salt)


def _line(ax, records: list[dict], key: str, label: str, **style) -> None:
    """``key`` against step for the records that have a finite value of it."""
    pts = [(r["step"], r[key]) for r in records if _number(r.get(key)) is not None and math.isfinite(r[key])]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **{"marker": "o", "markersize": 3.5, **style})


def _finish(ax, title: str, best_step: int | None, percent: bool = True) -> None:
    """Title, step axis, the best step as a dotted line, rates in percent, a legend when there is a line."""
    from matplotlib.ticker import PercentFormatter

    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle=":", linewidth=1)
    ax.set(title=title, xlabel="optimizer step")
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def compare_plot(sources: list[Source], salt: str) -> str | None:
    """Dev CER per step of every run on one axis; an eval folder is a horizontal line at its CER."""
    if not any(s.evals for s in sources):
        return None
    fig, (ax,) = _figure(8, 3.2)
    for i, src in enumerate(sources):
        if src.kind == "run":
            _line(ax, src.evals, "cer", src.name, color=f"C{i}")
        elif src.evals and math.isfinite(src.evals[0]["cer"]):
            ax.axhline(src.evals[0]["cer"], linestyle="--", linewidth=1, color=f"C{i}", label=f"{src.name} (eval)")
    _finish(ax, "dev CER per checkpoint", None)
    fig.tight_layout()
    return _svg(fig, salt)


# --------------------------------------------------------------------------- HTML pieces

def _esc(value) -> str:
    return html.escape(str(value))


def _pct(value, digits: int = 2) -> str:
    x = _number(value)
    if x is None:
        return "–"
    return "∞" if math.isinf(x) else f"{100 * x:.{digits}f}%"


def _num(value, digits: int = 3) -> str:
    """A number with ``digits`` decimals (0: a thousands-grouped integer); "–" when missing."""
    x = _number(value)
    if x is None:
        return "–"
    if math.isinf(x):
        return "∞"
    return f"{int(x):,}" if digits == 0 else f"{x:.{digits}f}"


def _table(head: list[str], rows: list[list[str]], cls: str = "", row_classes: list[str] | None = None) -> str:
    """An HTML table; cells are HTML already."""
    out = [f'<table class="{cls}">']
    if any(head):
        out.append("<thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead>")
    out.append("<tbody>")
    for row, row_cls in zip(rows, row_classes or [""] * len(rows)):
        attrs = f' class="{row_cls}"' if row_cls else ""
        out.append(f"<tr{attrs}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return "".join(out) + "</tbody></table>"


CHECKPOINT_COLUMNS = (("cer", "CER", _pct), ("cer_nospace", "CER no spaces", _pct), ("wer", "WER", _pct),
                      ("swer", "sWER", _pct), ("eval_loss", "dev loss", lambda v: _num(v, 4)),
                      ("nonspeech_share", "non-speech with output", _pct), ("guard_wer", "guard WER", _pct),
                      ("guard_cer", "guard CER", _pct),
                      ("longform_cer", "long-form CER", _pct), ("longform_deletion_rate", "long-form deletions", _pct),
                      ("longfile_cer", "long file CER", _pct), ("longfile_deletion_rate", "long file deletions", _pct),
                      ("loop_share", "loops", _pct), ("insertion_rate", "insertions", _pct),
                      ("length_ratio", "length ratio", lambda v: _num(v, 3)),
                      ("empty_share", "empty hyps", _pct), ("eval_n", "n", lambda v: _num(v, 0)),
                      ("eval_skipped", "skipped", lambda v: _num(v, 0)))


def checkpoint_table(src: Source) -> str:
    """One row per evaluation: the error rates, dev loss and indicators; the best step highlighted."""
    cols = [c for c in CHECKPOINT_COLUMNS if any(c[0] in r for r in src.evals)]
    rows, classes = [], []
    for r in src.evals:
        if src.kind == "eval":
            label, cls = "eval", "best"
        elif r.get("zero_shot"):
            label, cls = f"{r['step']} zero-shot", "zero"
        else:
            best = r["step"] == src.best_step
            label, cls = f"{r['step']}{' best' if best else ''}", "best" if best else ""
        rows.append([_esc(label), *(fmt(r.get(key)) for key, _, fmt in cols)])
        classes.append(cls)
    return _table(["step", *(h for _, h, _ in cols)], rows, "num", classes)


def _utt_head(u: dict) -> str:
    bits = [f"<b>{_esc(u.get('id', '?'))}</b>"]
    if _number(u.get("duration")) is not None:
        bits.append(f"{u['duration']:.1f} s")
    if _number(u.get("offset")) is not None:
        end = _number(u.get("end"))
        bits.append(f"@{u['offset']:g}–{end:g} s" if end is not None else f"@{u['offset']:g} s")
    flags = []
    if u.get("loop"):
        flags.append('<span class="flag">loop</span>')
    if u.get("nonspeech"):
        flags.append('<span class="flag">non-speech</span>')
    if _number(u.get("no_speech_prob")) is not None:
        flags.append(f'<span class="meta">p(no speech) {u["no_speech_prob"]:.2f}</span>')
    return " · ".join(bits) + (" " + " ".join(flags) if flags else "")


def _diff_block(ref: str, hyp: str) -> tuple[str, int]:
    ops = char_diff(ref, hyp)
    ref_html, hyp_html = diff_html(ops)
    return (f'<div class="ref"><span class="lbl">REF</span>{ref_html}</div>'
            f'<div class="hyp"><span class="lbl">HYP</span>{hyp_html}</div>'), diff_errors(ops)


def worst_utterances(lines: list[dict], n: int) -> list[dict]:
    """The ``n`` speech utterances with the most character errors (then the highest CER, then by id);
    utterances without errors are never listed."""
    speech = [u for u in lines if not u.get("nonspeech") and isinstance(u.get("ref"), str)
              and (_number(u.get("errors")) is None or u["errors"] > 0)]

    def key(u):
        errors, cer = _number(u.get("errors")), _number(u.get("cer"))
        return (-(errors if errors is not None else 0), -(cer if cer is not None else 0), str(u.get("id", "")))

    return sorted(speech, key=key)[:n]


def worst_table(src: Source, lines: list[dict], shelf: AudioShelf) -> str:
    rows = []
    for i, u in enumerate(lines, 1):
        block, errors = _diff_block(str(u.get("ref", "")), str(u.get("hyp") or ""))
        ref_chars = _number(u.get("ref_chars"))
        score = f"{errors} errors" + (f" / {int(ref_chars)} chars<br>CER {_pct(u.get('cer'), 1)}"
                                      if ref_chars is not None else "")
        rows.append([str(i), f'<div class="uh">{_utt_head(u)}</div>{shelf.player(u, src.path)}', block, score])
    return _table(["#", "utterance", "reference and hypothesis (as scored)", "errors"], rows, "utts")


def listed_lines(src: Source, shelf: AudioShelf, flag: str, title: str, n: int = LISTED_N) -> str:
    """Looping hypotheses (flag ``loop``) or non-speech clips with output (flag ``nonspeech``)."""
    hits = [u for u in src.utterances if u.get(flag) and (flag != "nonspeech" or str(u.get("hyp") or "").strip())]
    if not hits:
        return ""
    rows = [[f'<div class="uh">{_utt_head(u)}</div>{shelf.player(u, src.path)}',
             f'<div class="hyp">{_esc(_clip_text(str(u.get("hyp") or ""), 300))}</div>'] for u in hits[:n]]
    more = f" (first {n} of {len(hits)})" if len(hits) > n else f" ({len(hits)})"
    return f"<h4>{title}{more}</h4>" + _table(["utterance", "hypothesis"], rows, "utts")


def _clip_text(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def indicators_summary(src: Source) -> str:
    """One sentence of the shown evaluation's hallucination indicators."""
    r = src.shown_record() or {}
    parts = []
    if "loop_share" in r:
        loops = f" ({r['n_loops']})" if "n_loops" in r else ""
        parts.append(f"looping hypotheses {_pct(r['loop_share'], 1)}{loops}")
    if "insertion_rate" in r:
        parts.append(f"character insertion rate {_pct(r['insertion_rate'])}")
    if "length_ratio" in r:
        parts.append(f"hypothesis/reference length ratio {_num(r['length_ratio'])}")
    if "empty_share" in r:
        parts.append(f"empty hypotheses {_pct(r['empty_share'], 1)}")
    if "nonspeech_share" in r:
        parts.append(f"non-speech clips with output {_pct(r['nonspeech_share'], 1)}")
    if not parts:
        return '<p class="note">no hallucination indicators for this evaluation</p>'
    return "<p>" + "; ".join(parts) + ".</p>"


RECIPE_GLANCE = (("model", "name"), ("model", "quant"), ("model", "audio_context"), ("lora", "r"), ("lora", "alpha"),
                 ("lora", "target_modules"), ("data", "train"), ("data", "dev"), ("train", "max_steps"),
                 ("train", "batch_size"), ("train", "grad_accum"), ("train", "lr"), ("train", "eval_every"))


def info_block(src: Source) -> str:
    """Recipe at a glance and run info (or the eval's settings), with the full recipe.yaml folded."""
    rows, recipe = [], src.recipe or {}
    for section, key in RECIPE_GLANCE:
        value = recipe[section].get(key) if isinstance(recipe.get(section), dict) else None
        if value is not None:
            rows.append([f"{section}.{key}", _esc(", ".join(map(str, value)) if isinstance(value, list) else value)])
    info = dict(src.info)
    command = info.pop("command", None)
    if command:
        command = shlex.join(map(str, command)) if isinstance(command, list) else command
        rows.append(["command", f"<code>{_esc(command)}</code>"])
    if "git_revision" in info:
        dirty = " (uncommitted changes)" if info.pop("git_dirty", False) else ""
        rows.append(["git revision", f"<code>{_esc(info.pop('git_revision'))}</code>{dirty}"])
    trainable, total = _number(info.pop("trainable_parameters", None)), _number(info.pop("total_parameters", None))
    if trainable is not None:
        share = f" ({100 * trainable / total:.2f}%)" if total else ""
        rows.append(["trainable parameters", f"{int(trainable):,}" + (f" of {int(total):,}{share}" if total else "")])
    packages = info.pop("packages", None)
    for key, value in info.items():
        if isinstance(value, (str, int, float, bool)):
            rows.append([_esc(key), _esc(value)])
    if isinstance(packages, dict):
        rows.append(["packages", _esc(", ".join(f"{k} {v}" for k, v in packages.items()))])
    out = _table(["", ""], rows, "kv") if rows else ""
    if src.recipe_text:
        out += f"<details><summary>recipe.yaml</summary><pre>{_esc(src.recipe_text)}</pre></details>"
    return out


# --------------------------------------------------------------------------- page

CSS = """
body{font:14px/1.45 system-ui,"Noto Sans CJK KR","NanumGothic","Malgun Gothic","Apple SD Gothic Neo",sans-serif;
 margin:0 auto;max-width:1280px;padding:16px 24px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:4px 0}h2{font-size:19px;margin:28px 0 6px;border-bottom:2px solid #ddd}
h3{font-size:16px;margin:18px 0 6px}h4{font-size:14px;margin:12px 0 4px}
.sub-title{color:#666;font-size:13px}code{font-size:12px}
table{border-collapse:collapse;margin:6px 0}th,td{border-bottom:1px solid #e5e5e5;padding:3px 8px;text-align:left;
 vertical-align:top}th{background:#f6f6f6;font-weight:600}
table.num td{text-align:right;font-variant-numeric:tabular-nums}table.num td:first-child{text-align:left}
tr.best td{background:#eaf4ff;font-weight:600}tr.zero td{color:#666;font-style:italic}
table.kv td:first-child{color:#555;white-space:nowrap}
table.utts td{padding:6px 8px}table.utts audio{height:30px;width:240px;margin-top:4px}
.uh{font-size:12px;color:#444}.ref,.hyp{font-size:15px;line-height:1.7;word-break:keep-all;overflow-wrap:anywhere}
.lbl{display:inline-block;width:36px;font-size:11px;color:#888;font-family:monospace}
.sub{background:#ffe08a}.del{background:#ffb3b3;text-decoration:line-through}.ins{background:#b6ecb6}
.flag{background:#c0392b;color:#fff;border-radius:3px;padding:0 4px;font-size:11px}.meta{color:#666;font-size:11px}
.na{color:#999;font-size:12px}.note{color:#8a5a00}ul.notes{background:#fff8e6;padding:6px 24px;margin:6px 0}
figure.plot{margin:6px 0}figure.plot svg{max-width:100%;height:auto}
.legend span{padding:0 4px;margin-right:6px}details pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}
"""

JS = """
const clips = JSON.parse(document.getElementById('clips').textContent);
for (const a of document.querySelectorAll('audio[data-clip]')) a.src = clips[a.dataset.clip];
"""

LEGEND = ('<p class="legend">Texts as scored (normalised). <span class="sub">substituted</span>'
          '<span class="del">deleted</span><span class="ins">inserted</span> ␣ = a space</p>')


def best_rule(recipe: dict | None) -> str:
    """How the run chose best/ (``train.select_best``), when it was not simply the lowest dev CER."""
    train = (recipe or {}).get("train")
    rule = train.get("select_best") if isinstance(train, dict) else None
    if rule == "longform":
        return "; chosen by train.select_best=longform (the lowest long-form probe CER)"
    if rule not in ("cer_guarded", "longform_guarded"):
        return ""
    limits = [f"{label} ≤ {_pct(train[key], 1)}" for key, label in (("max_nonspeech_share", "non-speech share"),
                                                                    ("max_guard_wer", "guard WER"))
              if _number(train.get(key)) is not None]
    return f"; chosen by train.select_best={rule} ({', '.join(limits) or 'no limits'})"


def source_section(src: Source, index: int, shelf: AudioShelf, worst: int) -> str:
    kind = "training run" if src.kind == "run" else "asr-lora eval"
    out = [f'<section class="source" id="source-{index}"><h2>{_esc(src.name)} '
           f'<span class="sub-title">{kind} · {_esc(src.path)}</span></h2>']
    if src.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{_esc(n)}</li>" for n in src.notes) + "</ul>")
    if src.kind == "run":
        best = next((r for r in src.evals if r["step"] == src.best_step and not r.get("zero_shot")), None)
        zero = src.zero_shot()
        line = (f"Best checkpoint: step {src.best_step}, dev CER {_pct(best['cer'])}" if best else "No best checkpoint")
        if best and zero:
            line += f" (zero-shot {_pct(zero['cer'])})"
        line += best_rule(src.recipe)
        out.append(f"<p>{line}.</p>")
    plot = run_plot(src, salt=f"run{index}")
    if plot:
        out.append(f'<figure class="plot">{plot}</figure>')
    if src.evals:
        out.append("<h3>Per checkpoint</h3>" if src.kind == "run" else "<h3>Scores</h3>")
        out.append(checkpoint_table(src))
    out.append("<h3>Hallucination indicators</h3>" + indicators_summary(src))
    if src.utterances:
        step = f" at step {src.shown_step}" if src.shown_step is not None else ""
        shown = worst_utterances(src.utterances, worst)
        out.append(f"<h3>Worst {len(shown)} dev utterances{step} (of {len(src.utterances)}, by character errors)</h3>")
        out.append(LEGEND + worst_table(src, shown, shelf) if shown else '<p>No utterance has an error.</p>')
        out.append(listed_lines(src, shelf, "loop", "Looping hypotheses"))
        out.append(listed_lines(src, shelf, "nonspeech", "Non-speech clips with output"))
    out.append("<h3>Recipe and run info</h3>" if src.kind == "run" else "<h3>Evaluation settings</h3>")
    out.append(info_block(src) or '<p class="note">nothing recorded</p>')
    return "".join(out) + "</section>"


def compare_section(sources: list[Source], shelf: AudioShelf, worst: int) -> str:
    """Several runs side by side: headline numbers, CER curves on one axis, recipe differences, and
    the utterances common to all with each run's hypothesis."""
    head = ["", *(f"<a href='#source-{i}'>{_esc(s.name)}</a>" for i, s in enumerate(sources))]
    shown = [s.shown_record() or {} for s in sources]
    zeros = [s.zero_shot() or {} for s in sources]
    rows = [["kind", *("run" if s.kind == "run" else "eval" for s in sources)],
            ["best step", *(_esc(s.best_step) if s.best_step is not None else "–" for s in sources)]]
    for key, label in RATE_KEYS:
        rows.append([label, *(_pct(r.get(key)) for r in shown)])
    rows.append(["zero-shot CER", *(_pct(z.get("cer")) for z in zeros)])
    for key, label in (("nonspeech_share", "non-speech with output"), ("guard_wer", "guard WER"),
                       ("longform_cer", "long-form CER"), ("longfile_cer", "long file CER"),
                       ("longfile_deletion_rate", "long file deletions"),
                       ("loop_share", "looping hypotheses"),
                       ("insertion_rate", "insertion rate"), ("length_ratio", "length ratio")):
        if any(key in r for r in shown):
            rows.append([label, *((_num(r.get(key)) if key == "length_ratio" else _pct(r.get(key))) for r in shown)])
    rows.append(["trainable parameters", *(_num(s.info.get("trainable_parameters"), 0) for s in sources)])
    out = ['<section id="compare"><h2>Runs side by side</h2>', _table(head, rows, "num")]
    plot = compare_plot(sources, salt="compare")
    if plot:
        out.append(f'<figure class="plot">{plot}</figure>')
    diffs = recipe_differences(sources)
    if diffs:
        out.append("<h3>Recipe differences</h3>" + _table(head, [[_esc(k), *map(_esc, v)] for k, v in diffs]))
    out.append(common_utterances(sources, shelf, worst))
    return "".join(out) + "</section>"


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_differences(sources: list[Source]) -> list[tuple[str, list[str]]]:
    """Recipe keys whose values differ between the runs that have a recipe ("–": not in that recipe)."""
    flat = [_flatten(s.recipe) if s.recipe else None for s in sources]
    if sum(f is not None for f in flat) < 2:
        return []
    keys = sorted({k for f in flat if f for k in f})
    out = []
    for key in keys:
        values = [("–" if key not in f else json.dumps(f[key], ensure_ascii=False)) if f is not None else "–"
                  for f in flat]
        if len({v for v, f in zip(values, flat) if f is not None}) > 1:
            out.append((key, values))
    return out


def common_utterances(sources: list[Source], shelf: AudioShelf, worst: int) -> str:
    """The dev utterances every source scored, worst first by errors summed over the sources."""
    by_id = [{str(u.get("id")): u for u in s.utterances if not u.get("nonspeech")} for s in sources]
    if not all(by_id):
        return ""
    common = set(by_id[0]).intersection(*by_id[1:])
    if not common:
        return '<p class="note">the runs share no dev utterance id</p>'
    total = {uid: sum(_number(d[uid].get("errors")) or 0 for d in by_id) for uid in common}
    ids = sorted((uid for uid in common if total[uid] > 0), key=lambda uid: (-total[uid], uid))[:worst]
    if not ids:
        return '<p>No shared utterance has an error.</p>'
    rows = []
    for uid in ids:
        first = by_id[0][uid]
        cells = []
        for src, d in zip(sources, by_id):
            block, errors = _diff_block(str(d[uid].get("ref", "")), str(d[uid].get("hyp") or ""))
            cells.append(f'<div class="uh">{_esc(src.name)}: {errors} errors</div>{block}')
        rows.append([f'<div class="uh">{_utt_head(first)}</div>{shelf.player(first, sources[0].path)}',
                     "".join(cells)])
    return (f"<h3>Worst {len(ids)} shared dev utterances (by errors over all runs)</h3>" + LEGEND
            + _table(["utterance", "each run's reference and hypothesis"], rows, "utts"))


def render_page(sources: list[Source], page_dir: Path, *, worst: int = WORST_N,
                audio_budget: int = AUDIO_BUDGET_BYTES) -> str:
    """The report page for ``sources``; audio links are relative to ``page_dir``."""
    from . import __version__

    shelf = AudioShelf(page_dir, audio_budget)
    body = []
    if len(sources) > 1:
        body.append(compare_section(sources, shelf, worst))
    body += [source_section(s, i, shelf, worst) for i, s in enumerate(sources)]
    title = " vs ".join(s.name for s in sources)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    audio_note = (f"audio: {len(shelf.clips)} clip(s) embedded ({shelf.used / 1e3:.0f} KB Ogg/Opus)"
                  + (f", {shelf.linked} linked by relative path (over the {audio_budget / 1e6:g} MB budget)"
                     if shelf.linked else "") + (f", {shelf.missing} not found" if shelf.missing else ""))
    clips = json.dumps(shelf.clips).replace("</", "<\\/")
    return (f'<!doctype html><html lang="ko"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>asr-lora report: {_esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>asr-lora report: {_esc(title)}</h1>"
            f'<p class="sub-title">asr-lora {__version__} · {stamp} · {audio_note}</p>'
            + "".join(body)
            + f'<script id="clips" type="application/json">{clips}</script><script>{JS}</script></body></html>\n')


def _names(sources: list[Source]) -> None:
    """Each source's display name: its folder, with the parent's when two would read the same."""
    for s in sources:
        s.name = s.path.resolve().name or str(s.path)
    seen = [s.name for s in sources]
    for s in sources:
        if seen.count(s.name) > 1:
            s.name = f"{s.path.resolve().parent.name}/{s.name}"


def write_report(paths: list[Path], out: Path | None = None, *, worst: int = WORST_N,
                 audio_budget: int = AUDIO_BUDGET_BYTES) -> Path:
    """Write the report page of the run or eval folders ``paths`` to ``out`` (default
    ``paths[0]/report.html``) and return its path."""
    if not paths:
        raise UserError("give at least one run or eval folder")
    if worst < 1:
        raise UserError(f"--worst must be at least 1, got {worst}")
    sources = [load_source(p) for p in paths]
    _names(sources)
    out = Path(out) if out is not None else Path(paths[0]) / REPORT_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_page(sources, out.parent, worst=worst, audio_budget=audio_budget)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
