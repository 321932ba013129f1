"""Document quality filters, each with a name (the drop reason) and thresholds from the config.

The heuristics and their default thresholds follow the Gopher rules (Rae et al. 2021, §A.1):
word counts, mean word length, symbol-to-word ratio, bullet and ellipsis lines, words with
letters, stop words, and the repetition rules (duplicate lines and paragraphs, the most
frequent 2–4-gram, duplicated 5–10-grams). Counting works on word hashes (see hashing.py), so
a document is analysed in a few numpy passes.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loom.core.errors import LoomError
from loom.data.hashing import ngram_hashes, split_words

STOP_WORDS = {
    "en": ["the", "be", "to", "of", "and", "that", "have", "with"],
    "de": ["der", "die", "und", "das", "ist", "nicht", "mit", "ein"],
    "fr": ["le", "la", "et", "les", "des", "est", "pas", "une"],
    "es": ["el", "la", "de", "que", "y", "los", "se", "las"],
    "it": ["il", "di", "che", "la", "e", "non", "per", "un"],
    "nl": ["de", "het", "een", "en", "van", "is", "dat", "niet"],
    "pt": ["o", "de", "que", "e", "do", "da", "em", "um"],
}
_TOP_NGRAM = {"2": 0.20, "3": 0.18, "4": 0.16}
_DUP_NGRAM = {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10}
_BULLETS = ("•", "-", "*", "‣", "◦", "·", "–", "—")
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
    language: str = "en"
    min_stop_words: int = 2
    stop_words: list[str] = field(default_factory=list)  # replaces the language's list
    bad_words: list[str] = field(default_factory=list)
    bad_words_file: str = ""  # one word per line
    max_bad_words: int = 0  # more occurrences than this drop the document
    custom: str = ""  # "package.module:function" or "path/file.py:function"


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


def validate_filters(cfg: FilterConfig) -> None:
    known = filter_names(cfg)
    unknown = [n for n in cfg.disable if n not in known]
    if unknown:
        raise LoomError(f"filters.disable: unknown filter(s) {unknown}; known: {', '.join(known)}")
    if cfg.language not in STOP_WORDS and not cfg.stop_words:
        raise LoomError(
            f"filters.language={cfg.language!r} has no built-in stop words "
            f"({', '.join(STOP_WORDS)}); set filters.stop_words or disable 'stop_words'"
        )
    for key in (*cfg.max_top_ngram_chars_fraction, *cfg.max_duplicate_ngram_chars_fraction):
        if not key.isdigit() or int(key) < 1:
            raise LoomError(f'filters n-gram table: key {key!r} must be an n-gram size like "5"')
    if cfg.bad_words_file and not Path(cfg.bad_words_file).is_file():
        raise LoomError(f"filters.bad_words_file {cfg.bad_words_file} does not exist")
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
        self.stop_hashes = _hash_words(cfg.stop_words or STOP_WORDS.get(cfg.language, []))
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
        words = split_words(text.lower())
        n = len(words)
        if "min_words" in on and n < c.min_words:
            return "min_words"
        if "max_words" in on and n > c.max_words:
            return "max_words"
        if n == 0:
            return None
        if "mean_word_length" in on:
            mean = float(words.char_lengths.mean())
            if not c.min_mean_word_length <= mean <= c.max_mean_word_length:
                return "mean_word_length"
        if "alpha_words" in on:
            alpha = sum(1 for w in text.split() if _ALPHA_WORD.search(w))
            if alpha / n < c.min_alpha_words_fraction:
                return "alpha_words"
        if "symbol_word_ratio" in on:
            symbols = text.count("#") + text.count("...") + text.count("…")
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
            ellipses = sum(1 for line in lines if line.endswith(("...", "…")))
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
