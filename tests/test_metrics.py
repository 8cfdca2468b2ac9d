"""Hand-computed checks of asr_lora.metrics (arithmetic in the comments)."""

from __future__ import annotations

import json
import math
import unicodedata

import jiwer
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asr_lora.metrics import Report, repeated_ngram_loop, respace_hypothesis, score


def _edit_distance(a, b) -> int:
    """Test oracle only: textbook Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


# --- single utterances ---------------------------------------------------------------------


def test_identical_is_zero():
    s = score(["안녕하세요 반갑습니다"], ["안녕하세요 반갑습니다"]).summary()
    assert (s["cer"], s["cer_nospace"], s["wer"], s["swer"]) == (0.0, 0.0, 0.0, 0.0)
    # 안녕하세요 (5) + space (1) + 반갑습니다 (5) = 11 chars; 10 without the space; 2 words
    assert (s["char_ref"], s["char_nospace_ref"], s["word_ref"]) == (11, 10, 2)
    assert s["length_ratio"] == 1.0 and s["insertion_rate"] == 0.0


def test_one_syllable_substitution_counts_spaces():
    r = score(["안녕하세요 반갑습니다"], ["안녕하세요 반갑습니까"])  # 다 -> 까
    assert r.cer == pytest.approx(1 / 11)  # 1 sub / 11 chars (the space counts)
    assert r.cer_nospace == pytest.approx(1 / 10)  # 1 sub / 10 chars
    assert r.wer == pytest.approx(1 / 2)  # 반갑습니다 -> 반갑습니까: 1 sub / 2 words
    assert r.swer == pytest.approx(1 / 2)  # spacing already matches: sWER == WER
    assert (r.chars.substitutions, r.chars.deletions, r.chars.insertions) == (1, 0, 0)


def test_spacing_only_difference():
    r = score(["오늘 날씨가 좋다"], ["오늘날씨가 좋다"])
    # words: ref [오늘, 날씨가, 좋다] vs hyp [오늘날씨가, 좋다]
    #   -> 좋다 matches; 오늘+날씨가 vs 오늘날씨가 = 1 sub + 1 del -> 2 / 3
    assert r.wer == pytest.approx(2 / 3)
    assert (r.words.substitutions, r.words.deletions, r.words.insertions) == (1, 1, 0)
    # chars: ref 오늘_날씨가_좋다 = 2+1+3+1+2 = 9; hyp lacks one space -> 1 del / 9
    assert r.cer == pytest.approx(1 / 9)
    assert r.cer_nospace == 0.0  # 오늘날씨가좋다 both sides
    assert r.swer == 0.0  # re-spaced hyp == ref
    assert r.utterances[0]["hyp_respaced"] == "오늘 날씨가 좋다"


def test_swer_equals_wer_when_spacing_matches():
    r = score(["오늘 날씨가 좋다"], ["오늘 날씨개 좋다"])  # 가 -> 개, same spacing
    assert r.wer == pytest.approx(1 / 3)
    assert r.swer == pytest.approx(1 / 3)


def test_swer_still_counts_a_real_substitution_under_a_spacing_error():
    r = score(["오늘 날씨가 좋다"], ["오늘날씨개좋다"])
    # WER: ref 3 words vs hyp 1 word [오늘날씨개좋다] -> 1 sub + 2 del = 3 / 3
    assert r.wer == pytest.approx(1.0)
    # re-spaced: 오늘 날씨 copy ref spacing, 개 is a substitution (keeps its own: no space
    # before it, same as 가 in ref), 좋 matched -> gets the ref space: "오늘 날씨개 좋다"
    assert r.utterances[0]["hyp_respaced"] == "오늘 날씨개 좋다"
    assert r.swer == pytest.approx(1 / 3)  # only 날씨가 -> 날씨개
    assert r.cer_nospace == pytest.approx(1 / 7)  # 1 sub / 7 syllables


def test_respace_rule_for_insertions_and_substitutions():
    # ref "가나 다" vs hyp "가 나x다": 가,나,다 matched (copy ref boundaries: none, none,
    # start), x inserted (keeps hyp's boundary: none) -> "가나x 다"
    assert respace_hypothesis("가나 다", "가 나x다") == "가나x 다"
    # a substituted word-initial char keeps the hypothesis' boundary (ESPnet1 rule):
    # ref "가 나" vs hyp "가마" -> 마 substitutes 나 and had no space before it -> "가마"
    assert respace_hypothesis("가 나", "가마") == "가마"
    assert respace_hypothesis("가 나", "가 마") == "가 마"
    # empty sides are returned untouched
    assert respace_hypothesis("", "가 나") == "가 나"
    assert respace_hypothesis("가 나", "") == ""


def test_punctuation_and_case_are_ignored():
    r = score(["안녕하세요, 반갑습니다!"], ["안녕하세요 반갑습니다."])
    assert (r.cer, r.wer, r.swer) == (0.0, 0.0, 0.0)
    r = score(["Hello, World"], ["hello world"])
    assert (r.cer, r.wer) == (0.0, 0.0)


def test_hangul_syllables_are_not_split_into_jamo():
    r = score(["한"], ["함"])
    assert r.chars.ref == 1
    assert r.cer == 1.0  # one syllable substituted out of one
    # What NFD/NFKD scoring would have reported: 한 = ᄒ+ᅡ+ᆫ, 함 = ᄒ+ᅡ+ᆷ -> 1 sub / 3 jamo
    nfd = jiwer.cer(unicodedata.normalize("NFD", "한"), unicodedata.normalize("NFD", "함"))
    assert nfd == pytest.approx(1 / 3)
    assert r.cer != pytest.approx(nfd)
    # decomposed input is recomposed by NFKC before scoring
    r = score([unicodedata.normalize("NFD", "한")], [unicodedata.normalize("NFD", "함")])
    assert (r.chars.ref, r.cer) == (1, 1.0)


def test_compatibility_characters_fold_under_nfkc():
    assert score(["ＡＢＣ"], ["abc"]).cer == 0.0  # full-width -> ASCII, then lower-cased
    # compatibility jamo (U+314B) and conjoining jamo (U+110F) are the same after NFKC
    assert score(["ㅋㅋ"], ["\u110f\u110f"]).cer == 0.0
    assert score(["①"], ["1"]).cer == 0.0


# --- corpus level ------------------------------------------------------------------------


def test_corpus_rate_is_total_edits_over_total_reference():
    r = score(["가나다", "라마바사아자차카타파"], ["가나라", "라마바사아자차카타파"])
    # 1 sub in 3 chars + 0 in 10 chars -> 1 / 13 (a mean of rates would be (1/3 + 0) / 2)
    assert r.cer == pytest.approx(1 / 13)
    assert r.cer != pytest.approx((1 / 3 + 0) / 2)
    assert r.n == 2
    assert [u["cer"] for u in r.utterances] == [pytest.approx(1 / 3), 0.0]
    assert [u["id"] for u in r.utterances] == ["0", "1"]


def test_insertion_rate_and_length_ratio():
    r = score(["가나다"], ["가나다라마"])  # 2 inserted chars on 3 reference chars
    assert r.insertion_rate == pytest.approx(2 / 3)
    assert r.length_ratio == pytest.approx(5 / 3)
    assert r.cer == pytest.approx(2 / 3)


def test_ids_and_raw_text_are_kept():
    r = score(["가나!"], ["가 나"], ids=["utt-a"])
    u = r.utterances[0]
    assert (u["id"], u["ref"], u["ref_raw"], u["hyp"], u["hyp_raw"]) == (
        "utt-a", "가나", "가나!", "가 나", "가 나")


# --- empty references / hypotheses -------------------------------------------------------


def test_both_empty_is_zero():
    r = score([""], ["  ...  "])  # hyp normalises to ""
    assert (r.cer, r.cer_nospace, r.wer, r.swer) == (0.0, 0.0, 0.0, 0.0)
    assert r.n_empty_ref == 1 and r.length_ratio == 1.0


def test_empty_reference_with_output_is_infinite():
    r = score(["?!"], ["가 나"])  # ref normalises to ""
    assert r.chars.insertions == 3 and r.words.insertions == 2
    assert math.isinf(r.cer) and math.isinf(r.wer) and math.isinf(r.swer)
    assert math.isinf(r.utterances[0]["cer"])


def test_empty_reference_insertions_count_in_the_corpus():
    r = score(["가나", ""], ["가나", "다"])
    # (0 + 1 inserted) / (2 + 0 reference chars) = 1 / 2
    assert r.cer == pytest.approx(1 / 2)
    assert r.n_empty_ref == 1


def test_empty_hypothesis_is_all_deletions():
    r = score(["가나 다"], [""])
    assert (r.chars.deletions, r.words.deletions) == (4, 2)
    assert (r.cer, r.wer, r.swer) == (1.0, 1.0, 1.0)
    assert r.length_ratio == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        score(["가"], ["가", "나"])
    with pytest.raises(ValueError):
        score(["가"], ["가"], ids=["a", "b"])
    with pytest.raises(ValueError):
        score([], [])
    with pytest.raises(TypeError):
        score("가나", "가나")


def test_summary_is_flat_and_json_ready():
    s = score(["가나 다"], ["가나다"]).summary()
    for key in ("n", "cer", "cer_nospace", "wer", "swer", "insertion_rate", "length_ratio"):
        assert key in s
    assert all(isinstance(v, (int, float)) for v in s.values())
    assert json.loads(json.dumps(s)) == s


# --- repeated n-gram loops ---------------------------------------------------------------


def test_repeated_ngram_loop():
    assert repeated_ngram_loop("감사합니다 감사합니다 감사합니다 감사합니다")  # 1-gram x4
    assert not repeated_ngram_loop("감사합니다 감사합니다 감사합니다")  # only x3
    assert repeated_ngram_loop("감사합니다 감사합니다 감사합니다", min_repeats=3)
    assert repeated_ngram_loop("네 알겠습니다. 네 알겠습니다. 네 알겠습니다. 네 알겠습니다.")  # 2-gram
    assert not repeated_ngram_loop("네 알겠습니다 네 알겠습니다 네 알겠습니다 네 알겠습니다", n=1)
    assert not repeated_ngram_loop("오늘 날씨가 좋다 내일 날씨도 좋다")
    # written without spaces: one word, so only the char level sees the loop (5 chars x4)
    looped = "감사합니다" * 4
    assert not repeated_ngram_loop(looped, unit="word")
    assert repeated_ngram_loop(looped, n=5, unit="char")
    assert not repeated_ngram_loop(looped, n=4, unit="char")  # the period is 5 chars
    assert not repeated_ngram_loop("", unit="char")
    with pytest.raises(ValueError):
        repeated_ngram_loop("가", unit="jamo")


# --- properties --------------------------------------------------------------------------

_text = st.text(alphabet="가나다 ", max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_text, _text), min_size=1, max_size=4))
def test_counts_match_edit_distance_and_sum_over_utterances(pairs):
    refs, hyps = [p[0] for p in pairs], [p[1] for p in pairs]
    r: Report = score(refs, hyps)
    total_chars = total_words = 0
    for u in r.utterances:
        assert u["char_errors"] == _edit_distance(u["ref"], u["hyp"])
        assert u["word_errors"] == _edit_distance(u["ref"].split(), u["hyp"].split())
        total_chars += u["char_errors"]
        total_words += u["word_errors"]
    assert r.chars.errors == total_chars and r.words.errors == total_words


@settings(max_examples=200, deadline=None)
@given(_text, _text)
def test_swer_is_zero_exactly_when_cer_nospace_is(ref, hyp):
    r = score([ref], [hyp])
    u = r.utterances[0]
    assert u["hyp_respaced"].replace(" ", "") == u["hyp"].replace(" ", "")  # only spaces move
    assert (r.swer == 0.0) == (r.cer_nospace == 0.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["가", "나다", "라마바"]), min_size=1, max_size=6),
       st.lists(st.booleans(), min_size=6, max_size=6))
def test_spacing_only_changes_never_count_in_swer(words, joins):
    ref = " ".join(words)
    hyp = words[0] + "".join(("" if j else " ") + w for j, w in zip(joins, words[1:]))
    r = score([ref], [hyp])
    assert r.swer == 0.0 and r.cer_nospace == 0.0
