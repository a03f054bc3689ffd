"""What counts as Urdu script: one definition for curation's script filter and verify's Urdu purity.

Urdu is written in the Arabic script, so "Urdu" here means a letter of these Unicode blocks:

- Arabic (U+0600-06FF): the Urdu letters themselves (ٹ ڈ ڑ ں ہ ھ ی ے ...) and Arabic/Persian ones;
- Arabic Supplement (U+0750-077F), Arabic Extended-B (U+0870-089F) and Extended-A
  (U+08A0-08FF): letters of other languages written in the script. None is Urdu, but a text in
  them is in the script, not in Latin, which is what both measures are after;
- Arabic Presentation Forms-A (U+FB50-FDFF) and -B (U+FE70-FEFC): contextual forms and
  ligatures (ﻻ, ﷲ) that old encoders and some generators emit. Forms-B stops at U+FEFC, the
  last letter: U+FEFD-FEFE are unassigned and U+FEFF is the byte order mark (zero-width
  no-break space), a format character of no script.

Left out: the other scripts between (Thaana, NKo, Samaritan, Mandaic, Syriac), Arabic
Extended-C and the Arabic Mathematical Alphabetic Symbols (mathematical notation, not text).

Only letters are counted, on both sides (Unicode category L*, ``str.isalpha``): diacritics,
digits and punctuation (۔ ، ؟ ۱۲۳) are in these blocks but are not letters, so they neither
raise nor lower a share. This module imports nothing of ours.
"""

from __future__ import annotations

import re

__all__ = ["SCRIPT_RANGES", "in_script", "count_letters"]

# (first, last) code point of each block, inclusive.
SCRIPT_RANGES: tuple[tuple[int, int], ...] = (
    (0x0600, 0x06FF),  # Arabic
    (0x0750, 0x077F),  # Arabic Supplement
    (0x0870, 0x089F),  # Arabic Extended-B
    (0x08A0, 0x08FF),  # Arabic Extended-A
    (0xFB50, 0xFDFF),  # Arabic Presentation Forms-A
    (0xFE70, 0xFEFC),  # Arabic Presentation Forms-B, without U+FEFF (BOM)
)
# The same ranges as one character class: counting runs in C over whole corpora.
_SCRIPT = re.compile("[" + "".join(f"\\u{lo:04x}-\\u{hi:04x}" for lo, hi in SCRIPT_RANGES) + "]")


def in_script(ch: str) -> bool:
    """True when the character ``ch`` is in one of ``SCRIPT_RANGES`` (letter or not)."""
    return len(ch) == 1 and _SCRIPT.match(ch) is not None


def count_letters(text: str) -> tuple[int, int]:
    """``(Urdu-script letters, all letters)`` in ``text``; a letter is Unicode category L*."""
    return sum(map(str.isalpha, _SCRIPT.findall(text))), sum(map(str.isalpha, text))
