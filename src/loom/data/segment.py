"""Word segmentation for the quality filters, per script.

Whitespace does not separate words in Chinese or Japanese: a Chinese paragraph is one
"word" to `str.split`, so word counts, mean word length and the repetition rules mean nothing
for it. The filters count words in one of three ways (`filters.words`):

- "whitespace": runs of non-whitespace characters (the Gopher rules' words);
- "jieba": runs of Han characters are cut into words by jieba's dictionary (rjieba, the Rust
  port: the same words as the Python jieba on the Debian Reference, 16x faster); every other
  run of non-space characters is one word, so "在Debian上" is 在 / Debian / 上 and mixed
  Chinese and English text works. jieba's HMM, which guesses words that are not in the
  dictionary, is off: it pairs random characters into "words" too (the Debian Reference with
  its Han characters shuffled keeps a mean word length of 1.6 with it, like the real text's
  1.6-2.1), while without it shuffled text falls apart into single characters (at most 1.09);
- "chars": every CJK character (Han, kana, hangul) is a word, other runs as above; for Japanese,
  or when dictionary segmentation is not wanted.

In "jieba" and "chars" CJK punctuation (U+3000-303F, the full-width forms) and curly quotes
separate words like spaces, and a run made only of punctuation or symbols ("——", "|") is not a
word: it carries no language, and counting it would shorten the mean word length of
Chinese text by its punctuation density.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal

WordMode = Literal["whitespace", "jieba", "chars"]

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK = _HAN + "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"
# CJK and curly punctuation separate words like spaces: "“sudo”" is the word sudo.
_PUNCT = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u2018-\u201f\u2026"
_HAN_RUNS = re.compile(rf"[{_HAN}]+|[^\s{_HAN}{_PUNCT}]+")
_CJK_CHARS = re.compile(rf"[{_CJK}]|[^\s{_CJK}{_PUNCT}]+")
_CJK_CHAR = re.compile(rf"[{_CJK}]")
_WORDLIKE = re.compile(r"[^\W_]")  # a letter or digit


@functools.cache
def _converter() -> Any:
    import opencc

    return opencc.OpenCC("t2s")


def _to_simplified(text: str) -> str:
    """jieba's dictionary is simplified Chinese: traditional text is converted (OpenCC t2s)
    before it is cut, or it falls apart into single characters (mean word length 1.1 instead
    of 1.7 on the traditional Chinese man pages)."""
    return _converter().convert(text)


def words_of(text: str, mode: WordMode) -> list[str]:
    """The words of `text` in the given mode, in order."""
    if mode == "whitespace":
        return text.split()
    if mode == "chars":
        return [w for w in _CJK_CHARS.findall(text) if _WORDLIKE.search(w)]
    import rjieba  # loads jieba's dictionary once (0.1 s)

    out: list[str] = []
    for run in _HAN_RUNS.findall(_to_simplified(text)):
        if _CJK_CHAR.match(run):
            out.extend(rjieba.cut(run, False))  # hmm=False
        elif _WORDLIKE.search(run):
            out.append(run)
    return out


def is_cjk(word: str) -> bool:
    """Whether a word of `words_of` is a CJK word (its characters are all CJK)."""
    return bool(_CJK_CHAR.match(word))
