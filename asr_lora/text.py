"""Korean text: the one scoring normaliser, and KsponSpeech (ETRI v1.0) transcript rules.

The normaliser is NFKC-based on purpose: NFKD/NFD decomposes every Hangul syllable into
jamo (``"한" -> "ᄒ ᅡ ᆫ"``), which silently inflates character error rates.
"""

from __future__ import annotations

import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def _is_punctuation_or_symbol(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat[0] in ("P", "S")


def normalize(text: str) -> str:
    """Scoring normaliser used everywhere in asr-lora (metrics, eval, training CER).

    NFKC (never NFKD), lower-case, punctuation and symbols replaced by a space,
    whitespace collapsed and stripped. Hangul syllables are left composed.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if _is_punctuation_or_symbol(ch) else ch for ch in text)
    return _WHITESPACE.sub(" ", text).strip()


# --- KsponSpeech transcripts (ETRI transcription rules v1.0) ----------------------------------
#
# A raw KsponSpeech line is cleaned into plain text in this order (each step a function below):
#
#   (A)/(B)            dual transcription, A = spelling, B = pronunciation: keep one side
#                      ("(3시)/(세 시)" -> "3시" | "세 시"); nested pairs resolve innermost
#                      first.
#   b/ l/ o/ n/ u/     noise tags (breath, laugh, other speaker, noise, unintelligible) are
#                      removed; only the tag goes, so the words after "o/" stay.
#   *  +  #            uncertain-word, repetition and hard-to-hear markers: the mark goes, the
#                      word stays ("그+ 그+ 그러니까" -> "그 그 그러니까").
#   %                  kept: it is real text ("70%"); the pronunciation side spells it out.
#   stray brackets     "(" and ")" that are not part of a dual transcription, balanced or not,
#                      are removed and the text is kept: "(3시/(세 시)" -> "3시 세 시".
#   word/              filler slash ("어/", "음/"): the word stays, the slash goes. Any other
#                      "/" left over goes too (a space where it joined two words: "어/그래" ->
#                      "어 그래"), except between two digits ("1/2" stays a fraction).
#   punctuation        other punctuation (. , ? !) is kept.
#   whitespace         collapsed to single spaces and stripped.
#
# What is left with no letter or digit (e.g. "b/ n/", "l/ .") is noise-only: `is_noise_only`.
# The cleaner never raises on any str: odd, nested or unbalanced markup degrades to
# "remove the markup characters, keep the text".

KSPON_SIDES = ("spelling", "phonetic")

_DUAL_PAIR = re.compile(r"\(([^()]*)\)\s*/\s*\(([^()]*)\)")
_NOISE_TAG = re.compile(r"(?<!\w)[blonu]/")
_MARKERS = re.compile(r"[*+#]")
_SLASH = re.compile("/")


def pick_kspon_side(text: str, side: str = "spelling") -> str:
    """Resolve every ``(spelling)/(pronunciation)`` pair to one side.

    Pairs are replaced innermost first until none is left, so ``((70%)/(칠십 퍼센트))/(칠십
    퍼센트)`` resolves too. Brackets that are not part of a pair are left for
    :func:`strip_stray_symbols`.
    """
    if side not in KSPON_SIDES:
        raise ValueError(f"side must be one of {KSPON_SIDES}, got {side!r}")
    group = 1 if side == "spelling" else 2
    while True:
        resolved = _DUAL_PAIR.sub(lambda m: m.group(group), text)
        if resolved == text:
            return text
        text = resolved


def strip_noise_tags(text: str) -> str:
    """Remove ``b/ l/ o/ n/ u/`` tags that start a word; the speech around them stays."""
    return _NOISE_TAG.sub(" ", text)


def strip_word_markers(text: str) -> str:
    """Remove the ``*`` (uncertain), ``+`` (repetition) and ``#`` (hard to hear) marks."""
    return _MARKERS.sub("", text)


def strip_stray_symbols(text: str) -> str:
    """Remove brackets left after pair resolution (unbalanced or single groups), keep the text."""
    return text.replace("(", "").replace(")", "")


def _replace_slash(match: re.Match) -> str:
    before = match.string[match.start() - 1 : match.start()]
    after = match.string[match.end() : match.end() + 1]
    if before.isdecimal() and after.isdecimal():
        return "/"
    return " " if before.isalnum() and after.isalnum() else ""


def strip_filler_slashes(text: str) -> str:
    """``어/`` -> ``어``: drop slashes after words; a slash joining two words becomes a space.

    A slash between two digits (``1/2``) is real text and is kept.
    """
    return _SLASH.sub(_replace_slash, text)


def clean_kspon_transcript(raw: str, side: str = "spelling") -> str:
    """One raw KsponSpeech transcript -> plain text, following the rules listed above.

    ``side`` picks the spelling (``"3시"``) or pronunciation (``"세 시"``) side of dual
    transcriptions. Returns ``""`` for an utterance that holds only noise tags.
    """
    text = pick_kspon_side(raw, side)
    text = strip_noise_tags(text)
    text = strip_word_markers(text)
    text = strip_stray_symbols(text)
    text = strip_filler_slashes(text)
    return _WHITESPACE.sub(" ", text).strip()


def is_noise_only(text: str) -> bool:
    """True when a cleaned transcript holds no letter or digit (empty, or punctuation only)."""
    return not any(ch.isalnum() for ch in text)
