"""`asr-lora report`: the Hangul character diff, run/eval folders read leniently, the page's size on a large
run, audio embedded then linked, several runs side by side, and the page in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asr_lora.errors import UserError
from asr_lora.metrics import score
from asr_lora.report import char_diff, diff_errors, diff_html, write_report

REPO = Path(__file__).resolve().parents[1]
DEMO_DEV = REPO / "data" / "demo" / "dev.jsonl"
JAMO = re.compile("[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\ud7b0-\ud7ff]")


# --------------------------------------------------------------------------- diff

def test_diff_substitutes_whole_hangul_syllables():
    assert char_diff("안녕하세요", "안녕하셰요") == [("equal", "안녕하", "안녕하"), ("substitute", "세", "셰"),
                                                ("equal", "요", "요")]
    # one jamo differs (받침 ㄴ -> ㅇ): still one syllable substituted, never jamo
    assert char_diff("한국어", "항국어") == [("substitute", "한", "항"), ("equal", "국어", "국어")]


def test_diff_composes_decomposed_hangul_before_aligning():
    nfd = unicodedata.normalize("NFD", "한국어 음성 인식")
    assert len(nfd) > len("한국어 음성 인식")  # really decomposed into jamo
    assert char_diff(nfd, "한국어 음성 인식") == [("equal", "한국어 음성 인식", "한국어 음성 인식")]
    ops = char_diff(nfd, "한국어 음성 인식기")
    assert ops[-1] == ("insert", "", "기")
    assert not any(JAMO.search(r + h) for _, r, h in ops)


def test_diff_insertions_deletions_and_spaces():
    assert char_diff("사과 주세요", "사과주세요") == [("equal", "사과", "사과"), ("delete", " ", ""),
                                               ("equal", "주세요", "주세요")]
    assert char_diff("좋아요", "정말 좋아요") == [("insert", "", "정말 "), ("equal", "좋아요", "좋아요")]
    assert char_diff("감사합니다", "") == [("delete", "감사합니다", "")]
    assert char_diff("", "음") == [("insert", "", "음")]
    assert char_diff("", "") == []
    # as scored: punctuation goes, case folds, so these are equal
    assert char_diff("네, 알겠습니다!", "네 알겠습니다") == [("equal", "네 알겠습니다", "네 알겠습니다")]


@pytest.mark.parametrize("ref,hyp", [
    ("경주에는 오래된 절과 유적이 많아요.", "경주에는 오래된 절과 유적이 많아요"),
    ("너무 피곤해서 아무것도 하기 싫어.", "너무 피곤해 서 아무 것도 하기 시러"),
    ("화장품 샘플 좀 더 주실 수 있어요?", "화장품 샘풀 좀 주실수있어요 네 네 네 네"),
    ("오늘 날씨가 좋네요", "감사합니다감사합니다감사합니다감사합니다"),
    ("3시에 만나요", "세 시에 만나요"),
])
def test_diff_errors_equal_the_scored_character_errors(ref, hyp):
    ops = char_diff(ref, hyp)
    assert diff_errors(ops) == score([ref], [hyp]).utterances[0]["char_errors"]
    assert not any(JAMO.search(r + h) for _, r, h in ops)


def test_diff_html_colours_each_kind_of_error():
    ref_html, hyp_html = diff_html(char_diff("사과 주세요", "사고주세요 네"))
    assert ref_html == '사<span class="sub">과</span><span class="del">␣</span>주세요'
    assert hyp_html == '사<span class="sub">고</span>주세요<span class="ins">␣네</span>'


# --------------------------------------------------------------------------- fixtures in the trainer's format

def _dev_rows() -> list[dict]:
    rows = [json.loads(line) for line in DEMO_DEV.read_text(encoding="utf-8").splitlines()]
    for r in rows:
        r["audio"] = str((DEMO_DEV.parent / r["audio"]).resolve())
    return rows


def _mutate(text: str, k: int) -> str:
    """A deterministic hypothesis with about ``k`` character errors of mixed kinds."""
    chars = list(text.rstrip(".?!"))
    for j in range(k):
        pos = (7 * j + 3) % max(len(chars), 1)
        kind = j % 4
        if kind == 0 and chars:
            chars[pos] = "가" if chars[pos] != "가" else "나"
        elif kind == 1 and chars:
            del chars[pos]
        elif kind == 2:
            chars.insert(pos, "네")
        elif " " in chars:
            chars.remove(" ")
    return "".join(chars)


def _lines(rows: list[dict], quality: int, noise: Path | None = None) -> list[dict]:
    """utterances.jsonl lines (the `asr-lora eval` format, with the trainer's optional keys) for hypotheses
    whose errors shrink as ``quality`` grows; the first row loops at quality 0."""
    hyps = []
    for i, r in enumerate(rows):
        if i == 0 and quality == 0:
            hyps.append("감사합니다 " * 6)
        else:
            hyps.append(_mutate(r["text"], max(0, i % 9 - quality)))
    report = score([r["text"] for r in rows], hyps, ids=[r["id"] for r in rows])
    out = []
    for i, (r, hyp, u) in enumerate(zip(rows, hyps, report.utterances)):
        segment = i % 5 == 1  # some rows are segments of their file
        out.append({"id": r["id"], "audio": r["audio"], "offset": 0.2 if segment else None,
                    "end": round(r["duration"] - 0.2, 3) if segment else None,
                    "duration": round(r["duration"] - 0.4, 3) if segment else r["duration"], "ref": r["text"],
                    "hyp": hyp, "errors": u["char_errors"], "ref_chars": u["ref_chars"], "cer": u["cer"],
                    "cer_nospace": u["cer_nospace"], "wer": u["wer"], "loop": i == 0 and quality == 0,
                    "no_speech_prob": round(0.01 * (i % 7), 3)})
    if noise is not None:
        for j in range(3):
            hyp = "이곳은 이곳은" if j < max(1, 3 - quality) else ""
            out.append({"id": f"noise-{j}", "audio": str(noise), "offset": None, "end": None, "duration": 2.0,
                        "ref": "", "hyp": hyp, "errors": len(hyp), "ref_chars": 0,
                        "cer": float("inf") if hyp else 0.0, "cer_nospace": float("inf") if hyp else 0.0,
                        "wer": float("inf") if hyp else 0.0, "loop": False,
                        "no_speech_prob": min(0.2 + 0.2 * quality, 0.95), "nonspeech": True})
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def make_run(folder: Path, rows: list[dict] | None = None, steps=(30, 60, 90, 120), lr: float = 1e-3,
             nonspeech: bool = True) -> Path:
    """A run folder as the trainer writes it: recipe.yaml, run_info.json, metrics.jsonl (training records,
    evaluation records and a zero-shot one), best/, eval/step-NNNNNN.jsonl per evaluation."""
    rows = rows if rows is not None else _dev_rows()[:25]
    folder.mkdir(parents=True, exist_ok=True)
    noise = None
    if nonspeech:
        noise = folder.parent / "noise.wav"
        sf.write(noise, np.random.default_rng(0).normal(0, 0.05, 32000).astype("float32"), 16000)
    (folder / "recipe.yaml").write_text(
        f"# asr-lora train {folder / 'recipe.yaml'}\nmodel:\n  name: bundled:whisper-base\n  quant: none\n"
        f"  language: ko\n  audio_context: trimmed\nlora:\n  r: 32\n  alpha: 64\n  target_modules: [q_proj, v_proj]\n"
        f"data:\n  train: data/demo/train.jsonl\n  dev: data/demo/dev.jsonl\ntrain:\n  output_dir: {folder}\n"
        f"  max_steps: {steps[-1]}\n  batch_size: 8\n  lr: {lr}\neval:\n  max_samples: {len(rows)}\n", encoding="utf-8")
    (folder / "run_info.json").write_text(json.dumps({
        "command": ["asr-lora", "train", "recipes/demo/whisper-base_lora.yaml"], "cwd": str(REPO), "seed": 42,
        "git_revision": "196c45f", "git_dirty": False, "packages": {"torch": "2.13.0", "transformers": "5.0.0"},
        "hardware": "cpu (2 cores)", "trainable_parameters": 1179648, "total_parameters": 73773568}))
    records = []
    for q, step in enumerate((0, *steps)):
        lines = _lines(rows, q, noise)
        _write_jsonl(folder / "eval" / f"step-{step:06d}.jsonl", lines)
        speech = [u for u in lines if not u.get("nonspeech")]
        rep = score([u["ref"] for u in speech], [u["hyp"] for u in speech])
        record = {"step": step, "cer": rep.cer, "cer_nospace": rep.cer_nospace, "wer": rep.wer, "swer": rep.swer,
                  "eval_loss": 1.5 / (q + 1), "eval_seconds": 3.0, "eval_n": len(speech), "eval_skipped": 0}
        if nonspeech:
            record["nonspeech_share"] = sum(bool(u["hyp"]) for u in lines if u.get("nonspeech")) / 3
        if step == 0:
            record["zero_shot"] = True
        else:
            records += [{"step": s, "loss": 2.0 / (1 + s / 30), "lr": lr, "tokens": 800, "step_seconds": 0.9}
                        for s in range(step - 29, step + 1, 4)]
        records.append(record)
    _write_jsonl(folder / "metrics.jsonl", records)
    best = min((r for r in records if "cer" in r and not r.get("zero_shot")), key=lambda r: r["cer"])
    (folder / "best").mkdir(exist_ok=True)
    (folder / "best" / "metrics.json").write_text(json.dumps(best))
    (folder / "best" / "trainer_state.json").write_text(json.dumps({"step": best["step"], "best_step": best["step"],
                                                                    "best_cer": best["cer"]}))
    return folder


def make_eval(folder: Path, rows: list[dict] | None = None) -> Path:
    """An `asr-lora eval` output folder (summary.json, utterances.jsonl)."""
    rows = rows if rows is not None else _dev_rows()[:25]
    lines = [{k: v for k, v in u.items() if k not in ("offset", "end", "no_speech_prob")} for u in _lines(rows, 1)]
    rep = score([u["ref"] for u in lines], [u["hyp"] for u in lines])
    _write_jsonl(folder / "utterances.jsonl", lines)
    (folder / "summary.json").write_text(json.dumps({
        "n": rep.n, "cer": rep.cer, "cer_nospace": rep.cer_nospace, "wer": rep.wer, "swer": rep.swer,
        "insertion_rate": rep.insertion_rate, "loop_fraction": 0.0, "length_ratio": rep.length_ratio,
        "decode_seconds": 4.2, "audio_seconds": 80.0, "rtf": 0.05, "skipped": 0, "skipped_rows": [], "n_loops": 0,
        "model": "bundled:whisper-base", "manifest": str(DEMO_DEV), "language": "ko", "audio_context": "full",
        "batch_size": 16, "max_new_tokens": 224}))
    return folder


def _clip_uris(page: str) -> dict[str, str]:
    return json.loads(re.search(r'<script id="clips" type="application/json">(.*?)</script>', page, re.S).group(1))


# --------------------------------------------------------------------------- the page

def test_run_page_shows_checkpoints_best_worst_utterances_and_audio(tmp_path):
    run = make_run(tmp_path / "demo")
    out = write_report([run])
    assert out == run / "report.html"
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//|url\((?!#)|@import""", page)  # nothing to fetch
    assert page.count("<svg") == 1 and "dev error rates" in page and "hallucination indicators" in page
    best = json.loads((run / "best" / "trainer_state.json").read_text())["best_step"]
    assert f"Best checkpoint: step {best}" in page
    assert '<tr class="zero"><td>0 zero-shot</td>' in page and f'<tr class="best"><td>{best} best</td>' in page
    assert "non-speech with output" in page and "Non-speech clips with output" in page
    lines = [json.loads(x) for x in (run / "eval" / f"step-{best:06d}.jsonl").read_text().splitlines()]
    wrong = sorted((u for u in lines if u["errors"] and not u.get("nonspeech")),
                   key=lambda u: (-u["errors"], -u["cer"], u["id"]))
    assert 0 < len(wrong) < 20
    assert f"Worst {len(wrong)} dev utterances at step {best} (of 28," in page  # 25 speech + 3 non-speech lines
    shown = re.findall(r'<div class="uh"><b>([^<]+)</b>', page.split("Worst ", 1)[1].split("</table>", 1)[0])
    assert shown == [u["id"] for u in wrong]  # most errors (then highest CER) first, none without errors
    assert '<span class="sub">' in page and '<span class="ins">' in page and '<span class="del">' in page
    clips = _clip_uris(page)
    players = re.findall(r"<audio [^>]*>", page)
    assert len(players) == len(wrong) + 1 and all('data-clip="' in p for p in players)  # + 1 non-speech clip
    assert len(clips) == len({p for p in players})  # each clip encoded once
    ogg = base64.b64decode(next(iter(clips.values())).split(",", 1)[1])
    assert ogg[:4] == b"OggS"
    assert "ul class=\"notes\"" not in page  # nothing missing


def test_segments_are_cut_by_offset_and_end(tmp_path):
    from asr_lora.report import AudioShelf

    row = _dev_rows()[1]
    shelf = AudioShelf(tmp_path)
    whole = shelf._encode(Path(row["audio"]), None, None)
    part = shelf._encode(Path(row["audio"]), 0.5, 1.5)
    info = sf.info(__import__("io").BytesIO(part))
    assert abs(info.duration - 1.0) < 0.03 and sf.info(__import__("io").BytesIO(whole)).duration > 2.5


def test_audio_beyond_the_budget_is_linked_relative_to_the_page(tmp_path):
    run = make_run(tmp_path / "demo", nonspeech=False)
    out = write_report([run], tmp_path / "pages" / "r.html", audio_budget=30_000)
    page = out.read_text(encoding="utf-8")
    embedded = sum(len(base64.b64decode(u.split(",", 1)[1])) for u in _clip_uris(page).values())
    assert 0 < embedded <= 30_000
    linked = re.findall(r'<audio controls preload="none" src="([^"]+)">', page)
    assert linked, "nothing linked past the budget"
    for src in linked:
        path, _, fragment = src.partition("#")
        assert (out.parent / path).resolve().is_file()
        assert not fragment or re.fullmatch(r"t=[\d.]+,[\d.]+", fragment)
    assert any("#t=0.2," in src for src in linked)  # a segment plays from its offset


def test_large_run_gives_a_page_of_a_few_mb_at_most(tmp_path):
    run = make_run(tmp_path / "big", steps=(1000,), nonspeech=False)
    for step_file in (run / "eval").iterdir():  # 10,000 dev utterances: the 25 lines again and again
        lines = step_file.read_text(encoding="utf-8").splitlines()
        many = [json.loads(lines[i % len(lines)]) | {"id": f"utt-{i:05d}"} for i in range(10_000)]
        _write_jsonl(step_file, many)
    start = time.perf_counter()
    out = write_report([run])
    seconds = time.perf_counter() - start
    size = out.stat().st_size
    print(f"10,000 dev utterances x 2 evaluations: page {size / 1e6:.2f} MB in {seconds:.1f} s")
    assert size < 3_000_000
    assert "of 10000, by character errors" in out.read_text(encoding="utf-8")


def test_missing_optional_files_degrade_the_page_with_notes(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "cer": 0.3, "wer": 0.5}\n{"step": 3')
    page = write_report([run]).read_text(encoding="utf-8")
    for note in ("recipe.yaml not found", "run_info.json not found", "1 unreadable line", "no eval/step-NNNNNN.jsonl",
                 "best = lowest dev CER in metrics.jsonl (step 20)"):
        assert note in page
    assert "<svg" in page and "30.00%" in page

    broken = make_run(tmp_path / "broken", nonspeech=False)
    best = json.loads((broken / "best" / "trainer_state.json").read_text())["best_step"]
    (broken / "eval" / f"step-{best:06d}.jsonl").unlink()
    (broken / "run_info.json").write_text("{not json")
    (broken / "recipe.yaml").write_text("model: [unclosed\n")
    page = write_report([broken]).read_text(encoding="utf-8")
    assert f"eval/step-{best:06d}.jsonl not found: the utterances shown are step" in page
    assert "run_info.json is not valid JSON" in page and "recipe.yaml does not parse" in page


def test_a_folder_that_is_neither_run_nor_eval_is_a_user_error(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(UserError, match=r"photos: neither a training run folder .* nor an 'asr-lora eval'"):
        write_report([tmp_path / "photos"])
    with pytest.raises(UserError, match="missing: no such folder"):
        write_report([tmp_path / "missing"])


def test_eval_folder_page(tmp_path):
    folder = make_eval(tmp_path / "eval-whisper-base-dev")
    page = write_report([folder]).read_text(encoding="utf-8")
    assert "asr lora eval" not in page and "Evaluation settings" in page and "bundled:whisper-base" in page
    wrong = [json.loads(x) for x in (folder / "utterances.jsonl").read_text().splitlines()]
    wrong = [u for u in wrong if u["errors"]]
    assert '<tr class="best"><td>eval</td>' in page and f"Worst {len(wrong)} dev utterances (of 25," in page
    assert len(re.findall(r"<audio ", page)) == len(wrong)


def test_several_runs_side_by_side(tmp_path):
    a = make_run(tmp_path / "lr-1e-3")
    b = make_run(tmp_path / "lr-3e-4", lr=3e-4, steps=(30, 60))
    e = make_eval(tmp_path / "eval-base")
    out = write_report([a, b, e], tmp_path / "compare.html")
    page = out.read_text(encoding="utf-8")
    assert "Runs side by side" in page and page.count("<svg") == 3  # the overlay and one per run
    assert "<h3>Recipe differences</h3>" in page and "train.lr" in page and "train.max_steps" in page
    assert re.search(r"Worst \d+ shared dev utterances", page)
    for name in ("lr-1e-3", "lr-3e-4", "eval-base"):
        assert f"<a href='#source-" in page and name in page
    # a clip shown for several runs is embedded once
    players = re.findall(r'data-clip="(c\d+)"', page)
    assert len(set(players)) == len(_clip_uris(page)) < len(players)


def test_cli_report_prints_the_path_and_names_a_bad_folder(tmp_path, capsys):
    from asr_lora.cli import main

    run = make_run(tmp_path / "demo", nonspeech=False)
    assert main(["report", str(run), "--worst", "5"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert "Worst 5 dev utterances" in (run / "report.html").read_text(encoding="utf-8")
    assert main(["report", str(run), str(tmp_path), "--out", str(tmp_path / "x.html")]) == 2
    assert f"asr-lora report: error: {tmp_path}: neither a training run folder" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


# --------------------------------------------------------------------------- in a real browser

def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class DevTools:
    """A headless Chromium driven through the DevTools protocol on a pipe (--remote-debugging-pipe:
    JSON messages ending in NUL, read from fd 4 and written to fd 3 of the browser)."""

    def __init__(self, exe: str, profile: Path):
        import fcntl

        self._log = profile / "chromium.log"  # a file, not a pipe: a chatty browser never blocks on it
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        keep = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]  # out of the way of 3, 4

        def wire():  # in the child: its fd 3 reads our commands, its fd 4 writes the replies
            os.dup2(keep[0], 3)
            os.dup2(keep[1], 4)

        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
                preexec_fn=wire, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=log)
        for fd in (to_browser, from_browser, *keep):
            os.close(fd)
        self._next, self._buffer, self.events = 0, b"", []

    def _message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            if not select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("no message from chromium")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe: {self._log.read_text(errors='replace')[-2000:]}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            event = next((e for e in self.events if e.get("method") == method), None)
            if event is not None:
                return event
            self.events.append(self._message(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._read)
        os.close(self._write)


CHECK_PAGE = """(async () => {
  const audios = [...document.querySelectorAll('audio')];
  const embedded = audios.filter(a => a.dataset.clip);
  await Promise.all(embedded.map(a => a.readyState >= 1 ? null : new Promise(done => {
    a.addEventListener('loadedmetadata', done, {once: true});
    a.addEventListener('error', done, {once: true});
    setTimeout(done, 10000);
  })));
  const plots = [...document.querySelectorAll('figure.plot svg')];
  return {plots: plots.length, plot_width: plots.length ? plots[0].getBoundingClientRect().width : 0,
          audios: audios.length, embedded: embedded.length,
          decoded: embedded.filter(a => a.readyState >= 1 && a.duration > 0).length,
          media_errors: embedded.filter(a => a.error).map(a => a.error.message || a.error.code),
          height: document.documentElement.scrollHeight};
})()"""


def open_page(page: Path, screenshot: Path, width: int = 1280, height: int | None = None) -> tuple[dict, list[str]]:
    """Load ``page`` in headless Chromium; return the page checks (plots, players, decoded audio) and every
    console error, uncaught exception or error log entry; save a PNG screenshot (full page, or ``height`` px)."""
    exe = _chromium()
    with tempfile.TemporaryDirectory(prefix="asr-lora-chromium-") as profile:
        browser = DevTools(exe, Path(profile))
        try:
            target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                browser.send(f"{domain}.enable", session=session)
            browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height or 900,
                                                                "deviceScaleFactor": 1, "mobile": False}, session)
            browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session)
            browser.wait_for("Page.loadEventFired")
            checks = browser.send("Runtime.evaluate", {"expression": CHECK_PAGE, "awaitPromise": True,
                                                       "returnByValue": True}, session)["result"]["value"]
            clip = {"x": 0, "y": 0, "width": width, "height": height or checks["height"], "scale": 1}
            shot = browser.send("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                           "captureBeyondViewport": True}, session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            errors = []
            for e in browser.events:
                params = e.get("params", {})
                if e.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    errors.append(f"console.{params['type']}: {params.get('args')}")
                elif e.get("method") == "Runtime.exceptionThrown":
                    errors.append(f"exception: {params.get('exceptionDetails')}")
                elif e.get("method") == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        finally:
            browser.close()
    return checks, errors


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (.ci/run installs Debian's chromium)")
def test_page_loads_in_headless_chromium_with_plots_and_players(tmp_path):
    a = make_run(tmp_path / "demo")
    b = make_run(tmp_path / "demo-lr-3e-4", lr=3e-4, steps=(30, 60))
    out = write_report([a, b], tmp_path / "report.html", audio_budget=100_000)  # some clips linked too
    page = out.read_text(encoding="utf-8")
    assert 'preload="none" src=' in page  # linked clips are on the page as well
    checks, errors = open_page(out, tmp_path / "report.png")
    assert errors == []
    assert checks["plots"] == 3 and checks["plot_width"] > 300
    assert checks["audios"] == len(re.findall(r"<audio ", page)) and checks["embedded"] >= 20
    assert checks["decoded"] == checks["embedded"] and checks["media_errors"] == []  # Ogg/Opus plays in Chromium
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    from PIL import Image

    with Image.open(tmp_path / "report.png") as img:
        assert img.size[0] == 1280 and img.size[1] == checks["height"] > 1500
        assert len(img.convert("L").getcolors(1 << 16) or []) > 10  # not a blank page


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (.ci/run installs Debian's chromium)")
def test_the_browser_check_sees_console_errors_exceptions_and_failed_loads(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><html><body><audio controls preload="metadata" src="missing.ogg"></audio>'
                    '<script>console.error("boom"); nosuch();</script></body></html>')
    _, errors = open_page(page, tmp_path / "bad.png", height=200)
    assert len(errors) == 3, errors
    for what in ("console.error: [{'type': 'string', 'value': 'boom'}]", "nosuch is not defined", "missing.ogg"):
        assert sum(what in e for e in errors) == 1, (what, errors)
