"""Parsers never crash: property-based tests (hypothesis) of the text normaliser, the KsponSpeech
transcript cleaner and the manifest reader.

Examples are derandomised (the same on every run, so CI is stable, and no example database is
written) and capped at 200 per property. Inputs that once crashed the code are pinned with
``@example``. (``test_text_kspon.py`` has a further randomised property of the transcript cleaner.)
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asr_lora.data.manifest import REASONS, BadRow, ManifestRow, read_manifest
from asr_lora.errors import UserError
from asr_lora.text import KSPON_SIDES, clean_kspon_transcript, is_noise_only, normalize

PROPERTY = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3
# every Hangul code point that is not a precomposed syllable: conjoining jamo (and extensions A/B),
# compatibility jamo, halfwidth jamo; plus the enclosed/parenthesised Hangul that NFKC maps to jamo
HANGUL_RANGES = ((0x1100, 0x11FF), (0xA960, 0xA97F), (0xD7B0, 0xD7FF), (0x3130, 0x318F), (0xFFA0, 0xFFDC),
                 (HANGUL_FIRST, HANGUL_LAST))


def is_syllable(ch: str) -> bool:
    return HANGUL_FIRST <= ord(ch) <= HANGUL_LAST


def is_conjoining_jamo(ch: str) -> bool:
    return 0x1100 <= ord(ch) <= 0x11FF


def touches_hangul(ch: str) -> bool:
    """Whether ``ch`` or its NFKC form holds any Hangul code point (syllable or jamo)."""
    return any(lo <= ord(c) <= hi for c in ch + unicodedata.normalize("NFKC", ch) for lo, hi in HANGUL_RANGES)


syllables = st.integers(HANGUL_FIRST, HANGUL_LAST).map(chr)
non_hangul = st.characters(codec="utf-8").filter(lambda c: not touches_hangul(c))
# Hangul syllables mixed with anything that is not Hangul: digits, Latin, punctuation, spaces, emoji,
# combining marks, full-width forms...
syllable_text = st.lists(st.one_of(syllables, syllables, non_hangul), max_size=40).map("".join)
any_text = st.text(st.characters(codec="utf-8"), max_size=60)  # every code point but lone surrogates
# transcripts built from KsponSpeech's notation, so the markup rules get exercised, not just bypassed
KSPON_PIECES = ["(", ")", "/", ")/(", " ", "b/", "l/", "o/", "n/", "u/", "*", "+", "#", "%", "어/", "3시",
                "세 시", "1/2", "70%", "칠십 퍼센트", "그", "뭐", "a", ".", "?", "\t", "\n"]
kspon_text = st.lists(st.one_of(st.sampled_from(KSPON_PIECES), syllables, st.characters(codec="utf-8")),
                      max_size=30).map("".join)


# --------------------------------------------------------------------------- normalize


@PROPERTY
@given(any_text)
@example("İ")  # lower() turns it into i + a combining dot
@example("ﷺ")  # NFKC expands it into several words
@example("ㄱㅏ")  # compatibility jamo compose into a syllable under NFKC
def test_normalize_never_raises_and_is_idempotent(text):
    once = normalize(text)
    assert isinstance(once, str)
    assert normalize(once) == once
    assert once == once.strip() and "  " not in once


@PROPERTY
@given(syllable_text)
def test_normalize_keeps_hangul_syllables_composed(text):
    text = unicodedata.normalize("NFC", text)
    out = normalize(text)
    assert [c for c in out if is_syllable(c)] == [c for c in text if is_syllable(c)]
    assert not any(is_conjoining_jamo(c) for c in out)


def test_normalize_keeps_every_hangul_syllable():
    every = "".join(chr(cp) for cp in range(HANGUL_FIRST, HANGUL_LAST + 1))
    assert normalize(every) == every  # 11,172 syllables, none decomposed into jamo


# --------------------------------------------------------------------------- KsponSpeech transcripts


@PROPERTY
@given(st.one_of(kspon_text, any_text), st.sampled_from(KSPON_SIDES))
@example("((70%)/(칠십 퍼센트))/(칠십 퍼센트)", "phonetic")
@example("(3시/(세 시)", "spelling")
@example("(" * 50 + ")/(" * 50, "spelling")
def test_clean_kspon_transcript_never_raises(raw, side):
    out = clean_kspon_transcript(raw, side)
    assert isinstance(out, str)
    assert out == out.strip() and "  " not in out
    # markup never survives: brackets and the *, +, # marks are always removed
    assert not set(out) & set("()*+#")
    # a slash survives only between two digits (a fraction)
    for i, ch in enumerate(out):
        if ch == "/":
            assert 0 < i < len(out) - 1 and out[i - 1].isdecimal() and out[i + 1].isdecimal(), out
    assert isinstance(is_noise_only(out), bool)


@PROPERTY
@given(kspon_text)
def test_both_sides_of_a_dual_transcription(text):
    spelling, phonetic = (clean_kspon_transcript(f"({text})/(x{text})", side) for side in KSPON_SIDES)
    assert isinstance(spelling, str) and isinstance(phonetic, str)


def test_clean_kspon_rejects_unknown_side():
    with pytest.raises(ValueError, match="side"):
        clean_kspon_transcript("x", "both")


# --------------------------------------------------------------------------- manifest reader

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=10)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
KEYS = ["audio", "text", "id", "duration", "offset", "end", "language", "file_name", "sentence", "x"]
records = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)
json_lines = records.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8"))
PIECES = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\\ud800", b"\\udc00", b"\xef\xbb\xbf", b"\r", b"\t",
          b" ", b"\x00", b"\xff", b"\xed\xa0\x80", b"1e999", b"NaN", b'"audio"', b'"text"', b"-", b"9" * 400]
line_bytes = st.one_of(json_lines, st.binary(max_size=60),
                       st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join))
file_bytes = st.lists(line_bytes, max_size=8).map(b"\n".join)


def non_blank_lines(data: bytes) -> list[int]:
    """1-based numbers of the lines the reader must answer for (it splits on b"\\n" only)."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines = lines[:-1]
    if lines:
        lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")
    return [i for i, line in enumerate(lines, start=1) if line.strip()]


@PROPERTY
@given(file_bytes)
@example(b'{"audio": "a.wav", "text": "x"}\n' + b"[" * 100_000)  # RecursionError in json
@example(b'{"audio": "a.wav", "text": "x", "duration": ' + b"1" * 5000 + b"}")  # int digit limit
@example(b'{"audio": "a.wav", "text": "x", "duration": ' + b"1" * 400 + b"}")  # OverflowError in float()
@example(b'{"audio": "a\\ud800.wav", "text": "x"}')  # lone surrogate: fails later as a file name
@example(b'\xef\xbb\xbf \n[1, 2]')  # an array on line 2 is a bad line, not a whole-file error
def test_read_manifest_answers_every_line(tmp_path, data):
    path = tmp_path / "m.jsonl"
    path.write_bytes(data)
    try:
        rows = list(read_manifest(path))
    except UserError:
        # the one whole-file problem the reader refuses outright: a JSON array instead of JSON Lines
        assert data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
        return
    assert [r.line for r in rows] == non_blank_lines(data)
    for r in rows:
        assert isinstance(r, (ManifestRow, BadRow))
        if isinstance(r, BadRow):
            assert r.reason in REASONS
        else:
            assert isinstance(r.audio, str) and isinstance(r.text, str)
            for value in (r.audio, r.text, r.id, r.language):
                if value is not None:
                    value.encode("utf-8")  # valid Unicode: usable as a file name and writable
            for value in (r.duration, r.offset, r.end):
                assert value is None or value == value and abs(value) != float("inf")


def test_read_manifest_whole_file_problems(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_manifest(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="not a file"):
        read_manifest(tmp_path)
    (tmp_path / "array.jsonl").write_text('[{"audio": "a.wav", "text": "x"}]')
    with pytest.raises(UserError, match="JSON array"):
        read_manifest(tmp_path / "array.jsonl")
