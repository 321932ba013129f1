"""Document quality filters, each with a name (the drop reason) and thresholds from the config.

The heuristics and their default thresholds follow the Gopher rules (Rae et al. 2021, §A.1):
word counts, mean word length, symbol-to-word ratio, bullet and ellipsis lines, words with
letters, stop words, and the repetition rules (duplicate lines and paragraphs, the most
frequent 2–4-gram, duplicated 5–10-grams). Counting works on word hashes (see hashing.py), so
a document is analysed in a few numpy passes.

Languages: `filters_for(cfg, language)` is the config a document of that language is checked
with: the `[filters]` values, then Loom's built-in values for the language (`LANGUAGE_DEFAULTS`:
Chinese is cut into words by jieba, Japanese counted by character, with word lengths and stop
words of their own), then the user's `[filters.<language>]` table. A language without a stop
word list (built-in or `stop_words`) skips the stop-word rule rather than dropping everything.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loom.core.config import tree_from_dict
from loom.core.errors import LoomError
from loom.data.hashing import ngram_hashes, split_words
from loom.data.segment import WordMode, is_cjk, words_of

_TOP_NGRAM = {"2": 0.20, "3": 0.18, "4": 0.16}
_DUP_NGRAM = {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10}
STOP_WORDS = {
    "en": ["the", "be", "to", "of", "and", "that", "have", "with"],
    "de": ["der", "die", "und", "das", "ist", "nicht", "mit", "ein"],
    "fr": ["le", "la", "et", "les", "des", "est", "pas", "une"],
    "es": ["el", "la", "de", "que", "y", "los", "se", "las"],
    "it": ["il", "di", "che", "la", "e", "non", "per", "un"],
    "nl": ["de", "het", "een", "en", "van", "is", "dat", "niet"],
    "pt": ["o", "de", "que", "e", "do", "da", "em", "um"],
    # jieba words, simplified and traditional forms.
    "zh": [
        "的",
        "了",
        "是",
        "在",
        "和",
        "有",
        "我",
        "这",
        "這",
        "不",
        "也",
        "就",
        "人",
        "都",
        "一",
        "一个",
        "一個",
        "上",
        "你",
        "他",
        "她",
        "它",
        "我们",
        "我們",
        "与",
        "與",
        "及",
        "或",
        "为",
        "為",
        "对",
        "對",
        "从",
        "從",
        "被",
        "把",
        "以",
        "中",
        "将",
        "將",
        "可以",
        "会",
        "會",
        "要",
        "到",
        "说",
        "說",
        "着",
        "著",
        "过",
        "過",
        "而",
        "之",
        "其",
        "并",
        "並",
    ],
    # characters (Japanese is counted by character): the commonest particles
    "ja": ["の", "に", "は", "を", "が", "で", "と", "も", "た", "て", "し", "な"],
    "ko": [
        "이",
        "그",
        "저",
        "및",
        "수",
        "것",
        "등",
        "더",
        "또는",
        "또한",
        "그리고",
        "있는",
        "있다",
        "하는",
        "한다",
    ],
}
# Built-in values per language, between `[filters]` and `[filters.<language>]` (see
# filters_for). The rest stays Gopher's. Where the numbers come from:
# - zh: jieba words (dictionary only, see segment.py), because ROOTS also filters Chinese on
#   segmented words (BigScience data-preparation, parameters_filtering.py: zh has
#   "tokenization": True). The mean word length counts the Chinese words only: 1.3 lies between
#   the real Debian Reference (175 sections: 1.58-2.14) and the same text with its Han characters
#   shuffled (1.05-1.09), our own calibration; Gopher's 3-10 dropped half the real sections.
#   With these values 167 of the 175 sections pass; the 8 dropped are tables of contents, ASCII
#   tables and lists (alpha_words 2, duplicate n-grams 4, top 4-gram 1, duplicate lines 1).
# - ja: every character a word (no dictionary segmenter ships with Loom), so the mean word
#   length is 1 and n-gram sizes are doubled (a word is about two characters): 69 of 72 of
#   Debian's Japanese man pages pass, against 27 with Gopher's word sizes.
# - ko: Korean separates words by spaces, but its words are short: the Korean man pages'
#   Hangul words average 3.0-4.2 syllables, at the edge of Gopher's minimum of 3.
LANGUAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "zh": {"words": "jieba", "min_mean_word_length": 1.3},
    "ja": {
        "words": "chars",
        "min_mean_word_length": 1.0,
        "max_top_ngram_chars_fraction": {str(2 * int(n)): v for n, v in _TOP_NGRAM.items()},
        "max_duplicate_ngram_chars_fraction": {str(2 * int(n)): v for n, v in _DUP_NGRAM.items()},
    },
    "ko": {"min_mean_word_length": 2.0},
}
# Bullets, Latin and full-width/CJK ones ("・" and "●" start list items in Chinese and Japanese).
_BULLETS = ("•", "-", "*", "‣", "◦", "·", "–", "—", "・", "●", "○", "■", "□", "◆", "◇", "▪", "－")
_ELLIPSES = ("...", "…")
# "#" and ellipses count as symbols; a run "……" (the Chinese ellipsis, two characters) is one.
_SYMBOLS = re.compile(r"[#＃]|\.\.\.|…+")
_ALPHA_WORD = re.compile(r"[^\W\d_]")


@dataclass
class FilterConfig:
    """Thresholds of every filter; list filter names in `disable` to switch some off."""

    enabled: bool = True
    disable: list[str] = field(default_factory=list)
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    min_alpha_words_fraction: float = 0.8
    max_symbol_word_ratio: float = 0.1  # "#" and ellipses per word
    max_bullet_lines_fraction: float = 0.9
    max_ellipsis_lines_fraction: float = 0.3
    max_duplicate_lines_fraction: float = 0.3
    max_duplicate_line_chars_fraction: float = 0.2
    max_duplicate_paragraphs_fraction: float = 0.3
    max_duplicate_paragraph_chars_fraction: float = 0.2
    max_top_ngram_chars_fraction: dict[str, float] = field(default_factory=lambda: dict(_TOP_NGRAM))
    max_duplicate_ngram_chars_fraction: dict[str, float] = field(
        default_factory=lambda: dict(_DUP_NGRAM)
    )
    # The language of documents that language ID gives no answer for (no letters to go by).
    language: str = "en"
    languages: list[str] = field(default_factory=list)  # keep only these; empty = all
    # Language ID's probability below this drops the document (reason language_score).
    min_language_score: float = 0.0
    words: WordMode = "whitespace"  # how words are counted: whitespace, jieba, chars
    min_stop_words: int = 2
    stop_words: list[str] = field(default_factory=list)  # replaces the language's list
    bad_words: list[str] = field(default_factory=list)
    bad_words_file: str = ""  # one word per line
    max_bad_words: int = 0  # more occurrences than this drop the document
    custom: str = ""  # "package.module:function" or "path/file.py:function"
    # `[filters.<language>]` tables: any key above but languages, applied to that language.
    per_language: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"tables": True})


def filter_names(cfg: FilterConfig) -> list[str]:
    """Every filter this config can apply, in the order they run."""
    names = [
        "min_words",
        "max_words",
        "mean_word_length",
        "alpha_words",
        "symbol_word_ratio",
        "bullet_lines",
        "ellipsis_lines",
        "duplicate_lines",
        "duplicate_line_chars",
        "duplicate_paragraphs",
        "duplicate_paragraph_chars",
        *(f"top_{n}gram_chars" for n in cfg.max_top_ngram_chars_fraction),
        *(f"duplicate_{n}gram_chars" for n in cfg.max_duplicate_ngram_chars_fraction),
        "stop_words",
        "bad_words",
        "custom",
    ]
    return names


# Keys of a `[filters.<language>]` table that only make sense in `[filters]`.
_NOT_PER_LANGUAGE = ("language", "languages")


@functools.cache
def known_languages() -> tuple[str, ...]:
    """The language codes language ID can answer (and so the ones a config may name)."""
    from loom.data.language import LanguageDetector

    return tuple(LanguageDetector().languages())


def _check_language(code: str, key: str) -> None:
    known = known_languages()
    if code not in known:
        close = difflib.get_close_matches(code, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise LoomError(
            f"{key}={code!r} is not a language the detector knows, so it has no built-in stop "
            f"words either{hint} (use an ISO 639-1 code such as en, zh, de, ja)"
        )


def _table_overrides(cfg: FilterConfig, language: str) -> dict[str, Any]:
    """The user's `[filters.<language>]` values, type-checked, by attribute name."""
    table = cfg.per_language.get(language, {})
    where = f"filters.{language}"
    for key in _NOT_PER_LANGUAGE:
        if key in table:
            raise LoomError(f"{where}.{key}: set {key} in [filters], not per language")
    built = tree_from_dict(FilterConfig, table, where)
    if built.per_language:  # a table inside the language's table
        key = next(iter(built.per_language))
        raise LoomError(f"unknown config key {where}.{key} (a language's table holds filter keys)")
    return {
        f.name: getattr(built, f.name)
        for f in dataclasses.fields(FilterConfig)
        if str(f.metadata.get("key", f.name)) in table
    }


def filters_for(cfg: FilterConfig, language: str) -> FilterConfig:
    """The config documents of `language` are checked with: `[filters]`, then Loom's built-in
    values for the language, then `[filters.<language>]`. An empty language (language ID had
    no answer) is `cfg.language`."""
    language = language or cfg.language
    values = {
        **copy.deepcopy(LANGUAGE_DEFAULTS.get(language, {})),
        **_table_overrides(cfg, language),
    }
    return dataclasses.replace(cfg, **values, language=language, languages=[], per_language={})


def validate_filters(cfg: FilterConfig) -> None:
    """Refuse, before any work, what would fail or do nothing: unknown filters or languages,
    bad per-language tables, a missing bad-words file, a custom filter that does not load."""
    _check_language(cfg.language, "filters.language")
    for i, code in enumerate(cfg.languages):
        _check_language(code, f"filters.languages[{i}]")
    for code in cfg.per_language:
        _check_language(code, f"[filters.{code}]: filters.{code}")
    for code in dict.fromkeys([cfg.language, *cfg.languages, *cfg.per_language]):
        where = f"filters.{code}" if code in cfg.per_language else "filters"
        _validate_one(filters_for(cfg, code), where)


def _validate_one(cfg: FilterConfig, where: str) -> None:
    known = filter_names(cfg)
    unknown = [n for n in cfg.disable if n not in known]
    if unknown:
        raise LoomError(f"{where}.disable: unknown filter(s) {unknown}; known: {', '.join(known)}")
    for key in (*cfg.max_top_ngram_chars_fraction, *cfg.max_duplicate_ngram_chars_fraction):
        if not key.isdigit() or int(key) < 1:
            raise LoomError(f'{where} n-gram table: key {key!r} must be an n-gram size like "5"')
    if not 0 <= cfg.min_language_score < 1:
        raise LoomError(
            f"{where}.min_language_score={cfg.min_language_score} must be in [0, 1) "
            "(a probability; 0 keeps every document language ID assigns)"
        )
    if cfg.bad_words_file and not Path(cfg.bad_words_file).is_file():
        raise LoomError(f"{where}.bad_words_file {cfg.bad_words_file} does not exist")
    if cfg.custom:
        load_callable(cfg.custom)


def load_callable(spec: str) -> Callable[[str], object]:
    """`package.module:function` or `path/to/file.py:function`."""
    if ":" not in spec:
        raise LoomError(
            f"filters.custom={spec!r} must look like module:function or file.py:function"
        )
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            spec_obj = importlib.util.spec_from_file_location(Path(target).stem, target)
            if spec_obj is None or spec_obj.loader is None:
                raise ImportError(f"cannot load {target}")
            module = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        fn = getattr(module, name)
    except (ImportError, AttributeError, OSError, SyntaxError) as e:
        raise LoomError(f"filters.custom={spec!r} could not be loaded: {e}") from None
    if not callable(fn):
        raise LoomError(f"filters.custom={spec!r} is not callable")
    return fn


def _hash_words(words: list[str]) -> np.ndarray:
    return split_words(" ".join(w.lower() for w in words)).hashes


def _excess(items: list[str]) -> tuple[int, int]:
    """(count, characters) of the items that repeat an earlier one."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


class QualityFilter:
    """Applies the configured filters to a text; `check` returns the failing filter's name."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self.active = set(filter_names(cfg)) - set(cfg.disable) if cfg.enabled else set()
        stop_words = cfg.stop_words or STOP_WORDS.get(cfg.language, [])
        if not stop_words:  # no list for this language: the rule cannot tell, so it keeps
            self.active.discard("stop_words")
        self.stop_hashes = _hash_words(stop_words)
        bad = list(cfg.bad_words)
        if cfg.bad_words_file:
            bad += [
                w.strip() for w in Path(cfg.bad_words_file).read_text().splitlines() if w.strip()
            ]
        self.bad_hashes = _hash_words(bad)
        self.custom = load_callable(cfg.custom) if cfg.custom and "custom" in self.active else None

    def check(self, text: str) -> str | None:
        """None if the text passes every active filter, else the first failing filter's name."""
        if not self.active:
            return None
        c, on = self.cfg, self.active
        if c.words == "whitespace":
            tokens = text.split()
            words = split_words(text.lower())
        else:
            tokens = words_of(text, c.words)
            words = split_words(" ".join(tokens).lower())
        n = len(words)
        if "min_words" in on and n < c.min_words:
            return "min_words"
        if "max_words" in on and n > c.max_words:
            return "max_words"
        if n == 0:
            return None
        if "mean_word_length" in on:
            lengths = words.char_lengths
            if c.words != "whitespace":  # of the CJK words: commands and names are not prose
                cjk = np.fromiter(map(is_cjk, tokens), dtype=bool, count=n)
                lengths = lengths[cjk] if cjk.any() else lengths
            mean = float(lengths.mean())
            if not c.min_mean_word_length <= mean <= c.max_mean_word_length:
                return "mean_word_length"
        if "alpha_words" in on:
            alpha = sum(1 for w in tokens if _ALPHA_WORD.search(w))
            if alpha / n < c.min_alpha_words_fraction:
                return "alpha_words"
        if "symbol_word_ratio" in on:
            symbols = len(_SYMBOLS.findall(text))
            if symbols / n > c.max_symbol_word_ratio:
                return "symbol_word_ratio"
        reason = self._lines(text) or self._ngrams(words.hashes, words.char_lengths)
        if reason:
            return reason
        if "stop_words" in on and np.isin(words.hashes, self.stop_hashes).sum() < c.min_stop_words:
            return "stop_words"
        bad = np.isin(words.hashes, self.bad_hashes).sum() if len(self.bad_hashes) else 0
        if "bad_words" in on and bad > c.max_bad_words:
            return "bad_words"
        if self.custom is not None:
            verdict = self.custom(text)
            if verdict is False:
                return "custom"
            if isinstance(verdict, str) and verdict:
                return f"custom:{verdict}"
        return None

    def _lines(self, text: str) -> str | None:
        c, on = self.cfg, self.active
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if not lines:
            return None
        if "bullet_lines" in on:
            bullets = sum(1 for line in lines if line.startswith(_BULLETS))
            if bullets / len(lines) > c.max_bullet_lines_fraction:
                return "bullet_lines"
        if "ellipsis_lines" in on:
            ellipses = sum(1 for line in lines if line.endswith(_ELLIPSES))
            if ellipses / len(lines) > c.max_ellipsis_lines_fraction:
                return "ellipsis_lines"
        total_chars = sum(len(line) for line in lines)
        count, chars = _excess(lines)
        if "duplicate_lines" in on and count / len(lines) > c.max_duplicate_lines_fraction:
            return "duplicate_lines"
        if (
            "duplicate_line_chars" in on
            and chars / total_chars > c.max_duplicate_line_chars_fraction
        ):
            return "duplicate_line_chars"
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        count, chars = _excess(paragraphs)
        if (
            "duplicate_paragraphs" in on
            and count / len(paragraphs) > c.max_duplicate_paragraphs_fraction
        ):
            return "duplicate_paragraphs"
        if (
            "duplicate_paragraph_chars" in on
            and chars / sum(len(p) for p in paragraphs) > c.max_duplicate_paragraph_chars_fraction
        ):
            return "duplicate_paragraph_chars"
        return None

    def _ngrams(self, hashes: np.ndarray, lengths: np.ndarray) -> str | None:
        c, on = self.cfg, self.active
        total = int(lengths.sum())
        # Characters of the n-gram starting at each word: its words plus the spaces between.
        prefix = np.concatenate(([0], np.cumsum(lengths)))
        for key, limit in c.max_top_ngram_chars_fraction.items():
            n, name = int(key), f"top_{key}gram_chars"
            grams = ngram_hashes(hashes, n)
            if name not in on or len(grams) == 0:
                continue
            _, first, counts = np.unique(grams, return_index=True, return_counts=True)
            best = int(np.argmax(counts))
            if counts[best] > 1:
                start = first[best]
                chars = int(prefix[start + n] - prefix[start]) + n - 1
                if chars * counts[best] / total > limit:
                    return name
        for key, limit in c.max_duplicate_ngram_chars_fraction.items():
            n, name = int(key), f"duplicate_{key}gram_chars"
            grams = ngram_hashes(hashes, n)
            if name not in on or len(grams) == 0:
                continue
            _, first = np.unique(grams, return_index=True)
            repeats = np.setdiff1d(np.arange(len(grams)), first, assume_unique=True)
            if len(repeats) == 0:
                continue
            cover = np.zeros(len(hashes) + 1, dtype=np.int64)
            np.add.at(cover, repeats, 1)
            np.add.at(cover, repeats + n, -1)
            covered = np.cumsum(cover[:-1]) > 0
            if lengths[covered].sum() / total > limit:
                return name
        return None
