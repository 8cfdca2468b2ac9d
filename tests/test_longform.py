"""Keeping every sentence: pieces within the trained input length, the completeness guard, the
fallback that keeps the best attempt, eval as transcribe decodes, the long-form probe in training."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from asr_lora.audio import SAMPLE_RATE, load_audio
from asr_lora.backends import DecodeOptions, Hypothesis, _Decoding, best_attempt
from asr_lora.cli import main
from asr_lora.settings import ModelSettings, TrainedOn, read_settings, write_settings
from asr_lora.transcribe import Cut, complete, incomplete, inner_cuts, piece_limits, pieces, transcribe_audio

from .conftest import ASSETS, DEMO, demo_rows, write_manifest

RATE = 4.0  # characters a second the fake model writes while it writes
TRAINED = TrainedOn(min_seconds=1.4, max_seconds=30.0, chars_per_second=4.5, chars_per_second_low=3.6)


def sentences(n: int, pause: float = 0.5) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """``n`` demo test clips with ``pause`` s of silence between them, and where each clip is."""
    clips = [load_audio(DEMO / r["audio"]) for r in demo_rows("test", n)]
    gap = np.zeros(int(pause * SAMPLE_RATE), dtype=np.float32)
    parts, where, position = [], [], 0
    for k, clip in enumerate(clips):
        parts += ([gap] if k else []) + [clip]
        position += len(gap) if k else 0
        where.append((position, position + len(clip)))
        position += len(clip)
    return np.concatenate(parts), where


class FirstSentenceOnly:
    """A fake model that writes RATE characters a second for the first ``stop_after`` seconds of a piece,
    then stops (what a model trained on single sentences does); it logs every piece it is given."""

    def __init__(self, stop_after: float = 3.0):
        self.stop_after, self.calls = stop_after, []

    def __call__(self, audios: list[np.ndarray]) -> list[Hypothesis]:
        self.calls.append([len(a) / SAMPLE_RATE for a in audios])
        return [Hypothesis("가" * int(RATE * min(len(a) / SAMPLE_RATE, self.stop_after)), 0.01, -0.2, 1.5)
                for a in audios]


def test_speech_pieces_stay_within_the_trained_input_length():
    audio, _ = sentences(12)
    assert len(audio) > 40 * SAMPLE_RATE
    for longest in (8.0, 20.0):
        settings = ModelSettings(trained_on=replace(TRAINED, max_seconds=longest))
        assert settings.max_input_seconds == longest
        cuts = pieces(audio, "pauses", True, settings.max_input_seconds)
        speech = [c for c in cuts if c.skip_reason is None]
        assert speech and all(c.end - c.start <= longest * SAMPLE_RATE for c in speech)
        assert all(c.spans and c.start <= c.spans[0][0] and c.spans[-1][1] <= c.end for c in speech)
    assert ModelSettings().max_input_seconds == 30.0  # nothing recorded: Whisper's window
    assert ModelSettings(trained_on=replace(TRAINED, max_seconds=45.0)).max_input_seconds == 30.0


def test_a_model_trained_on_single_utterances_gets_one_speech_span_a_piece():
    audio, where = sentences(6)
    joined = pieces(audio, "pauses", True, *piece_limits(ModelSettings(trained_on=replace(TRAINED, max_seconds=8.0))))
    single = ModelSettings(trained_on=replace(TRAINED, max_seconds=8.0, max_utterances=1))
    assert single.single_utterance and not ModelSettings(trained_on=TRAINED).single_utterance
    alone = pieces(audio, "pauses", True, *piece_limits(single))
    speech = [c for c in alone if c.skip_reason is None]
    assert all(len(c.spans) == 1 for c in speech) and len(speech) >= len(where)
    assert len(speech) > len([c for c in joined if c.skip_reason is None])
    for a, b in where:  # each sentence lies in pieces of its own: no piece reaches into two sentences
        inside = [c for c in speech if c.end > a and c.start < b]
        assert all(c.start >= a - SAMPLE_RATE // 2 and c.end <= b + SAMPLE_RATE // 2 for c in inside)


def test_the_guard_splits_an_incomplete_piece_at_its_speech_spans_and_keeps_the_longer_text():
    audio, where = sentences(4)
    model = FirstSentenceOnly()
    segments = transcribe_audio(audio, model, "pauses", True, ModelSettings(trained_on=TRAINED))
    spoken = [s for s in segments if s["text"]]
    assert len(model.calls) == 2 and len(model.calls[0]) == 1  # one piece, then its parts in one call
    assert len(model.calls[1]) == len(spoken) == 4 and all(s["redecoded"] == "incomplete" for s in spoken)
    for s, (a, b) in zip(spoken, where):  # each part holds its own sentence
        assert s["start"] * SAMPLE_RATE <= a + 0.05 * SAMPLE_RATE and b - 0.05 * SAMPLE_RATE <= s["end"] * SAMPLE_RATE
    assert sum(len(s["text"]) for s in spoken) > 2 * int(RATE * 3.0)
    # a model that writes its whole piece is left alone, and so is every model without a record
    whole = FirstSentenceOnly(stop_after=math.inf)
    assert not any("redecoded" in s for s in transcribe_audio(audio, whole, "pauses", True,
                                                              ModelSettings(trained_on=TRAINED)))
    assert len(whole.calls) == 1
    assert not any("redecoded" in s for s in transcribe_audio(audio, FirstSentenceOnly(), "pauses", True, None))


def test_the_guard_rules():
    cut = Cut(0, 10 * SAMPLE_RATE, None, ((0, 4 * SAMPLE_RATE), (5 * SAMPLE_RATE, 10 * SAMPLE_RATE)))
    # 9 s of speech at the slow rate 3.6/s predicts 32 characters; fewer than half is incomplete
    assert incomplete("가" * 15, cut, TRAINED) and not incomplete("가 " * 17, cut, TRAINED)
    assert not incomplete("", cut, TRAINED)  # judged silent: the silence rule stands
    assert not incomplete("가", cut, None) and not incomplete("가", cut._replace(spans=()), TRAINED)
    parts = inner_cuts(cut)
    assert [(p.start, p.end) for p in parts] == [(0, int(4.5 * SAMPLE_RATE)), (int(4.5 * SAMPLE_RATE), 10 * SAMPLE_RATE)]
    assert inner_cuts(cut._replace(spans=cut.spans[:1])) == []
    # parts that hold less than the piece do not replace it
    piece = np.zeros(10 * SAMPLE_RATE, dtype=np.float32)
    worse = complete([(cut, piece, Hypothesis("가" * 10))], lambda audios: [Hypothesis("가")] * len(audios), TRAINED)
    assert worse == [[(cut, Hypothesis("가" * 10), None)]]


def test_transcribe_cli_path_applies_the_guard_too():
    from asr_lora.transcribe import Item, Writer, transcribe_items
    import io

    audio, _ = sentences(4)

    class Fake:
        settings = ModelSettings(audio_context="trimmed", trained_on=TRAINED)
        options = DecodeOptions()
        language = "ko"
        decode = FirstSentenceOnly()

    import soundfile as sf
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "four.flac"
        sf.write(path, audio, SAMPLE_RATE)
        out = io.StringIO()
        writer = Writer("json", None, "ko", out)
        transcribe_items(Fake(), [Item(str(path), str(path))], writer, progress=False)
    result = json.loads(out.getvalue())
    spoken = [s for s in result["segments"] if s["text"]]
    assert len(spoken) == 4 and all(s["redecoded"] == "incomplete" for s in spoken)


def judge(first: list[Hypothesis], samples: dict[float, list[Hypothesis]], **options) -> list[Hypothesis]:
    decoding = _Decoding.__new__(_Decoding)
    decoding.options = DecodeOptions(**options)

    def redecode(idx: list[int], temperature: float) -> list[Hypothesis]:
        return [replace(samples[temperature][i]) for i in idx]

    return decoding._judge(first, redecode)


def test_fallback_keeps_greedy_when_it_beats_every_sample():
    greedy = Hypothesis("택", 0.05, -2.75, 0.5)
    samples = {t: [Hypothesis(f"택시 as deliveries {t}", None, -6.2 + t, 1.3)] for t in (0.2, 0.4, 0.6, 0.8, 1.0)}
    (kept,) = judge([greedy], samples)
    assert kept.text == "택" and kept.temperature == 0.0 and kept.avg_logprob == -2.75
    # openai/whisper would keep the last sample; the most probable attempt is kept instead
    better = {**samples, 0.6: [Hypothesis("택시를 타면", None, -1.4, 1.1)]}
    (kept,) = judge([greedy], better)
    assert kept.text == "택시를 타면" and kept.temperature == 0.6
    # a more probable attempt that loops (over the compression-ratio threshold) is not kept
    looping = {**samples, 0.4: [Hypothesis("택시 " * 30, None, -0.9, 3.5)]}
    (kept,) = judge([greedy], looping)
    assert kept.text == "택"
    # an attempt that passes the thresholds ends the fallback, as before
    passing = {**samples, 0.2: [Hypothesis("택시를 타면 더 빨리 갈 수 있어요", None, -0.4, 1.2)]}
    (kept,) = judge([greedy], passing)
    assert kept.temperature == 0.2 and kept.avg_logprob == -0.4
    assert best_attempt([greedy, *samples[0.2]], None) is greedy


def test_the_kept_result_is_never_less_probable_than_greedy_on_a_real_decoder(tiny_whisper):
    """The tiny random model is unsure of everything: every clip goes through all temperatures."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from asr_lora.backends import HFTranscriber

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    tokenizer = WhisperProcessor.from_pretrained(tiny_whisper).tokenizer
    audios = [load_audio(ASSETS / name) for name in ("ko_greeting.flac", "ko_finetune.flac", "en_fox.flac")]
    common = {"max_new_tokens": 6, "no_speech_threshold": None}
    greedy = HFTranscriber(model, tokenizer, ModelSettings(), DecodeOptions(temperatures=(0.0,), **common))
    fallback = HFTranscriber(model, tokenizer, ModelSettings(), DecodeOptions(**common))
    for g, kept in zip(greedy.decode(audios), fallback.decode(audios)):
        assert g.avg_logprob < -1.0  # unsure: the fallback ran
        if g.compression_ratio <= 2.4:
            assert kept.avg_logprob >= g.avg_logprob - 1e-6
        else:  # a looping greedy result is not a candidate while a sample does not loop
            assert kept.compression_ratio <= 2.4 or kept.avg_logprob >= g.avg_logprob - 1e-6
    no_ratio = HFTranscriber(model, tokenizer, ModelSettings(), DecodeOptions(compression_ratio_threshold=None,
                                                                              **common))
    for g, kept in zip(greedy.decode(audios), no_ratio.decode(audios)):
        assert kept.avg_logprob >= g.avg_logprob - 1e-6


def test_trained_on_is_recorded_read_back_and_refused_when_malformed(tmp_path):
    write_settings(tmp_path, ModelSettings(trained_on=TRAINED))
    data = json.loads((tmp_path / "asr_lora.json").read_text())
    assert data["trained_on"] == TRAINED.to_json()
    assert read_settings(tmp_path).trained_on == TRAINED
    single = replace(TRAINED, max_utterances=1)
    write_settings(tmp_path, ModelSettings(trained_on=single))
    assert read_settings(tmp_path).trained_on == single and read_settings(tmp_path).single_utterance
    (tmp_path / "asr_lora.json").write_text(json.dumps({**data, "trained_on": {"max_seconds": "long"}}))
    from asr_lora.errors import UserError

    with pytest.raises(UserError, match="trained_on"):
        read_settings(tmp_path)


def test_eval_as_transcribe_scores_rows_of_any_length_beside_the_clip_cer(tiny_whisper, tmp_path, capsys):
    import soundfile as sf

    audio, _ = sentences(12)
    sf.write(tmp_path / "long.flac", audio, SAMPLE_RATE)
    rows = demo_rows("test", 3) + [{"id": "long", "audio": str(tmp_path / "long.flac"),
                                    "text": " ".join(r["text"] for r in demo_rows("test", 12))}]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_whisper), "--data", manifest, "--out", str(out), "--as-transcribe",
                 "--max-new-tokens", "3", "--transcribe-max-new-tokens", "3", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and summary["skipped"] == 1  # the clip pass: 30 s at most
    assert summary["transcribe"]["n"] == 4 and summary["transcribe"]["skipped"] == 0
    assert 0 <= summary["transcribe"]["deletion_rate"] <= 1 and "cer" in summary["transcribe"]
    lines = [json.loads(line) for line in (out / "utterances_transcribe.jsonl").read_text().splitlines()]
    assert [u["id"] for u in lines] == ["demo-test-0001", "demo-test-0002", "demo-test-0003", "long"]
    assert "as transcribe decodes them" in capsys.readouterr().out


def test_training_scores_the_long_form_probe_per_checkpoint_and_can_select_by_it(tiny_whisper, tmp_path):
    from asr_lora.config import load_recipe
    from asr_lora.train import LONGFORM_KEYS, run_training

    train = write_manifest(tmp_path / "train.jsonl", demo_rows("train", 6))
    dev = write_manifest(tmp_path / "dev.jsonl", demo_rows("dev", 10))
    out = tmp_path / "run"
    cfg = load_recipe(None, [f"model.name={tiny_whisper}", "model.gradient_checkpointing=false", "lora.r=4",
                             "lora.alpha=8", f"data.train={train}", f"data.dev={dev}", f"train.output_dir={out}",
                             "model.audio_context=trimmed", "train.max_steps=2", "train.eval_every=1", "train.save_every=1",
                             "train.batch_size=3", "eval.max_new_tokens=3", "eval.batch_size=4",
                             "data.concat_probability=0.5", "data.concat_max_seconds=14", "eval.longform_rows=10",
                             "train.select_best=longform"])
    trainer = run_training(cfg, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "cer" in r]
    assert len(evals) == 2 and all(all(r[k] is not None and r[k] >= 0 for k in LONGFORM_KEYS) for r in evals)
    best = min(evals, key=lambda r: ((r["longform_cer"] + r["longfile_cer"]) / 2, r["step"]))
    assert trainer.state.best_step == best["step"]
    lines = [json.loads(line) for line in (out / "eval" / "longform-step-000001.jsonl").read_text().splitlines()]
    assert lines[-1]["id"] == "longfile" and all(u["id"].startswith("longform-") for u in lines[:-1])
    assert sum(u["duration"] for u in lines[:-1]) == pytest.approx(lines[-1]["duration"], abs=1.0)
    settings = read_settings(out / "best")
    assert settings.trained_on.max_seconds == 14.0 and settings.max_input_seconds == 14.0


def test_verbose_json_says_which_segments_the_guard_redecoded():
    from asr_lora.serve import verbose_json

    segments = [{"start": 0.0, "end": 2.0, "text": "가나", "avg_logprob": -0.1, "redecoded": "incomplete"},
                {"start": 2.0, "end": 4.0, "text": "다라", "avg_logprob": -0.2}]
    out = verbose_json(segments, 4.0, "ko")["segments"]
    assert out[0]["redecoded"] == "incomplete" and "redecoded" not in out[1]
