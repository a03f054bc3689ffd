"""Urdu text cleaning for curation: normalisation and the per-document measures the filters use.

Plain functions of a string, shared by the curation steps (training/steps.py) and the instruct
set.

Normalisation choices (Urdu orthography):
- NFC; CR/LF and the Unicode line/paragraph separators to LF; control characters removed (tab
  becomes a space);
- format characters removed (zero-width space, BOM, soft hyphen, bidi marks and embeddings),
  except ZWNJ (U+200C) and ZWJ (U+200D) between two Arabic-script letters, where Urdu uses them
  to break or force a join (compounds, abbreviations); anywhere else they are junk;
- Arabic letter forms to Urdu ones: ي and ى -> ی, ك -> ک, Arabic-Indic digits -> Urdu digits;
- Arabic heh ه: Urdu writes ہ (heh goal) for /h/ and ھ (do-chashmi) only as the second half of
  an aspirated consonant (بھ، تھ، کھ ...). Text typed on an Arabic keyboard has ه for both, and
  no letter rule can tell them apart (كها is کہا "said" or کھا "eat"), so a word is looked up in
  a lexicon of common aspirated words (ASPIRATED) and otherwise gets ہ. Word-initial ھ, never
  right in Urdu, becomes ہ. Arabic quotations inside Urdu text get Urdu letter forms too.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import numpy as np

from release import urdu

_LETTERS = str.maketrans({
    "\u064a": "\u06cc",  # ARABIC YEH -> FARSI YEH (Urdu choti ye)
    "\u0649": "\u06cc",  # ALEF MAKSURA -> FARSI YEH
    "\u0643": "\u06a9",  # ARABIC KAF -> KEHEH (Urdu kaf)
    **{chr(0x0660 + i): chr(0x06F0 + i) for i in range(10)},  # Arabic-Indic -> Urdu digits
    "\u00a0": " ", "\t": " ", "\u2028": "\n", "\u2029": "\n",
})
_ARABIC_LETTER = r"[\u0620-\u064a\u066e-\u06d3\u06d5\u06fa-\u06ff\u0750-\u077f]"
_JOINER = re.compile(rf"(?<!{_ARABIC_LETTER})[\u200c\u200d]|[\u200c\u200d](?!{_ARABIC_LETTER})")
_KEEP_FORMAT = {"\u200c", "\u200d", *map(chr, range(0x0600, 0x0606)), "\u06dd", "\u08e2"}
_WORD_CHAR = r"[\u0620-\u065f\u066e-\u06d3\u06d5\u06fa-\u06ff\u0670\u0750-\u077f]"
# a whole word (a maximal run of word characters) holding a heh; the lookbehind starts matches at
# word starts only, so the engine does not rescan a word from each of its letters
_WORD_WITH_HEH = re.compile(rf"(?<!{_WORD_CHAR}){_WORD_CHAR}*[\u0647\u06be]{_WORD_CHAR}*")
_INITIAL_DO_CHASHMI = re.compile(rf"(?<!{_WORD_CHAR})\u06be")
_SPACES = re.compile(r"[ \u2000-\u200a\u202f\u205f\u3000]+")
_ODD_SPACE = re.compile(r"[\u2000-\u200a\u202f\u205f\u3000]")

# Common Urdu words with do-chashmi heh (aspirates). The key of each is its Arabic-keyboard
# spelling (both hehs as ه). Words whose key is also a common word with heh goal are left out
# (کھا / کہا): those get ہ.
_ASPIRATED_WORDS = """
بھی بھائی بھائیوں بھر بھرا بھری بھارت بھاری بھاگ بھول بھوک بھیج بھیجا بھیجی بھیجیں بھلا
تھا تھی تھے تھیں ساتھ ہاتھ ہاتھوں اٹھا اٹھائے اٹھایا اٹھانا اٹھ ٹھیک ٹھہر ٹھنڈا ٹھنڈی ٹھنڈک
کچھ اچھا اچھی اچھے اچھائی پوچھ پوچھا پوچھیں مچھلی چھوٹا چھوٹی چھوٹے چھوڑ چھوڑا چھپی چھٹی چھٹیوں
مجھے مجھ تجھے تجھ سمجھ سمجھا سمجھتے سمجھنا بوجھ جھیل جھوٹ
دیکھ دیکھا دیکھی دیکھے دیکھنا دیکھیں رکھ رکھا رکھی رکھے رکھیں رکھنا کھانا کھانے کھیل کھیلا کھیلنا
کھلاڑی کھلاڑیوں کھڑا کھڑی کھڑے کھول کھولا کھلا لکھ لکھا لکھی لکھے لکھنا لکھیں آنکھ آنکھیں آنکھوں
گھر گھروں گھنٹہ گھنٹے گھنٹوں گھاس گھوم گھوڑا دکھ دکھا دکھائی دکھایا سکھ سیکھ سیکھا
پھر پھل پھول پھیلا پھیلی پھیلا پھینک پھینکا پھینکتا
دھوپ دھول دھواں دھیان دھوکا دودھ ڈھل ڈھانپ ڈھونڈ بیٹھ بیٹھا بیٹھی بیٹھے بیٹھنا
پڑھ پڑھا پڑھی پڑھے پڑھنا پڑھیں بوڑھا بوڑھی بڑھ بڑھا بڑھی بڑھتا چڑھ سیڑھی
""".split()
_HEHS = str.maketrans({"\u06be": "\u0647", "\u06c1": "\u0647"})
ASPIRATED: dict[str, str] = {w.translate(_HEHS): w for w in _ASPIRATED_WORDS}


def _fix_heh(match: re.Match) -> str:
    word = match.group(0)
    if word[0] == "\u06be":  # do-chashmi cannot start a word
        word = "\u06c1" + word[1:]
    if "\u0647" not in word:
        return word
    return ASPIRATED.get(word.translate(_HEHS)) or word.replace("\u0647", "\u06c1")


def normalize(text: str) -> str:
    """Clean one document: NFC, Urdu letter forms, no control or zero-width junk, tidy spaces."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    for old, new in _LETTER_PAIRS:  # str.translate costs ~80 ns a character; replace is memchr-fast
        if old in text:
            text = text.replace(old, new)
    text = _JUNK_BMP.sub("", text)
    if _ASTRAL.search(text):  # the astral junk class is hundreds of ranges: slow, and rarely needed
        text = _JUNK_ASTRAL.sub("", text)
    if "\u200c" in text or "\u200d" in text:
        text = _JOINER.sub("", text)
    if "\u0647" in text:
        text = _WORD_WITH_HEH.sub(_fix_heh, text)
    else:  # no Arabic heh: only a word-initial do-chashmi to fix (what _fix_heh would do)
        text = _INITIAL_DO_CHASHMI.sub("\u06c1", text)
    if "  " in text or _ODD_SPACE.search(text):  # most text has neither: one scan, no rewrite
        text = _SPACES.sub(" ", text)
    lines = [line.strip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return unicodedata.normalize("NFC", text)


def _classes() -> tuple[dict[str, re.Pattern], np.ndarray]:
    """The character classes, from one pass over the code points (category, script):

    - ``junk_bmp``, ``junk_astral``: everything ``normalize`` removes, below and above U+FFFF:
      control (but LF), format (but the joiners and Arabic number signs), surrogate, private-use
      and unassigned code points;
    - the kind of every code point, for ``script_ratio``: 0 not a letter, ``_LETTER`` a letter
      (category L*, what ``str.isalpha`` tests), plus ``_URDU`` for letters of release/urdu.py's
      script or ``_LATIN`` for Latin letters."""
    ranges: dict[str, list[list[int]]] = {"junk_bmp": [], "junk_astral": []}
    kind = np.zeros(0x110000, dtype=np.uint8)

    for cp in range(0x110000):
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Cn") and ch != "\n" and ch not in _KEEP_FORMAT:
            rs = ranges["junk_bmp" if cp <= 0xFFFF else "junk_astral"]
            if rs and rs[-1][1] == cp - 1:
                rs[-1][1] = cp
            else:
                rs.append([cp, cp])
        elif cat[0] == "L":
            kind[cp] = _LETTER | (_URDU if urdu.in_script(ch) else _LATIN if _LATIN_CHAR.match(ch) else 0)
    junk = {k: re.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in rs) + "]") for k, rs in ranges.items()}
    return junk, kind


_LATIN_CHAR = re.compile(r"[A-Za-z\u00c0-\u024f]")
_LETTER, _URDU, _LATIN = 1, 2, 4
_JUNK, _KIND = _classes()
_JUNK_BMP, _JUNK_ASTRAL = _JUNK["junk_bmp"], _JUNK["junk_astral"]
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_LETTER_PAIRS = tuple((chr(k), v) for k, v in _LETTERS.items())


# --- filters ----------------------------------------------------------------------------------

def script_ratio(text: str, language: str | None) -> float:
    """Share of the letters (Unicode category L*) that are in the language's script. Urdu: the
    script of release/urdu.py, the one verify's Urdu purity measures; English: Latin. Counted by
    looking every code point up in one table (numpy: no Python per character); equal to
    ``urdu.count_letters``, which tests check."""
    if language is None:
        return 1.0
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n = np.bincount(_KIND[codes], minlength=8)
    letters = len(codes) - int(n[0])
    if not letters:
        return 0.0
    return int(n[_LETTER | (_URDU if language == "ur" else _LATIN)]) / letters


def repetition(text: str) -> float:
    """Share of words inside word 3-grams that occur more than once (Gopher's duplicate n-gram
    measure): spam and crawl loops score high, prose stays low."""
    words = text.split()
    grams = list(zip(words, words[1:], words[2:], strict=False))
    counts = Counter(grams)
    if len(counts) == len(grams):  # no 3-gram occurs twice (most prose): nothing is covered
        return 0.0
    covered = bytearray(len(words))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + 3] = b"\x01\x01\x01"
    return sum(covered) / len(words)


def strip_boilerplate(text: str, patterns: list[re.Pattern], whole: list[re.Pattern] | None = None) -> str:
    """``text`` without the lines any of ``patterns`` matches. ``whole`` (from ``whole_text``):
    the same patterns searched over the whole text first; most documents have no boilerplate,
    and six searches of the text cost a fraction of six per line."""
    if whole is not None and not any(p.search(text) for p in whole):
        return text.strip()
    return "\n".join(line for line in text.split("\n") if not any(p.search(line) for p in patterns)).strip()


# \A and \Z, negative lookarounds and conditionals can match a line alone but not the same line
# inside the text (a line's start is the text's start only for the first line; a lookaround sees
# past the line's ends). Every other construct that matches a line matches it in the text too,
# with re.MULTILINE's ^ and $ at the line's ends.
_LINE_ONLY = re.compile(r"\\[AZ]|\(\?<?!|\(\?\(")


def whole_text(patterns: list[str]) -> list[re.Pattern] | None:
    """``patterns`` compiled to search a whole text with the certainty that a text they do not
    match has no line they match; None when one of them uses a construct that breaks that."""
    if any(_LINE_ONLY.search(p) for p in patterns):
        return None
    return [re.compile(p, re.MULTILINE) for p in patterns]
