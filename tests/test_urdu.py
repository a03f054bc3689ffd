"""What counts as Urdu script: the block boundaries, letters only, and one measure for curation's
script filter and verify's Urdu purity."""

from __future__ import annotations

import pytest

from release import urdu, verify
from training.data import script_ratio


@pytest.mark.parametrize("ch,inside", [
    ("\u0600", True), ("\u06ff", True), ("\u06c1", True),  # Arabic block; ہ heh goal
    ("\u0750", True), ("\u077f", True),  # Supplement
    ("\u0870", True), ("\u08ff", True),  # Extended-B, Extended-A
    ("\ufb50", True), ("\ufdf2", True), ("\ufe70", True), ("\ufefc", True),  # presentation forms
    ("\u05ff", False), ("\u0780", False), ("\u0710", False),  # before; Thaana; Syriac
    ("\ufefd", False), ("\ufeff", False),  # unassigned; byte order mark (no script)
    ("a", False), ("", False), ("ab", False),
])
def test_in_script(ch, inside):
    assert urdu.in_script(ch) is inside


def test_only_letters_count():
    # diacritic, Urdu full stop, comma, question mark, digits: in the blocks but not letters
    assert urdu.count_letters("کتاب\u064e۔ ، ؟ ۱۲۳") == (4, 4)
    assert urdu.count_letters("یہ اردو text ہے\ufeff") == (8, 12)
    assert urdu.count_letters("123 !!") == (0, 0)


@pytest.mark.parametrize("text", [
    "پاکستان کا دارالحکومت اسلام آباد ہے۔",
    "یہ اردو text ہے، اور ۱۲۳ ہندسے؟",
    "Hello from السلام",
    "ﻻ ﷲ and ½ × ²",
    "Click here to subscribe",
])
def test_curation_and_verify_measure_urdu_alike(text):
    assert script_ratio(text, "ur") == pytest.approx(verify.urdu_purity([text]), abs=1e-4)
