"""`asr-lora eval`: every model source gives the summary, per-utterance lines and the Markdown report;
bad rows are skipped with reasons; the backends agree with each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asr_lora.cli import _default_eval_dir, main
from asr_lora.evaluate import SUMMARY_KEYS, hypothesis_loops

from .conftest import ASSETS, make_row
from .test_export import clips_manifest, make_adapter

TOKENS = "4"
UTTERANCE_KEYS = {"id", "audio", "duration", "ref", "hyp", "errors", "ref_chars", "cer", "cer_nospace", "wer", "loop"}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return clips_manifest(tmp_path_factory.mktemp("data") / "dev.jsonl")


@pytest.fixture(scope="module")
def sources(tiny_whisper, manifest, tmp_path_factory) -> dict[str, Path]:
    """The four model sources, all from one tiny model + adapter (merged and exported in float32)."""
    from asr_lora.export import export_ct2, merge_adapter

    root = tmp_path_factory.mktemp("sources")
    adapter = make_adapter(tiny_whisper, root / "run" / "best")
    quiet = lambda *_: None  # noqa: E731
    merge_adapter(adapter, root / "merged", data=manifest, n_clips=1, max_new_tokens=2, log=quiet)
    export_ct2(root / "merged", root / "ct2", quantization="float32", data=manifest, n_clips=1, max_new_tokens=2,
               log=quiet)
    return {"model": tiny_whisper, "adapter": adapter, "merged": root / "merged", "ct2": root / "ct2"}


@pytest.fixture(scope="module")
def results(sources, manifest, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for kind, path in sources.items():
        out[kind] = tmp_path_factory.mktemp(f"eval-{kind}")
        assert main(["eval", "--data", str(manifest), f"--{kind}", str(path), "--out", str(out[kind]),
                     "--batch-size", "2", "--max-new-tokens", TOKENS, "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("kind", ["model", "adapter", "merged", "ct2"])
def test_eval_outputs_for_each_source(results, kind):
    out = results[kind]
    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["n"] == 3 and summary["skipped"] == 0 and summary["skipped_rows"] == []
    assert summary["rtf"] == pytest.approx(summary["decode_seconds"] / summary["audio_seconds"], rel=1e-2)
    assert 9.8 < summary["audio_seconds"] < 10.0  # 3.55 + 3.55 + 2.78 s
    assert 0 <= summary["loop_fraction"] <= 1 and summary["length_ratio"] > 0
    assert summary["model"].startswith(f"{kind}:") and summary["language"] == "ko"
    lines = [json.loads(line) for line in (out / "utterances.jsonl").read_text().splitlines()]
    assert [u["id"] for u in lines] == ["ko-greeting", "ko-finetune", "en-fox"]
    assert all(UTTERANCE_KEYS <= set(u) for u in lines)
    assert sum(u["errors"] for u in lines) == pytest.approx(summary["cer"] * sum(u["ref_chars"] for u in lines))
    md = (out / "summary.md").read_text()
    assert "## Worst 10 utterances" in md and "| id | errors | CER | loop | reference | hypothesis |" in md
    assert md.count("\n| ko-") + md.count("\n| en-") == 3


def test_backends_agree(results):
    """Adapter (unmerged), merged and float32 CTranslate2 transcribe identically; the base differs."""
    hyps = {kind: [json.loads(line)["hyp"] for line in (out / "utterances.jsonl").read_text().splitlines()]
            for kind, out in results.items()}
    assert hyps["adapter"] == hyps["merged"] == hyps["ct2"]
    assert hyps["model"] != hyps["adapter"]


def test_bad_rows_are_skipped_with_reasons(tiny_whisper, tmp_path, capsys):
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"not audio")
    manifest = clips_manifest(tmp_path / "m.jsonl", [("good", "ko_greeting.flac", "안녕하세요")])
    with open(manifest, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "bad", "audio": str(broken), "text": "x"}) + "\n")
        fh.write(json.dumps({"id": "gone", "audio": str(tmp_path / "missing.flac"), "text": "x"}) + "\n")
        fh.write("{not json\n")
    out = tmp_path / "out"
    assert main(["eval", "--data", str(manifest), "--model", str(tiny_whisper), "--out", str(out),
                 "--max-new-tokens", TOKENS, "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 1 and summary["skipped"] == 3
    reasons = {row["id"]: row["reason"] for row in summary["skipped_rows"]}
    assert set(reasons) == {"bad", "gone", "line 4"} and "malformed_line" in reasons["line 4"]
    assert "## Skipped (3)" in (out / "summary.md").read_text()
    assert "skipped bad" in capsys.readouterr().err


def test_hypothesis_loops():
    assert hypothesis_loops("감사합니다 감사합니다 감사합니다 감사합니다 감사합니다")
    assert hypothesis_loops("그래서그래서그래서그래서그래서")  # no spaces
    assert not hypothesis_loops("오늘 날씨가 정말 좋네요")
    assert not hypothesis_loops("10000원 입니다", ref="10000원 입니다")  # the reference has it too


def test_default_eval_dir_names():
    from asr_lora.sources import ModelSource

    assert _default_eval_dir(ModelSource("model", "bundled:whisper-base"), "data/demo/dev.jsonl") == \
        Path("eval-whisper-base-dev")
    assert _default_eval_dir(ModelSource("adapter", "runs/demo/best"), "x/test.jsonl") == Path("eval-demo-best-test")
    assert _default_eval_dir(ModelSource("ct2", "exports/kspon-int8"), "eval_clean.jsonl") == \
        Path("eval-kspon-int8-eval_clean")


def test_eval_of_nothing_is_an_error(tiny_whisper, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "gone", "audio": str(ASSETS / "nope.flac"), "text": "x"}) + "\n")
    assert main(["eval", "--data", str(manifest), "--model", str(tiny_whisper), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_evaluate_rows_batches_by_length_and_returns_rows_in_order(tiny_whisper, tmp_path):
    """Rows are batched by length (shortest first) but come back in the given order, each hyp with its
    own reference; an unreadable row in the middle is skipped without shifting the others."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from asr_lora.backends import DecodeOptions, HFTranscriber
    from asr_lora.data.manifest import length_hint
    from asr_lora.evaluate import evaluate_rows
    from asr_lora.settings import ModelSettings
    from asr_lora.trimmed import apply_audio_context

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper)
    apply_audio_context(model, "trimmed")
    tokenizer = WhisperProcessor.from_pretrained(tiny_whisper).tokenizer
    transcriber = HFTranscriber(model, tokenizer, ModelSettings(audio_context="trimmed"),
                                DecodeOptions(max_new_tokens=3, temperatures=(0.0,)))
    seen = []
    decode = transcriber.decode
    transcriber.decode = lambda audios, references=None, on_encoded=None: (  # noqa: E731
        seen.append(list(references)) or decode(audios, references, on_encoded))

    rows = [make_row("long", ASSETS / "ko_finetune.flac", "둘", duration=9.0),
            make_row("missing", tmp_path / "nope.flac", "없음", duration=5.0),
            make_row("short", ASSETS / "ko_greeting.flac", "하나", duration=1.0),
            make_row("mid", ASSETS / "en_fox.flac", "셋", duration=3.0)]
    result = evaluate_rows(transcriber, rows, batch_size=2)
    assert seen == [["하나", "셋"], ["둘"]]  # batches [short, mid], [missing, long]; missing left out
    assert result.ids == ["long", "short", "mid"]
    assert result.refs == ["둘", "하나", "셋"]
    assert [s["id"] for s in result.skipped] == ["missing"]
    assert len(result.hyps) == 3
    alone = evaluate_rows(transcriber, [rows[2]], batch_size=1)
    assert alone.hyps == [result.hyps[1]]  # "short" got its own transcript back
    # without durations, text length orders the batches; segments use end - offset
    assert length_hint(make_row("a", "x", "가나다")) < length_hint(make_row("b", "x", "가나다라마바"))
    assert length_hint(make_row("c", "x", "x", offset=2.0, end=2.5, duration=60.0)) == 0.5


def test_precomputed_suppression_equals_transformers_processors():
    """The decode path's one processor (masks made once) suppresses exactly what transformers' two
    Whisper processors suppress, at the first generated position and after it."""
    import torch
    from transformers.generation.logits_process import (
        SuppressTokensAtBeginLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    from asr_lora.backends import SuppressTokens

    suppress, begin = [1, 2, 7, 50, 99], [3, 99, 120]
    ours = SuppressTokens(suppress, begin)
    ours.set_begin_index(4)
    theirs = [SuppressTokensLogitsProcessor(suppress), SuppressTokensAtBeginLogitsProcessor(begin, begin_index=4)]
    scores = torch.randn(3, 128)
    for length in (4, 5, 9):  # the first generated position, then later ones
        ids = torch.zeros(3, length, dtype=torch.long)
        expected = scores
        for proc in theirs:
            expected = proc(ids, expected)
        got = ours(ids, scores)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        assert torch.equal(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
    assert torch.isinf(ours(torch.zeros(3, 4, dtype=torch.long), scores)[:, 120]).all()
    assert not torch.isinf(ours(torch.zeros(3, 5, dtype=torch.long), scores)[:, 120]).any()


def _whisper_generate(transcriber, audios, prompt: str | None = None, timestamps: bool = False):
    """Reference hypotheses: transformers' Whisper ``generate`` with its own processors (no cache given),
    each text's tokens (timestamps included) and its avg_logprob from ``compute_transition_scores``."""
    import torch

    from asr_lora.nospeech import avg_logprob

    whisper, tokenizer = transcriber.whisper, transcriber.tokenizer
    extra = {"prompt_ids": torch.tensor(transcriber.prompt_ids(prompt, 12))} if prompt else {}
    if timestamps:
        extra.update(return_timestamps=True, force_unique_generate_call=True)
    with torch.no_grad():
        out = whisper.generate(encoder_outputs=transcriber.encode(audios), language="ko", task="transcribe",
                               max_new_tokens=12, return_dict_in_generate=True, output_scores=True, **extra)
    generated = out.sequences[:, out.sequences.shape[1] - len(out.scores):]
    steps = whisper.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    eos, result = whisper.generation_config.eos_token_id, []
    for row, scores in zip(generated.tolist(), steps):
        n = row.index(eos) if eos in row else len(row)
        result.append((row[:n], tokenizer.decode(row[:n], skip_special_tokens=True).strip(),
                       avg_logprob(float(scores[: n + 1].sum()), n)))
    return result


def test_decoding_matches_whisper_generate(bundled_base):
    """The decode path runs transformers' generation loop with its own processors (precomputed
    suppression masks, the no-speech step's cache, log-probs kept as it goes) instead of Whisper's
    ``generate``. On the real base (~90 suppressed tokens) its hypotheses and log-probs are Whisper
    ``generate``'s: plain, with a prompt and with timestamps; and the same without the cache."""
    from asr_lora.backends import DecodeOptions
    from asr_lora.data.manifest import load_row_audio, read_rows
    from asr_lora.sources import ModelSource, load_transcriber

    rows, _ = read_rows(Path(__file__).resolve().parents[1] / "data" / "demo" / "dev.jsonl")
    audios = [load_row_audio(r) for r in rows[:3]]
    for prompt, timestamps in ((None, False), ("지난번 회의 내용", False), (None, True)):
        options = DecodeOptions(language="ko", task="transcribe", max_new_tokens=12, temperatures=(0.0,),
                                prompt=prompt, timestamps=timestamps)
        transcriber = load_transcriber(ModelSource("model", str(bundled_base)), options)
        assert transcriber.whisper.generation_config.suppress_tokens  # the rule under test is in use
        expected = _whisper_generate(transcriber, audios, prompt, timestamps)
        ours = transcriber.decode(audios)
        first_step = transcriber._first_step
        transcriber._first_step = lambda encoded, prompt=None: (first_step(encoded, prompt)[0], None)  # no cache
        fresh = transcriber.decode(audios)
        for got in (ours, fresh):
            assert [h.text for h in got] == [text for _, text, _ in expected]
            assert [h.avg_logprob for h in got] == pytest.approx([lp for _, _, lp in expected], abs=1e-4)
        assert [h.avg_logprob for h in ours] == pytest.approx([h.avg_logprob for h in fresh], abs=1e-5)
        if timestamps:
            begin = transcriber.whisper.generation_config.no_timestamps_token_id + 1
            assert any(t >= begin for ids, _, _ in expected for t in ids)  # timestamps were decoded
            assert all(h.segments for h in ours if h.text)


def test_beam_search_and_sampled_fallback_through_the_generation_loop(tiny_whisper):
    """Beam search returns its length-normalised sequence scores as avg_logprob; a fallback decoding
    samples at its temperature, seeded (the same hypotheses twice), with each sampled token's
    log-probability kept (finite, at most 0) and one per generated token; when every attempt fails the
    thresholds, the more probable one is kept."""
    import math

    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from asr_lora.audio import load_audio
    from asr_lora.backends import SAMPLING_SEED, DecodeOptions, HFTranscriber
    from asr_lora.settings import ModelSettings

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    tokenizer = WhisperProcessor.from_pretrained(tiny_whisper).tokenizer
    audios = [load_audio(ASSETS / "ko_greeting.flac"), load_audio(ASSETS / "en_fox.flac")]
    beams = HFTranscriber(model, tokenizer, ModelSettings(),
                          DecodeOptions(max_new_tokens=5, num_beams=3, temperatures=(0.0,)))
    generated = beams._generate(beams.encode(audios), 5)
    assert generated.token_logprobs is None and len(generated.sequence_scores) == 2
    hyps = beams.decode(audios)
    assert [h.avg_logprob for h in hyps] == pytest.approx(generated.sequence_scores, abs=1e-4)

    # every result is "unsure" (avg_logprob below 0): all fall back to the sampled 0.7, and since that fails
    # too, each clip keeps the more probable of its two attempts
    sampled = HFTranscriber(model, tokenizer, ModelSettings(),
                            DecodeOptions(max_new_tokens=5, temperatures=(0.0, 0.7), logprob_threshold=0.0,
                                          no_speech_threshold=None, compression_ratio_threshold=None))
    greedy = HFTranscriber(model, tokenizer, ModelSettings(),
                           DecodeOptions(max_new_tokens=5, temperatures=(0.0,), no_speech_threshold=None))
    encoded = sampled.encode(audios)
    samples = []
    for _ in range(2):  # seeded as the fallback seeds it: the same samples twice
        with torch.random.fork_rng():
            torch.manual_seed(SAMPLING_SEED)
            samples.append(sampled._hypotheses(encoded, 5, 0.7, [0.0, 0.0]))
    assert [(h.text, h.avg_logprob) for h in samples[0]] == [(h.text, h.avg_logprob) for h in samples[1]]
    assert all(h.temperature == 0.7 and math.isfinite(h.avg_logprob) and h.avg_logprob <= 0 for h in samples[0])
    first, again = sampled.decode(audios), sampled.decode(audios)
    assert [(h.text, h.avg_logprob) for h in first] == [(h.text, h.avg_logprob) for h in again]
    for kept, g, s in zip(first, greedy.decode(audios), samples[0]):
        best = max((g, s), key=lambda h: h.avg_logprob)
        assert (kept.text, kept.temperature) == (best.text, best.temperature)
        assert kept.avg_logprob == pytest.approx(best.avg_logprob, abs=1e-5)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = sampled._generate(sampled.encode(audios), 5, temperature=0.7)
    assert out.token_logprobs.shape == (2, out.sequences.shape[1] - out.prefix_length)
    assert (out.token_logprobs <= 0).all()  # log-probabilities (after a clip's end: its padding's)


def test_language_by_name_or_code_and_a_clear_error_for_an_unknown_one(tiny_whisper):
    """The decode path takes a language as Whisper's generate does, code or English name, and
    refuses one the model has no token for by name instead of failing on a lookup."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from asr_lora.audio import load_audio
    from asr_lora.backends import DecodeOptions, HFTranscriber
    from asr_lora.errors import UserError
    from asr_lora.settings import ModelSettings

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    tokenizer = WhisperProcessor.from_pretrained(tiny_whisper).tokenizer
    audios = [load_audio(ASSETS / "ko_greeting.flac")]

    def transcriber(language):
        return HFTranscriber(model, tokenizer, ModelSettings(),
                             DecodeOptions(language=language, max_new_tokens=3, temperatures=(0.0,)))

    by_name, by_code = transcriber("Korean"), transcriber("ko")
    assert by_name.language == "ko"
    assert by_name.decoder_prefix()[1] == tokenizer.convert_tokens_to_ids("<|ko|>")
    assert [h.text for h in by_name.decode(audios)] == [h.text for h in by_code.decode(audios)]
    with pytest.raises(UserError, match="'xx'.*--language"):
        transcriber("xx").decode(audios)


def test_column_major_decoder_keeps_hypotheses_and_restores_exactly(bundled_base):
    """Decoding with the decoder's weights column-major (the CPU layout of load_transcriber and of
    training's evaluation pass) gives the same hypotheses and log-probs; restoring gives back the very
    same row-major tensors; the encoder's weights are never touched."""
    import torch

    from asr_lora.backends import DecodeOptions, HFTranscriber, column_major_decoder
    from asr_lora.data.manifest import load_row_audio, read_rows
    from asr_lora.model import load_model, load_processor
    from asr_lora.settings import ModelSettings

    rows, _ = read_rows(Path(__file__).resolve().parents[1] / "data" / "demo" / "dev.jsonl")
    audios = [load_row_audio(r) for r in rows[:4]]
    model = load_model(str(bundled_base)).eval()
    options = DecodeOptions(language="ko", task="transcribe", max_new_tokens=12, temperatures=(0.0,))
    transcriber = HFTranscriber(model, load_processor(str(bundled_base)).tokenizer,
                                ModelSettings(audio_context="full"), options)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    row_major = transcriber.decode(audios)
    restore = column_major_decoder(model)
    head = model.proj_out.weight
    assert head.stride() == (1, head.shape[0]) and model.model.decoder.layers[1].fc2.weight.stride()[0] == 1
    assert model.model.encoder.layers[0].fc1.weight.is_contiguous()
    column_major = transcriber.decode(audios)
    restore()
    assert [h.text for h in column_major] == [h.text for h in row_major]
    assert [h.avg_logprob for h in column_major] == pytest.approx([h.avg_logprob for h in row_major], abs=1e-4)
    assert [h.no_speech_prob for h in column_major] == pytest.approx([h.no_speech_prob for h in row_major], abs=1e-5)
    for name, p in model.named_parameters():
        assert p.is_contiguous() and torch.equal(p, before[name]), name
