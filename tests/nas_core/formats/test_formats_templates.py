"""Templates rebuilt from filled prompts (the EasyEdit CounterFact and zsRE layouts)."""

from __future__ import annotations

import pytest

from nas_core.formats.templates import template_from_filled


@pytest.mark.parametrize(
    ("filled", "subject", "expected"),
    [
        ("Rome is the capital of Italy", "Rome", ("{} is the capital of Italy", "Rome")),
        # whole-word match preferred over an earlier match inside a longer word
        ("Romeo was born in Rome", "Rome", ("Romeo was born in {}", "Rome")),
        # otherwise the first occurrence
        ("Paris, Paris is", "Paris", ("{}, Paris is", "Paris")),
        ("Denmark-Norway and Norway", "Norway", ("Denmark-{} and Norway", "Norway")),
        ("the iPhone is made by", "IPHONE", ("the {} is made by", "iPhone")),
        ("Nothing here", "Rome", None),
        ("C++ was designed by", "C++", ("{} was designed by", "C++")),
    ],
)
def test_template_from_filled(filled: str, subject: str, expected: tuple | None) -> None:
    assert template_from_filled(filled, subject) == expected
