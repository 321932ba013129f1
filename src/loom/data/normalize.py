"""Text normalisation before filtering and deduplication.

Unicode NFC; control characters removed (tab and newline kept); line endings unified to
"\\n"; whitespace runs collapsed: trailing spaces dropped, runs of spaces or tabs inside a line
made one space (leading indentation is kept, so code survives), three or more newlines made
two. Optional mojibake repair with `ftfy`.

Chinese options: `join_cjk_lines` removes a line break between two CJK characters (text
wrapped at a fixed width breaks Chinese words in two, and the break is no space in Chinese);
`chinese = "t2s"` or `"s2t"` converts traditional to simplified characters or back with OpenCC's
configurations of those names (characters and variant phrases; regional vocabulary such as
軟體/软件 stays as it is), so one corpus, its deduplication and its tokenizer see one script.
OpenCC's own package (native, ~30 M characters/s) was chosen over the pure-Python
opencc-python-reimplemented (0.6 M characters/s, and it installs a module of the same name).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")
_INNER_SPACE = re.compile(r"(?<=\S)[ \t\u00a0]{2,}(?=\S)|(?<=\S)[\t\u00a0](?=\S)")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+$", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff01-\uff60\u3000-\u303f"
_CJK_LINE_BREAK = re.compile(rf"(?<=[{_CJK}])[ \t]*\n[ \t]*(?=[{_CJK}])")


@dataclass
class NormalizeConfig:
    nfc: bool = True
    remove_control: bool = True
    unify_line_endings: bool = True
    collapse_whitespace: bool = True
    fix_mojibake: bool = False  # ftfy: "cafÃ©" -> "café"
    join_cjk_lines: bool = False  # "中\n文" -> "中文" (text wrapped inside Chinese words)
    chinese: Literal["none", "t2s", "s2t"] = "none"  # OpenCC: traditional <-> simplified


@functools.cache
def _opencc(config: str) -> Any:
    import opencc

    return opencc.OpenCC(config)


def normalize(text: str, cfg: NormalizeConfig) -> str:
    if cfg.fix_mojibake:
        import ftfy

        text = ftfy.fix_text(text, normalization="NFC" if cfg.nfc else None)
    elif cfg.nfc:
        text = unicodedata.normalize("NFC", text)
    if cfg.unify_line_endings:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.remove_control:
        text = _CONTROL.sub("", text)
    if cfg.join_cjk_lines:
        text = _CJK_LINE_BREAK.sub("", text)
    if cfg.chinese != "none":
        text = _opencc(cfg.chinese).convert(text)
    if cfg.collapse_whitespace:
        text = _INNER_SPACE.sub(" ", text)
        text = _TRAILING_SPACE.sub("", text)
        text = _BLANK_LINES.sub("\n\n", text)
        text = text.strip("\n")
    return text
