"""Text normalisation for comparing facts: one definition of "the same text".

Two strings a person reads as the same must compare equal, whatever their Unicode form:
NFC vs NFD, full-width letters, zero-width joiners, non-breaking or doubled spaces and,
where a policy asks for it, letters of another script that look identical (Cyrillic "а"
in "Pаris"). :func:`fold` maps a text to that comparison form; :func:`has_visible` says
whether a text shows anything at all. Both are pure.
"""

from __future__ import annotations

import unicodedata
from types import MappingProxyType

# Letters of the Lo/So categories that render as nothing: Hangul fillers and the braille blank.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")

# Cyrillic and Greek letters that render like a Latin letter (the common part of Unicode's
# confusables.txt for these scripts); used only when a policy folds confusables. Capitals
# first: the table is keyed on casefolded letters (see _confusables_table), and where a
# capital and a small letter of one script fold together the capital's look-alike wins.
_CONFUSABLE_PAIRS = (
    "АA ВB ЕE КK МM НH ОO РP СC ТT ХX УY ІI ЈJ ЅS "
    "ΑA ΒB ΕE ΖZ ΗH ΙI ΚK ΜM ΝN ΟO ΡP ΤT ΥY ΧX "
    "аa еe оo рp сc уy хx іi јj ѕs ԁd һh ԛq ԝw ӏl οo ρp ιi κk"
)


def _confusables_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for pair in _CONFUSABLE_PAIRS.split():
        key, latin = pair[0].casefold(), pair[1].casefold()
        table.setdefault(ord(key), latin)
    return table


_CONFUSABLES = MappingProxyType(_confusables_table())


def is_invisible(char: str) -> bool:
    """True for a character that shows nothing on its own: separators and spaces (Z*),
    control and format characters (C*, zero-width joiners, variation selectors' Mn included
    via M*), combining marks without a base (M*), Hangul fillers, the braille blank."""
    return char in _BLANK_LETTERS or unicodedata.category(char)[0] in "ZCM" or char.isspace()


def has_visible(text: str) -> bool:
    """Whether ``text`` holds at least one character that renders as something."""
    return any(not is_invisible(ch) for ch in text)


def fold(text: str, confusables: bool = False) -> str:
    """The comparison form of ``text``: NFKC, format characters and variation selectors
    removed, every run of whitespace (NBSP, ideographic space, ...) one space, stripped,
    casefolded; with ``confusables`` also Cyrillic/Greek look-alikes mapped to Latin.

    ``fold("Ｐａｒｉｓ") == fold("paris")``; the result is meant for comparison only, never
    for editing (the model gets the text as the user wrote it).
    """
    text = unicodedata.normalize("NFKC", text)
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cf" or "\ufe00" <= ch <= "\ufe0f" or "\U000e0100" <= ch <= "\U000e01ef":
            continue  # zero-width (non-)joiners, bidi marks, variation selectors: no letter of their own
        kept.append(" " if ch.isspace() or cat[0] == "Z" or ch in _BLANK_LETTERS else ch)
    # casefold, then NFKC again (casefolding can produce sequences that compose), then the
    # look-alikes: keyed on casefolded letters, so "КИЕВ" and "киев" fold alike.
    out = unicodedata.normalize("NFKC", " ".join("".join(kept).split()).casefold())
    return out.translate(_CONFUSABLES) if confusables else out


__all__ = ["fold", "has_visible", "is_invisible"]
