"""Languages in the data pipeline: language ID on real Chinese and English, `[filters.<lang>]`
tables and `filters_for` precedence, the Chinese filters on real prose and on garbage that
whitespace words cannot tell from it, jieba segmentation of mixed text, OpenCC conversion."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import corpus
import pytest
import tomli_w

from loom.core.config import config_to_dict
from loom.core.errors import LoomError
from loom.data.filters import FilterConfig, QualityFilter, filters_for, validate_filters
from loom.data.language import LanguageDetector
from loom.data.normalize import NormalizeConfig, normalize
from loom.data.prepare import load_prepare_config
from loom.data.segment import words_of

HAN = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def chinese() -> list[str]:
    return [text for _, text in corpus.chinese_documents()]


@pytest.fixture(scope="module")
def english() -> list[str]:
    return [text for _, text in corpus.docstring_documents()]


@pytest.fixture(scope="module")
def detector() -> LanguageDetector:
    return LanguageDetector()


def shuffle_han(text: str, seed: int = 0) -> str:
    """The text with its Han characters shuffled: everything else stays in place."""
    chars = HAN.findall(text)
    random.Random(seed).shuffle(chars)
    it = iter(chars)
    return HAN.sub(lambda _: next(it), text)


def test_language_id_on_real_chinese_and_english(
    detector: LanguageDetector, chinese: list[str], english: list[str]
) -> None:
    # Measured: 174 of 175 Debian Reference sections (one is mostly a sed/perl session), and
    # every one of the 139 stdlib modules' docstrings.
    zh = Counter(detector.detect(t)[0] for t in chinese)
    assert zh["zh"] >= 0.97 * len(chinese), zh
    en = Counter(detector.detect(t)[0] for t in english)
    assert en["en"] == len(english), en
    # Traditional characters are Chinese too ("zh" whatever the script).
    s2t = NormalizeConfig(chinese="s2t")
    traditional = Counter(detector.detect(normalize(t, s2t))[0] for t in chinese[:60])
    assert traditional["zh"] >= 58, traditional
    # Deterministic, and no answer without letters.
    assert detector.detect(chinese[3]) == LanguageDetector().detect(chinese[3])
    assert detector.detect("12:30 -- ## 42 !!!") == ("", 0.0)


def test_a_long_document_is_classified_on_a_bounded_sample(
    detector: LanguageDetector, chinese: list[str], english: list[str]
) -> None:
    long_text = "\n\n".join([english[0][:2000], *chinese[:30]])
    assert len(detector.sample(long_text)) <= detector.sample_chars + 2
    # An English preamble does not decide alone: start, middle and end are sampled.
    assert detector.detect(long_text)[0] == "zh"


def test_jieba_words_of_mixed_text() -> None:
    text = "在Debian上用 apt-get install 安装软件包，然后运行 “sudo reboot”。"
    assert words_of(text, "jieba") == [
        "在",
        "Debian",
        "上",
        "用",
        "apt-get",
        "install",
        "安装",
        "软件包",
        "然后",
        "运行",
        "sudo",
        "reboot",
    ]
    # Traditional text is cut like its simplified form (jieba's dictionary is simplified).
    assert words_of("安裝軟體套件", "jieba") == words_of("安装软体套件", "jieba")
    assert words_of("日本語のテキスト abc", "chars") == [*"日本語のテキスト", "abc"]
    assert words_of("a b  c", "whitespace") == ["a", "b", "c"]


def test_chinese_filters_keep_real_prose_and_drop_garbage(chinese: list[str]) -> None:
    zh = QualityFilter(filters_for(FilterConfig(), "zh"))
    whitespace = QualityFilter(FilterConfig())
    kept = [t for t in chinese if zh.check(t) is None]
    # Measured: 167 of 175; the 8 dropped are tables of contents, ASCII tables and lists.
    assert len(kept) >= 160
    # Whitespace words drop nearly all the real prose (measured: 168 of 175)...
    assert sum(whitespace.check(t) is not None for t in chinese) > 0.9 * len(chinese)
    # ...and cannot tell shuffled characters from it: the same verdicts.
    shuffled = [shuffle_han(t) for t in kept]
    assert [whitespace.check(t) for t in shuffled] == [whitespace.check(t) for t in kept]
    # With jieba words every shuffled section goes, on its mean word length.
    assert Counter(zh.check(t) for t in shuffled) == {"mean_word_length": len(kept)}
    # Repeated lines and symbol soup (full-width "＃" and the Chinese ellipsis "……") go too.
    lines = kept[0].split("\n\n")[0]
    assert zh.check("\n".join([lines] * 10)) == "duplicate_lines"
    soup = "……".join(kept[1].split("，")) + "＃＃＃" * 40
    assert zh.check(soup) == "symbol_word_ratio"


def test_japanese_and_languages_without_stop_words_are_not_dropped_wholesale() -> None:
    ja = QualityFilter(filters_for(FilterConfig(min_words=10), "ja"))
    text = (
        "これは日本語の文章です。私たちは毎日新しいことを学びます。"
        "今日は天気がいいので、公園に行きました。子供たちが楽しそうに遊んでいました。"
    )
    assert ja.check(text) is None
    # Whitespace words make it one long "word", and no English stop words: dropped.
    assert QualityFilter(FilterConfig(min_words=1)).check(text) == "mean_word_length"
    # Swahili has no built-in stop words: the rule steps aside instead of dropping everything.
    sw = filters_for(FilterConfig(min_words=5), "sw")
    validate_filters(FilterConfig(language="sw", languages=["sw", "en"]))
    assert QualityFilter(sw).check("Habari za asubuhi, rafiki yangu mpendwa sana leo") is None


def write_config(tmp_path: Path, filters: str) -> Path:
    path = tmp_path / "prepare.toml"
    path.write_text(
        f'[[sources]]\nname = "web"\npaths = ["raw/*.jsonl"]\n\n{filters}', encoding="utf-8"
    )
    return path


def test_per_language_tables_load_apply_and_round_trip(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[filters]\nlanguages = ["zh", "en"]\nmin_words = 20\nmax_words = 5000\n\n'
        "[filters.zh]\nmin_words = 15\nmin_stop_words = 3\n\n"
        '[filters.en]\ndisable = ["stop_words"]\n',
    )
    cfg = load_prepare_config(path, ["--filters.zh.max_words=900"]).filters
    validate_filters(cfg)
    assert cfg.languages == ["zh", "en"]
    zh = filters_for(cfg, "zh")
    # [filters.zh] > built-in Chinese values > [filters] > FilterConfig defaults.
    assert (zh.min_words, zh.min_stop_words, zh.max_words) == (15, 3, 900)
    assert (zh.words, zh.min_mean_word_length) == ("jieba", 1.3)
    assert zh.max_mean_word_length == FilterConfig().max_mean_word_length
    assert (zh.language, zh.languages, zh.per_language) == ("zh", [], {})
    en = filters_for(cfg, "en")
    assert (en.min_words, en.disable, en.words) == (20, ["stop_words"], "whitespace")
    # A language without a table or built-in values gets [filters]; no answer is `language`.
    assert filters_for(cfg, "de").min_words == 20
    assert filters_for(cfg, "") == filters_for(cfg, "en")
    # A saved config loads back the same.
    saved = tmp_path / "saved.toml"
    saved.write_text(tomli_w.dumps(config_to_dict(load_prepare_config(path, []))))
    again = load_prepare_config(saved, []).filters
    assert again == load_prepare_config(path, []).filters
    assert filters_for(again, "zh") == filters_for(load_prepare_config(path, []).filters, "zh")


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ("[filters]\nmin_wordz = 3", r"unknown config key filters.min_wordz; did you mean"),
        ("[filters.zh]\nmin_wordz = 3", r"unknown config key filters.zh.min_wordz; did you mean"),
        ("[filters.zh]\nmin_words = 'many'", r"filters.zh.min_words must be an integer"),
        ("[filters.zh]\nlanguages = ['zh']", r"filters.zh.languages: set languages in \[filters\]"),
        ("[filters.zhh]\nmin_words = 3", r"'zhh' is not a language the detector knows.*'zh'"),
        ("[filters]\nlanguages = ['chinese']", r"filters.languages\[0\]='chinese' is not"),
        ("[filters.zh]\ndisable = ['min_word']", r"filters.zh.disable: unknown filter"),
        ("[filters.zh.en]\nmin_words = 3", r"unknown config key filters.zh.en"),
    ],
)
def test_bad_per_language_config_is_refused(tmp_path: Path, filters: str, message: str) -> None:
    with pytest.raises(LoomError, match=message):
        validate_filters(load_prepare_config(write_config(tmp_path, filters), []).filters)


def test_opencc_conversion_and_cjk_line_joining() -> None:
    assert normalize("软件包管理器", NormalizeConfig(chinese="s2t")) == "軟件包管理器"
    assert normalize("軟件包管理器", NormalizeConfig(chinese="t2s")) == "软件包管理器"
    wrapped = "这是一个被固定宽度\n换行的句子。\nEnglish\nlines stay apart."
    joined = normalize(wrapped, NormalizeConfig(join_cjk_lines=True))
    assert joined == "这是一个被固定宽度换行的句子。\nEnglish\nlines stay apart."
    assert normalize(wrapped, NormalizeConfig()) == wrapped
