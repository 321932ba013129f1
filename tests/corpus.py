"""A test corpus from real text with planted cases: the standard library's docstrings (one
document per module), plus exact copies, near copies, machine garbage and short fragments.

Near-copy similarity is measured here independently of Loom (Python sets of word 5-grams).
"""

from __future__ import annotations

import ast
import gzip
import json
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
BOILERPLATE = (
    "This page was generated automatically. All trademarks are the property of their owners. "
    "Subscribe to the newsletter for weekly updates, and follow us for more articles like this. "
    "Copyright notice: reproduction without permission is prohibited."
)


def word_ngrams(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = word_ngrams(a), word_ngrams(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def docstring_documents(min_words: int = 80) -> list[tuple[str, str]]:
    """(module name, its docstrings joined by blank lines) for each top-level stdlib module."""
    docs = []
    for path in sorted(STDLIB.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        parts = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, nodes)]
        text = "\n\n".join(p for p in parts if p)
        if len(text.split()) >= min_words:
            docs.append((path.stem, text))
    return docs


@dataclass
class Corpus:
    distinct: dict[str, str] = field(default_factory=dict)  # id -> text, pairwise dissimilar
    exact: dict[str, str] = field(default_factory=dict)  # copy id -> original id
    near: dict[str, tuple[str, float]] = field(
        default_factory=dict
    )  # copy id -> (original, Jaccard)
    garbage: dict[str, set[str]] = field(default_factory=dict)  # id -> filters that may drop it
    short: list[str] = field(default_factory=list)
    records: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # source -> records


def build(seed: int = 0, max_distinct: int = 120) -> Corpus:
    rng = random.Random(seed)
    c = Corpus()
    texts: list[tuple[str, str]] = []
    for name, text in docstring_documents():
        # Keep only documents unlike every one kept so far, so "distinct" really means it.
        if all(jaccard(text, other) < 0.3 for _, other in texts):
            texts.append((f"doc-{name}", text))
        if len(texts) == max_distinct:
            break
    c.distinct = dict(texts)
    web: list[dict[str, str]] = [{"id": i, "text": t} for i, t in texts[: len(texts) // 2]]
    books: list[dict[str, str]] = [{"id": i, "text": t} for i, t in texts[len(texts) // 2 :]]
    originals = [i for i, _ in texts]

    for k, original in enumerate(rng.sample(originals, 10)):  # exact copies, some across sources
        copy_id = f"exact-{k}"
        c.exact[copy_id] = original
        (web if k % 2 else books).append({"id": copy_id, "text": c.distinct[original]})

    for k, original in enumerate(rng.sample(originals, 30)):  # near copies
        text = c.distinct[original]
        kind = k % 3
        if kind == 0:  # a few words changed (2 %)
            words = text.split(" ")
            for pos in rng.sample(range(len(words)), max(1, len(words) // 50)):
                words[pos] = rng.choice(["alpha", "beta", "gamma", "delta"])
            copy = " ".join(words)
        elif kind == 1:  # two paragraphs swapped
            paragraphs = text.split("\n\n")
            if len(paragraphs) > 1:
                i, j = rng.sample(range(len(paragraphs)), 2)
                paragraphs[i], paragraphs[j] = paragraphs[j], paragraphs[i]
            copy = "\n\n".join(paragraphs)
        else:  # boilerplate appended
            copy = text + "\n\n" + BOILERPLATE
        copy_id = f"near-{k}"
        c.near[copy_id] = (original, jaccard(text, copy))
        (books if k % 2 else web).append({"id": copy_id, "text": copy})

    symbols = "#$%&*@^~|<>{}[]=+"
    for k in range(4):  # random symbols
        noise = " ".join(
            "".join(rng.choice(symbols) for _ in range(rng.randint(2, 9))) for _ in range(120)
        )
        c.garbage[f"symbols-{k}"] = {
            "alpha_words",
            "symbol_word_ratio",
            "stop_words",
            "mean_word_length",
        }
        web.append({"id": f"symbols-{k}", "text": noise})
    for k in range(4):  # the same few lines over and over
        lines = ["Click here to continue reading the full story now.", "Advertisement"] * 30
        c.garbage[f"repeated-{k}"] = {
            "duplicate_lines",
            "duplicate_line_chars",
            "duplicate_paragraphs",
        }
        web.append({"id": f"repeated-{k}", "text": "\n".join(lines)})
    for k in range(4):  # keyword spam
        spam = " ".join(
            rng.choice(["cheap pills", "buy now", "best price", "free shipping"])
            for _ in range(150)
        )
        c.garbage[f"spam-{k}"] = {
            "top_2gram_chars",
            "top_3gram_chars",
            "top_4gram_chars",
            "stop_words",
        } | {f"duplicate_{n}gram_chars" for n in range(5, 11)}
        web.append({"id": f"spam-{k}", "text": spam})
    for k in range(6):  # very short fragments
        fragment = " ".join(c.distinct[rng.choice(originals)].split()[: rng.randint(3, 30)])
        c.short.append(f"short-{k}")
        books.append({"id": f"short-{k}", "text": fragment})

    rng.shuffle(web)
    rng.shuffle(books)
    c.records = {"web": web, "books": books}
    return c


DEBIAN_REFERENCE_ZH = Path("/usr/share/debian-reference/debian-reference.zh-cn.txt.gz")
_HEADING = re.compile(r"^\d+(\.\d+)*\.[ \u00a0]\S")  # body headings use a no-break space
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def chinese_documents(min_cjk_chars: int = 200) -> list[tuple[str, str]]:
    """(section number, its prose) for each section of the Debian Reference in simplified
    Chinese (Debian package debian-reference-zh-cn; `make test-packages` installs it).

    The text file is wrapped at a fixed width, often inside a Chinese word: a line break
    between two CJK characters is removed, other line breaks inside a paragraph become spaces.
    """
    if not DEBIAN_REFERENCE_ZH.is_file():
        raise FileNotFoundError(
            f"{DEBIAN_REFERENCE_ZH} is missing: the tests need Debian's debian-reference-zh-cn "
            "package (make test-packages, or sudo apt-get install debian-reference-zh-cn)"
        )
    with gzip.open(DEBIAN_REFERENCE_ZH, "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        if _HEADING.match(line):
            sections.append((line.split(None, 1)[0].rstrip("."), []))
        elif sections:
            sections[-1][1].append(line.strip())
    docs = []
    for number, body in sections:
        paragraphs, current = [], ""
        for line in [*body, ""]:
            if not line:
                if current:
                    paragraphs.append(current)
                current = ""
            elif current and _CJK.match(current[-1]) and _CJK.match(line[0]):
                current += line
            else:
                current = f"{current} {line}" if current else line
        text = "\n\n".join(paragraphs)
        if len(_CJK.findall(text)) >= min_cjk_chars:
            docs.append((number, text))
    return docs


# -- Chinese near copies ------------------------------------------------------------------------
# Loom's shingling tokens, written again here as a regular expression: every CJK character is
# a token, CJK punctuation separates tokens like whitespace, the rest is whitespace words.
_CJK_CHARS = (
    "\u1100-\u11ff\u2e80-\u2fdf\u3040-\u33ff\u3400-\u4dbf\u4e00-\u9fff\ua960-\ua97f"
    "\uac00-\ud7ff\uf900-\ufaff\uff66-\uffdc\U0001b000-\U0001b16f\U00020000-\U0003ffff"
)
_CJK_PUNCTUATION = (
    "\u3000-\u303f\ufe10-\ufe1f\ufe30-\ufe6f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
)
_ONE_CJK = re.compile(f"[{_CJK_CHARS}]")
_TOKEN = re.compile(f"[{_CJK_CHARS}]|[^{_CJK_CHARS}{_CJK_PUNCTUATION}\t\n\x0b\x0c\r ]+")
_SENTENCE = re.compile(r"[^。！？]+[。！？]?")


def cjk_ngrams(text: str, cjk_n: int = 2, n: int = 5) -> set[tuple[str, ...]]:
    """Token n-grams of the lower-cased text: `cjk_n`-grams when at least half the tokens are
    CJK characters, else n-grams; a text shorter than that is one n-gram of all its tokens."""
    tokens = _TOKEN.findall(text.lower())
    if 2 * sum(1 for t in tokens if _ONE_CJK.fullmatch(t)) >= len(tokens):
        n = cjk_n
    n = min(n, len(tokens))
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def cjk_jaccard(a: str, b: str, cjk_n: int = 2) -> float:
    x, y = cjk_ngrams(a, cjk_n), cjk_ngrams(b, cjk_n)
    return len(x & y) / len(x | y) if x | y else 1.0


def common_cjk_characters(texts: list[str], count: int = 500) -> list[str]:
    """The `count` most frequent CJK characters of `texts`, most frequent first."""
    counts: dict[str, int] = {}
    for text in texts:
        for c in _ONE_CJK.findall(text):
            counts[c] = counts.get(c, 0) + 1
    return sorted(counts, key=lambda c: (-counts[c], c))[:count]


def change_one_character_per_sentence(text: str, rng: random.Random, alphabet: list[str]) -> str:
    """Replace one CJK character of every sentence (ended by 。！？) with another from
    `alphabet`; sentences without CJK characters stay as they are."""
    out = []
    for sentence in _SENTENCE.findall(text):
        places = [m.start() for m in _ONE_CJK.finditer(sentence)]
        if places:
            at = rng.choice(places)
            new = rng.choice([c for c in alphabet if c != sentence[at]])
            sentence = sentence[:at] + new + sentence[at + 1 :]
        out.append(sentence)
    return "".join(out)


def reorder_paragraphs(text: str, rng: random.Random) -> str:
    paragraphs = text.split("\n\n")
    rng.shuffle(paragraphs)
    return "\n\n".join(paragraphs)


@dataclass
class ChineseCorpus:
    originals: dict[str, str] = field(default_factory=dict)  # id -> text
    copies: dict[str, tuple[str, str, float]] = field(
        default_factory=dict
    )  # copy id -> (original id, kind, Jaccard of character 2-grams with the original)
    records: list[dict[str, str]] = field(default_factory=list)  # everything, shuffled

    def group_of(self, doc_id: str) -> str:
        """The original a document was made from (itself for an original)."""
        return self.copies[doc_id][0] if doc_id in self.copies else doc_id

    def write_jsonl(self, folder: Path, parts: int = 2) -> Path:
        """The records as `parts` JSONL files zh-<part>.jsonl in `folder` (made), every
        `parts`-th record in each; returns the folder."""
        folder.mkdir(parents=True)
        for part in range(parts):
            with (folder / f"zh-{part}.jsonl").open("w", encoding="utf-8") as fh:
                for record in self.records[part::parts]:
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        return folder


CHINESE_COPY_KINDS = ("changed", "reordered", "changed+reordered")


def build_chinese(seed: int = 0, exact_every: int = 5) -> ChineseCorpus:
    """Every Debian Reference section, one near copy of each kind per section (one changed
    character per sentence; paragraphs reordered; both) and an exact copy of every
    `exact_every`-th section, all shuffled together."""
    rng = random.Random(seed)
    c = ChineseCorpus(originals={f"zh-{k}": t for k, (_, t) in enumerate(chinese_documents())})
    alphabet = common_cjk_characters(list(c.originals.values()))
    for k, (original, text) in enumerate(c.originals.items()):
        for kind in CHINESE_COPY_KINDS:
            copy = text
            if "changed" in kind:
                copy = change_one_character_per_sentence(copy, rng, alphabet)
            if "reordered" in kind:
                copy = reorder_paragraphs(copy, rng)
            c.copies[f"{original}-{kind}"] = (original, kind, cjk_jaccard(text, copy))
            c.records.append({"id": f"{original}-{kind}", "text": copy})
        if k % exact_every == 0:
            c.copies[f"{original}-exact"] = (original, "exact", 1.0)
            c.records.append({"id": f"{original}-exact", "text": text})
        c.records.append({"id": original, "text": text})
    rng.shuffle(c.records)
    return c
