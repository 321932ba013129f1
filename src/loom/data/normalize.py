"""Text normalisation before filtering and deduplication.

Unicode NFC; control characters removed (tab and newline kept); line endings unified to
"\\n"; whitespace runs collapsed: trailing spaces dropped, runs of spaces or tabs inside a line
made one space (leading indentation is kept, so code survives), three or more newlines made
two. Optional mojibake repair with `ftfy`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")
_INNER_SPACE = re.compile(r"(?<=\S)[ \t\u00a0]{2,}(?=\S)|(?<=\S)[\t\u00a0](?=\S)")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+$", re.M)
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass
class NormalizeConfig:
    nfc: bool = True
    remove_control: bool = True
    unify_line_endings: bool = True
    collapse_whitespace: bool = True
    fix_mojibake: bool = False  # ftfy: "cafÃ©" -> "café"


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
    if cfg.collapse_whitespace:
        text = _INNER_SPACE.sub(" ", text)
        text = _TRAILING_SPACE.sub("", text)
        text = _BLANK_LINES.sub("\n\n", text)
        text = text.strip("\n")
    return text
