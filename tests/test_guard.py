"""The second-language guard (data.guard) scored per checkpoint, how best/ is chosen with the guards
(train.select_best), the demo's English guard set (scripts/make_guard.py), and the guard in
cer.png and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from asr_lora.audio import SAMPLE_RATE, load_audio
from asr_lora.config import ConfigError, load_recipe
from asr_lora.train import TrainerState, is_better, limit_breaches, run_training, update_best

from .conftest import DEMO, REPO, load_script, write_manifest
from .test_train import recipe, run_ddp, small_data  # noqa: F401  (small_data is a fixture)

GUARD = DEMO / "guard_en.jsonl"


def guard_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in GUARD.read_text(encoding="utf-8").splitlines()][:n]
    for r in rows:
        r["audio"] = str(DEMO / r["audio"])
    return rows


def evals(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "cer" in r]


# --------------------------------------------------------------------------- the selection rule


def train_cfg(*overrides: str):
    return load_recipe(None, ["data.nonspeech_dev=x.jsonl", "data.guard=g.jsonl", *overrides]).train


def m(cer: float, share: float | None = None, guard: float | None = None) -> dict:
    return {"cer": cer, "nonspeech_share": share, "guard_wer": guard}


def test_select_best_cer_is_the_lowest_cer_whatever_the_guards():
    cfg = train_cfg()
    assert cfg.select_best == "cer"
    assert is_better(m(0.10, 0.9, 0.9), m(0.11, 0.0, 0.1), cfg)
    assert not is_better(m(0.11, 0.0, 0.1), m(0.10, 0.9, 0.9), cfg)
    assert not is_better(m(0.10, 0.0), m(0.10, 0.5), cfg)  # equal CER: the earlier one stays


def test_cer_guarded_prefers_checkpoints_within_the_limits():
    cfg = train_cfg("train.select_best=cer_guarded", "train.max_nonspeech_share=0.1", "train.max_guard_wer=0.3")
    assert limit_breaches(m(0.1, 0.125, 0.2), cfg) == ["nonspeech_share 0.125 > 0.1"]
    assert limit_breaches(m(0.1, 0.0, 0.5), cfg) == ["guard_wer 0.5 > 0.3"]
    assert limit_breaches(m(0.1, None, 0.2), cfg) == []  # not measured (no data.nonspeech_dev): no limit
    assert limit_breaches(m(0.1, 0.1, 0.3), cfg) == []  # the limits are inclusive
    within, outside = m(0.20, 0.05, 0.2), m(0.10, 0.20, 0.2)
    assert is_better(within, outside, cfg) and not is_better(outside, within, cfg)  # whatever the CER
    assert is_better(m(0.10, 0.2, 0.9), m(0.12, 0.0, 0.9), cfg)  # both outside: the lowest CER
    assert is_better(m(0.15, 0.05, 0.2), m(0.20, 0.0, 0.2), cfg)  # both within: the lowest CER
    assert is_better(m(0.15, 0.0, 0.2), m(0.15, 0.05, 0.2), cfg)  # equal CER: the lower non-speech share
    assert not is_better(m(0.15, 0.05, 0.2), m(0.15, 0.05, 0.2), cfg)
    # without limits cer_guarded is the lowest CER, ties to the lower non-speech share
    free = train_cfg("train.select_best=cer_guarded")
    assert is_better(m(0.10, 0.9), m(0.11, 0.0), free) and is_better(m(0.10, 0.0), m(0.10, 0.1), free)


def test_update_best_falls_back_to_the_lowest_cer_logs_it_and_counts_for_early_stopping():
    cfg = train_cfg("train.select_best=cer_guarded", "train.max_nonspeech_share=0.05")
    st = TrainerState()
    history = [(30, m(0.30, 0.10)), (60, m(0.20, 0.15)), (90, m(0.25, 0.05)), (120, m(0.10, 0.20)),
               (150, m(0.22, 0.00)), (180, m(0.22, 0.05))]
    notes, counters = [], []
    for step, metrics in history:
        st.step = step
        notes.append(update_best(st, metrics, cfg))
        counters.append(st.evals_without_improvement)
    assert (st.best_step, st.best_cer, st.best_metrics) == (150, 0.22, {"cer": 0.22, "nonspeech_share": 0.0,
                                                                         "guard_wer": None, "longform_cer": None,
                                                                         "longfile_cer": None})
    assert counters == [0, 0, 0, 1, 0, 1]
    assert "no checkpoint within the limits yet (nonspeech_share 0.1 > 0.05)" in notes[0]
    assert "no checkpoint within the limits yet (nonspeech_share 0.15 > 0.05)" in notes[1]
    assert notes[2] is None and notes[4] is None and notes[5] is None
    assert "dev CER 0.1000 is below the best checkpoint's (0.2500, step 90)" in notes[3] and "not best" in notes[3]


def test_best_state_survives_a_checkpoint_round_trip():
    """What a resume reads back (trainer_state.json through JSON) makes the same decisions as the
    state in memory; a state written before best_metrics existed compares by CER alone."""
    cfg = train_cfg("train.select_best=cer_guarded", "train.max_nonspeech_share=0.05")
    st = TrainerState(step=60)
    update_best(st, m(0.30, 0.0), cfg)
    saved = json.loads(json.dumps({k: v for k, v in vars(st).items() if k != "history"}))
    restored = TrainerState(**{**saved, "history": []})
    assert restored == st
    for later in (m(0.20, 0.10), m(0.29, 0.0), m(0.31, 0.0)):
        a, b = TrainerState(**vars(st)), TrainerState(**vars(restored))
        assert update_best(a, later, cfg) == update_best(b, later, cfg) and a == b
    old = TrainerState(**{k: v for k, v in saved.items() if k != "best_metrics"}, history=[])
    assert old.best_metrics == {} and is_better(m(0.2), {"cer": old.best_cer}, train_cfg())


def test_config_validates_the_rule_and_its_limits():
    with pytest.raises(ConfigError, match="is not one of"):
        train_cfg("train.select_best=wer")
    with pytest.raises(ConfigError, match="0 or more"):
        train_cfg("train.select_best=cer_guarded", "train.max_nonspeech_share=-0.1")
    cfg = load_recipe(REPO / "recipes" / "demo" / "whisper-base_lora.yaml")
    assert cfg.data.guard == "data/demo/guard_en.jsonl" and cfg.data.guard_language == "en"
    assert cfg.train.select_best == "cer_guarded" and cfg.train.max_nonspeech_share == 0.1
    # the limits stay in the recipe when the rule or the guard sets are overridden away
    cfg = load_recipe(REPO / "recipes" / "demo" / "whisper-base_lora.yaml",
                      ["train.select_best=cer", "data.nonspeech_dev=null", "data.guard=null"])
    assert is_better(m(0.1, 0.9, 0.9), m(0.2, 0.0, 0.0), cfg.train)


# --------------------------------------------------------------------------- scored per checkpoint


def test_zero_shot_evaluation_runs_the_base_without_the_adapters(tiny_whisper, small_data, tmp_path):
    """The zero-shot evaluation decodes the base with the LoRA adapters switched off (they add nothing
    before the first step, but cost on 30 s input): no adapter layer runs, and run again after training it
    gives the step-0 numbers exactly, while the trained adapters are back on for the next evaluation."""
    out = tmp_path / "run"
    trainer = run_training(recipe(tiny_whisper, small_data, out, "train.max_steps=2", "train.eval_every=2",
                                  "train.save_every=2", "eval.zero_shot=true", "train.lr=1e-2",
                                  "model.audio_context=trimmed"), progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for n, m in model.named_modules()
             if n.endswith("lora_A.default")]
    assert hooks
    step0 = evals(out)[0]
    again = trainer.evaluate(zero_shot=True)
    assert not calls
    assert step0["zero_shot"] and again["zero_shot"]
    assert (again["cer"], again["eval_loss"]) == (step0["cer"], step0["eval_loss"])
    trained = trainer.evaluate()
    assert calls and trained["eval_loss"] != step0["eval_loss"]
    for h in hooks:
        h.remove()


def test_guard_is_scored_every_eval_with_its_language_forced(tiny_whisper, small_data, tmp_path, monkeypatch):
    """data.guard rows are decoded every eval (the zero-shot one too) through the one decode path with
    <|en|> forced: guard_wer/guard_cer/guard_n in metrics.jsonl, eval/guard-step-N.jsonl, cer.png;
    best/ follows train.select_best, and a resumed run keeps choosing as an uninterrupted one."""
    from asr_lora.backends import HFTranscriber

    languages = []
    plain_generate = HFTranscriber._generate

    def generate(self, encoded, *args, **kwargs):
        out = plain_generate(self, encoded, *args, **kwargs)
        prompt = self.tokenizer.convert_ids_to_tokens(out.sequences[0, :3].tolist())
        languages.append((self.description, self.language, prompt[1], encoded.last_hidden_state.shape[0]))
        return out

    monkeypatch.setattr(HFTranscriber, "_generate", generate)
    guard = write_manifest(tmp_path / "guard.jsonl", guard_rows(4))
    out = tmp_path / "run"
    common = ("model.audio_context=trimmed", "train.batch_size=4", "train.eval_every=1", "train.save_every=1",
              "eval.zero_shot=true", f"data.guard={guard}", "train.select_best=cer_guarded",
              "train.max_guard_wer=100")
    run_training(recipe(tiny_whisper, small_data, out, "train.max_steps=2", *common), progress=False)
    trainer = run_training(recipe(tiny_whisper, small_data, out, "train.max_steps=3", *common), resume=True,
                           progress=False)
    records = evals(out)
    assert [(r["step"], bool(r.get("zero_shot"))) for r in records] == [(0, True), (1, False), (2, False), (3, False)]
    for r in records:
        assert r["guard_n"] == 4 and r["guard_skipped"] == 0 and r["eval_n"] == 3
        assert 0.0 <= r["guard_cer"] and 0.0 <= r["guard_wer"] and math.isfinite(r["guard_wer"])
    guard_calls = [c for c in languages if c[0] == "guard (en)"]
    assert guard_calls and all(c[1:3] == ("en", "<|en|>") for c in guard_calls)
    assert sum(c[3] for c in guard_calls) == 4 * 4  # 4 rows at each of the 4 evaluations (both runs)
    assert all(c[1:3] == ("ko", "<|ko|>") for c in languages if c[0] != "guard (en)")
    lines = [json.loads(x) for x in (out / "eval" / "guard-step-000003.jsonl").read_text().splitlines()]
    assert [u["id"] for u in lines] == [r["id"] for r in guard_rows(4)] and all("hyp" in u for u in lines)
    assert (out / "eval" / "step-000003.jsonl").is_file() and (out / "cer.png").is_file()
    # the rule replayed on the logged evaluations gives the trainer's best, across the resume
    st = TrainerState()
    for r in records[1:]:
        st.step = r["step"]
        update_best(st, r, trainer.cfg.train)
    assert (trainer.state.best_step, trainer.state.best_metrics) == (st.best_step, st.best_metrics)
    saved = json.loads((out / "best" / "trainer_state.json").read_text())
    assert saved["best_step"] == st.best_step and saved["best_metrics"] == st.best_metrics


def test_ddp_shards_the_guard_and_gathers_it(tiny_whisper, small_data, tmp_path):
    """2 processes: 3 guard rows sharded 2 + 1, rank 1's row unreadable: it still joins the gathers, and
    the eval line scores the 2 readable rows and counts the bad one."""
    train, dev = small_data
    rows = guard_rows(3)
    bad = tmp_path / "corrupt.ogg"
    bad.write_bytes(b"OggS but not really" * 50)
    rows[1]["audio"] = str(bad)
    guard = write_manifest(tmp_path / "guard.jsonl", rows)
    out = tmp_path / "ddp"
    proc = run_ddp([f"model.name={tiny_whisper}", "model.gradient_checkpointing=false", "lora.r=4", "lora.alpha=8",
                    f"data.train={train}", f"data.dev={dev}", f"data.guard={guard}", "eval.max_new_tokens=3",
                    "train.max_steps=1", "train.batch_size=2", "train.eval_every=1", "train.save_every=1",
                    "train.select_best=cer", f"train.output_dir={out}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = evals(out)
    assert record["guard_n"] == 2 and record["guard_skipped"] == 1 and record["eval_n"] == 3
    lines = [json.loads(x) for x in (out / "eval" / "guard-step-000001.jsonl").read_text().splitlines()]
    assert sorted(u["id"] for u in lines) == sorted([rows[0]["id"], rows[2]["id"]])


# --------------------------------------------------------------------------- the demo's guard set


@pytest.fixture(scope="module")
def script():
    return load_script("make_guard")


def test_demo_guard_set_rows_audio_and_size(script):
    rows = [json.loads(line) for line in GUARD.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(script.SENTENCES) == 20 and [r["text"] for r in rows] == list(script.SENTENCES)
    size = 0
    for r in rows:
        assert set(r) == {"id", "audio", "text", "duration", "language"} and r["language"] == "en"
        path = DEMO / r["audio"]
        size += path.stat().st_size
        audio = load_audio(path)
        assert abs(len(audio) / SAMPLE_RATE - r["duration"]) < 0.01 and 1.0 < r["duration"] < 6.0
        assert 0.2 < float(np.abs(audio).max()) <= 1.0
    assert size < 1_000_000
    korean = (DEMO / "sentences.txt").read_text(encoding="utf-8")
    assert not any(r["text"] in korean for r in rows)


def test_make_guard_is_seeded(script):
    assert script.voice_params(3, 1) == script.voice_params(3, 1) != script.voice_params(3, 2)


# --------------------------------------------------------------------------- cer.png and the report


def test_cer_png_has_a_guard_panel_only_with_a_guard(tmp_path):
    from PIL import Image

    from asr_lora.runfolder import RunFolder

    sizes = {}
    for name, guard in (("plain", False), ("guarded", True)):
        run = RunFolder(tmp_path / name)
        run.path.mkdir()
        for step, cer in ((0, 0.9), (30, 0.3), (60, 0.2)):
            extra = {"guard_wer": 0.1 + step / 300, "guard_cer": 0.05 + step / 600} if guard else {}
            run.append_metrics({"step": step, "cer": cer, "cer_nospace": cer, "nonspeech_share": 0.1, **extra})
        run.plot_cer()
        sizes[name] = Image.open(run.path / "cer.png").size
    assert sizes["plain"] == (600, 350) and sizes["guarded"] == (1100, 350)


def test_report_shows_the_guard_when_logged_and_nothing_when_not(tmp_path):
    from asr_lora.report import write_report

    from .test_report import make_run

    plain = make_run(tmp_path / "plain")
    page = write_report([plain]).read_text(encoding="utf-8")
    assert "guard WER" not in page and "cer_guarded" not in page
    guarded = make_run(tmp_path / "guarded")
    records = [json.loads(x) for x in (guarded / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if "cer" in r:
            r.update(guard_wer=0.1 + r["step"] / 1000, guard_cer=0.05 + r["step"] / 2000, guard_n=20)
    (guarded / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = (guarded / "recipe.yaml").read_text().replace(
        "train:\n", "train:\n  select_best: cer_guarded\n  max_nonspeech_share: 0.1\n")
    (guarded / "recipe.yaml").write_text(text)
    page = write_report([guarded]).read_text(encoding="utf-8")
    assert "<th>guard WER</th>" in page and "<th>guard CER</th>" in page
    assert "guard WER (second language)" in page and "guards and hallucination indicators" in page
    assert "chosen by train.select_best=cer_guarded (non-speech share ≤ 10.0%)" in page
    assert "<td>13.00%</td>" in page  # step 30's guard WER in the table
    both = write_report([plain, guarded], tmp_path / "both.html").read_text(encoding="utf-8")
    assert "<td>guard WER</td>" in both
