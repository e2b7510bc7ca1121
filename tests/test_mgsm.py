"""MGSM answers: per-language instructions, locale-aware number parsing and comparison with tolerance."""

from __future__ import annotations

import pytest

from weightedit.evaluation.metrics import MGSM_SUFFIX, extract_number, numbers_match, parse_number
from weightedit.prompts import LANGUAGES


@pytest.mark.parametrize(
    ("token", "lang", "value"),
    [
        ("1.200", "de", 1200.0),  # the cases: a thousands dot in German, Spanish, Italian, Dutch, Polish
        ("1.200", "es", 1200.0),
        ("1.200", "it", 1200.0),
        ("1.200", "nl", 1200.0),
        ("1.200", "pl", 1200.0),
        ("3,5", "de", 3.5),  # ... a decimal comma there
        ("3,5", "fr", 3.5),
        ("1,200", "en", 1200.0),  # ... and a thousands comma in English
        ("1,200", "zh", 1200.0),
        ("1,200", "de", 1.2),
        ("1.5", "en", 1.5),
        ("3.5", "de", 3.5),  # a dot followed by one digit stays a decimal point
        ("1.200,50", "de", 1200.5),
        ("1,200.50", "en", 1200.5),
        ("1.234.567", "it", 1234567.0),
        ("1,234,567", "en", 1234567.0),
        ("12", "ja", 12.0),
        ("-7", "en", -7.0),
        ("−7", "ru", -7.0),
        ("١٢٠٠", "ar", 1200.0),
        ("٣٫٥", "ar", 3.5),
        ("1\u202f200", "fr", 1200.0),
        ("1 200", "ru", 1200.0),
    ],
)
def test_parse_number(token, lang, value):
    assert parse_number(token, lang) == pytest.approx(value)


@pytest.mark.parametrize(
    ("text", "lang", "value"),
    [
        ("Sie hat 1.200 Euro gespart und gibt 200 aus.\nAntwort: 1.000", "de", 1000.0),
        ("Tom has 3 apples and buys 1,200 more. Answer: 1,203 apples", "en", 1203.0),
        ("Il reste 3,5 kg.\nRéponse : 3,5", "fr", 3.5),
        ("Всего 1 200 рублей.\nОтвет: 1 200", "ru", 1200.0),
        ("まず 5 + 7 = 12 です。\n答え: 12", "ja", 12.0),
        ("先算 3×4=12，再加 6。\n答案：18", "zh", 18.0),
        ("No answer word here, but the total is 42.", "en", 42.0),  # the last number
        ("<think>Maybe 5? No, 7.</think>The answer: 8", "en", 8.0),  # the thinking block is skipped
        ("Ninguna cifra.", "es", None),
    ],
)
def test_extract_number(text, lang, value):
    got = extract_number(text, lang)
    assert got == value if value is None else got == pytest.approx(value)


def test_the_old_parser_bugs_are_gone():
    # The old parser dropped every comma and read dots as decimals: "1.200" → 1.2 and "3,5" → 35 in German.
    assert numbers_match(extract_number("Antwort: 1.200", "de"), 1200)
    assert numbers_match(extract_number("Antwort: 3,5", "de"), 3.5)
    assert not numbers_match(extract_number("Antwort: 3,5", "de"), 35)


def test_numbers_match_with_tolerance():
    assert numbers_match(12.0, 12)
    assert numbers_match(0.1 + 0.2, 0.3)
    assert not numbers_match(12.5, 12)
    assert not numbers_match(None, 12)


def test_every_language_has_its_own_answer_instruction():
    assert set(MGSM_SUFFIX) == set(LANGUAGES)
    instructions = [MGSM_SUFFIX[lang][0] for lang in LANGUAGES]
    assert len(set(instructions)) == len(LANGUAGES)
    for lang in LANGUAGES:
        instruction, word = MGSM_SUFFIX[lang]
        assert word.casefold() in instruction.casefold(), lang
