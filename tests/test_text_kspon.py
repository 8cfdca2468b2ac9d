"""KsponSpeech (ETRI v1.0) transcript rules: one test per rule, both sides, and a fuzz test."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asr_lora.text import (
    clean_kspon_transcript,
    is_noise_only,
    pick_kspon_side,
    strip_filler_slashes,
    strip_noise_tags,
    strip_stray_symbols,
    strip_word_markers,
)


@pytest.mark.parametrize(
    "raw, spelling, phonetic",
    [
        # dual transcription (spelling)/(pronunciation)
        ("(3시)/(세 시)에 만나", "3시에 만나", "세 시에 만나"),
        ("(70%)/(칠십 퍼센트) 정도", "70% 정도", "칠십 퍼센트 정도"),
        ("(SNS)/(에스엔에스)에 올렸어", "SNS에 올렸어", "에스엔에스에 올렸어"),
        ("(1/2)/(이분의 일)만", "1/2만", "이분의 일만"),
        ("(2)/(두) 개 (3)/(세) 개", "2 개 3 개", "두 개 세 개"),
        ("(3시) / (세 시)", "3시", "세 시"),
        ("((70%)/(칠십 퍼센트))/(칠십 퍼센트)", "70%", "칠십 퍼센트"),
        ("(아/)/(아) 그래", "아 그래", "아 그래"),
        # unbalanced or lone brackets: remove the bracket, keep the text
        ("(3시/(세 시) 쯤", "3시 세 시 쯤", "3시 세 시 쯤"),
        ("3시)/(세 시 쯤", "3시 세 시 쯤", "3시 세 시 쯤"),
        ("(그래서) 갔어", "그래서 갔어", "그래서 갔어"),
        ("갔어 (", "갔어", "갔어"),
        # noise tags: only the tag goes
        ("b/ 그래서 n/", "그래서", "그래서"),
        ("l/ 진짜? l/", "진짜?", "진짜?"),
        ("o/ 나도 그렇게 생각해", "나도 그렇게 생각해", "나도 그렇게 생각해"),
        ("u/ 뭐라고 o/그래", "뭐라고 그래", "뭐라고 그래"),
        ("n/(3시)/(세 시)", "3시", "세 시"),
        # filler slash: the word stays
        ("어/ 음/ 그/ 그게", "어 음 그 그게", "어 음 그 그게"),
        ("어/그래서", "어 그래서", "어 그래서"),
        ("음/.", "음.", "음."),
        # markers * + #
        ("그+ 그+ 그러니까", "그 그 그러니까", "그 그 그러니까"),
        ("저기* 있잖아", "저기 있잖아", "저기 있잖아"),
        ("뭐# 했는데", "뭐 했는데", "뭐 했는데"),
        # % is text, punctuation stays, whitespace collapses
        ("100 % 확실해", "100 % 확실해", "100 % 확실해"),
        ("  아  \t 그래 ,  \n 맞아 ", "아 그래 , 맞아", "아 그래 , 맞아"),
        # every rule at once
        (
            "b/ 어/ (3시)/(세 시)에 그+ 그 사람* o/ 만났어# (70%)/(칠십 퍼센트) n/",
            "어 3시에 그 그 사람 만났어 70%",
            "어 세 시에 그 그 사람 만났어 칠십 퍼센트",
        ),
    ],
)
def test_clean_kspon_transcript(raw, spelling, phonetic):
    assert clean_kspon_transcript(raw) == spelling
    assert clean_kspon_transcript(raw, side="spelling") == spelling
    assert clean_kspon_transcript(raw, side="phonetic") == phonetic


def test_noise_only_utterances_clean_to_nothing():
    assert clean_kspon_transcript("b/ n/") == ""
    assert clean_kspon_transcript("l/ o/ u/") == ""
    assert is_noise_only("")
    assert is_noise_only(clean_kspon_transcript("l/ ."))
    assert not is_noise_only("3시")
    assert not is_noise_only("어")


def test_steps():
    assert pick_kspon_side("(3시)/(세 시)에") == "3시에"
    assert pick_kspon_side("(3시)/(세 시)에", "phonetic") == "세 시에"
    assert pick_kspon_side("(그래서) 갔어") == "(그래서) 갔어"  # not a pair: left as is
    assert strip_noise_tags("b/ 어/ 그래").split() == ["어/", "그래"]
    assert strip_noise_tags("sub/ 어") == "sub/ 어"  # a word ending in b is a filler, not a tag
    assert strip_word_markers("그+ 저기* 뭐#") == "그 저기 뭐"
    assert strip_filler_slashes("어/ 음/그 1/2") == "어 음 그 1/2"
    assert strip_stray_symbols("(3시/(세 시") == "3시/세 시"


def test_unknown_side_is_an_error():
    with pytest.raises(ValueError, match="phonetic"):
        clean_kspon_transcript("(3시)/(세 시)", side="pronunciation")


_MARKUP = st.sampled_from(["(", ")", "/", ")/(", "b/", "l/", "o/", "n/", "u/", "*", "+", "#", "%", " "])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.one_of(st.text(max_size=8), _MARKUP), max_size=20),
       side=st.sampled_from(["spelling", "phonetic"]))
def test_any_text_cleans_without_error(parts, side):
    cleaned = clean_kspon_transcript("".join(parts), side)
    assert isinstance(cleaned, str)
    assert "(" not in cleaned and ")" not in cleaned
    assert not re.search(r"[blonu]/", cleaned)
    assert not re.search(r"[*+#]", cleaned)
    assert cleaned == cleaned.strip() and "  " not in cleaned
