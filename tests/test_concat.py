"""Multi-utterance training inputs (data.concat_*): which rows join, their audio, their labels."""

from __future__ import annotations

import numpy as np
import pytest

from asr_lora.audio import SAMPLE_RATE
from asr_lora.config import ConfigError, load_recipe
from asr_lora.data.concat import Concatenation, JoinedRow, group_rows, join_audio, trained_on
from asr_lora.data.manifest import read_rows

from .conftest import DEMO, make_row


def demo_train(n: int | None = None):
    rows = read_rows(DEMO / "train.jsonl")[0]
    return rows[:n] if n else rows


def test_draws_are_fixed_by_seed_epoch_and_row_and_respect_the_limits():
    rows = demo_train(60)
    one, two = Concatenation(rows, 0.5, 12.0, seed=3), Concatenation(rows, 0.5, 12.0, seed=3)
    epoch0 = [one.parts(0, i) for i in range(len(rows))]
    assert epoch0 == [two.parts(0, i) for i in reversed(range(len(rows)))][::-1]  # order of asking: no effect
    assert epoch0 != [one.parts(1, i) for i in range(len(rows))]  # another epoch, other inputs
    assert epoch0 != [Concatenation(rows, 0.5, 12.0, seed=4).parts(0, i) for i in range(len(rows))]
    joined = [(i, p) for i, p in enumerate(epoch0) if len(p[0]) > 1]
    assert 0.3 * len(rows) < len(joined) < 0.7 * len(rows)  # about the probability
    durations = one.epoch_durations(0)
    for i, (indices, pauses) in joined:
        assert indices[0] == i and len(set(indices)) == len(indices) and len(pauses) == len(indices) - 1
        assert all(0.2 <= p <= 1.0 for p in pauses)
        assert durations[i] == pytest.approx(sum(rows[j].duration for j in indices) + sum(pauses))
        assert durations[i] <= 12.0
    assert all(durations[i] == rows[i].duration for i, p in enumerate(epoch0) if len(p[0]) == 1)
    assert all(Concatenation(rows, 0.0, 12.0).parts(0, i) == ([i], []) for i in range(len(rows)))


def test_sessions_join_their_next_utterances_and_nonspeech_rows_never_join(tmp_path):
    audio = str(DEMO / "audio" / "train" / "demo-train-0001.flac")
    rows = [make_row(f"s{k}", audio, f"문장 {k}", duration=2.0, extra={"session": "a" if k % 2 else "b"})
            for k in range(8)]
    rows += [make_row("noise", audio, "", duration=2.0, extra={"nonspeech": True})]
    concat = Concatenation(rows, 1.0, 30.0, seed=0)
    for i in range(8):
        indices, _ = concat.parts(0, i)
        same = [j for j in range(i, 8) if j % 2 == i % 2]
        assert indices == same[:len(indices)] and len(indices) >= min(2, len(same))  # in manifest order
    assert concat.parts(0, 8) == ([8], [])
    plain = [make_row(f"p{k}", audio, f"문장 {k}", duration=2.0) for k in range(6)] + rows[-1:]
    concat = Concatenation(plain, 1.0, 30.0, seed=0)
    assert all(6 not in concat.parts(e, i)[0] for e in range(3) for i in range(6))


def test_joined_audio_and_labels_one_timestamp_pair_per_utterance(tiny_whisper):
    from transformers import WhisperTokenizer

    from asr_lora.data.collator import WhisperCollator

    a, b = demo_train(2)
    row = JoinedRow((a, b), (0.5,))
    audio, spans = join_audio(row)
    assert len(audio) / SAMPLE_RATE == pytest.approx(a.duration + 0.5 + b.duration, abs=0.01)
    assert spans[0][0] == 0.0 and spans[1][0] == pytest.approx(a.duration + 0.5, abs=0.01)
    start = int(spans[0][1] * SAMPLE_RATE)
    assert not np.any(audio[start:start + int(0.5 * SAMPLE_RATE)])  # the pause is silence
    tokenizer = WhisperTokenizer.from_pretrained(tiny_whisper)
    collator = WhisperCollator(tokenizer, padding="longest", timestamp_probability=1.0)
    batch = collator([row], [(0, 0)])
    text = tokenizer.decode([t for t in batch["labels"][0].tolist() if t >= 0], decode_with_timestamps=True)
    end_a, start_b, end_b = (f"<|{x:.2f}|>" for x in (round(spans[0][1] / 0.02) * 0.02,
                                                        round(spans[1][0] / 0.02) * 0.02,
                                                        round(spans[1][1] / 0.02) * 0.02))
    assert text == f"<|ko|><|transcribe|><|0.00|>{a.text}{end_a}{start_b}{b.text}{end_b}<|endoftext|>"
    plain = WhisperCollator(tokenizer, padding="longest")([row], [(0, 0)])
    assert tokenizer.decode(plain["labels"][0][plain["labels"][0] >= 0]) == \
        f"<|ko|><|transcribe|><|notimestamps|>{a.text} {b.text}<|endoftext|>"
    assert batch["n_frames"][0] == plain["n_frames"][0] > round(a.duration * 100)


def test_speed_perturbation_moves_every_timestamp_alike(tiny_whisper):
    from transformers import WhisperTokenizer

    from asr_lora.data.augment import WaveAugment
    from asr_lora.data.collator import WhisperCollator

    a, b = demo_train(2)
    row = JoinedRow((a, b), (0.8,))
    tokenizer = WhisperTokenizer.from_pretrained(tiny_whisper)
    begin = tokenizer.convert_tokens_to_ids("<|0.00|>")
    times = []
    for augment in (None, WaveAugment(seed=0, speed_prob=1.0, speeds=(0.8, 0.8))):
        batch = WhisperCollator(tokenizer, padding="longest", timestamp_probability=1.0, augment=augment)([row], [(0, 0)])
        times.append([(t - begin) * 0.02 for t in batch["labels"][0].tolist() if t >= begin])
    assert len(times[0]) == len(times[1]) == 4
    assert times[1][1:] == pytest.approx([t / 0.8 for t in times[0][1:]], abs=0.03)


def test_config_validates_the_concat_keys():
    assert load_recipe(None, ["data.concat_probability=0.3"]).data.concat_max_seconds == 30.0
    for bad in (["data.concat_probability=1.5"], ["data.concat_max_seconds=31"], ["data.concat_pause=[1.0, 0.5]"]):
        with pytest.raises(ConfigError, match="concat"):
            load_recipe(None, bad)
    with pytest.raises(ConfigError, match="concat_max_seconds"):  # slowed down past Whisper's window
        load_recipe(None, ["data.concat_probability=0.3", "augment.speed_prob=0.5", "augment.speeds=[0.9, 1.1]"])
    assert load_recipe(None, ["data.concat_probability=0.3", "data.concat_max_seconds=27", "augment.speed_prob=0.5",
                              "augment.speeds=[0.9, 1.1]"]).data.concat_max_seconds == 27
    with pytest.raises(ConfigError, match="longform_rows"):
        load_recipe(None, ["train.select_best=longform"])


def test_trained_on_records_the_input_range_and_speaking_rate():
    rows = demo_train()
    plain = trained_on(rows, None)
    assert plain.min_seconds == min(r.duration for r in rows) and plain.max_seconds == max(r.duration for r in rows)
    rates = [len(r.text.replace(" ", "")) / r.duration for r in rows]
    assert plain.chars_per_second == pytest.approx(np.median(rates))
    assert plain.chars_per_second_low == pytest.approx(np.percentile(rates, 5))
    assert plain.chars_per_second_low < plain.chars_per_second
    assert plain.max_utterances == 1  # single utterances: transcription gives it one speech span a piece
    joined = trained_on(rows, Concatenation(rows, 0.3, 25.0))
    assert joined.max_seconds == 25.0 and joined.max_utterances > 1


def test_group_rows_makes_consecutive_inputs_within_the_range():
    rows = demo_train(40)
    groups = group_rows(rows, 20.0, 30.0, 0.5)
    assert [r for g in groups for r in g] == rows
    lengths = [sum(r.duration for r in g) + 0.5 * (len(g) - 1) for g in groups]
    assert all(20.0 <= s <= 30.0 for s in lengths[:-1]) and lengths[-1] <= 30.0
