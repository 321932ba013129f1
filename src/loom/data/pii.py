"""Optional PII redaction: e-mail addresses, IP addresses and phone numbers become placeholders."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])"
)
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
# A phone number: optional +country code, then groups of digits joined by separators, with
# at least 7 digits in all; bare runs of digits (years, ids) are not matched.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}(?![\w-])"
)


@dataclass
class PiiConfig:
    enabled: bool = False
    email: str = "<EMAIL>"  # placeholder; "" leaves e-mail addresses alone
    ip_address: str = "<IP_ADDRESS>"
    phone: str = "<PHONE>"


def _phone(match: re.Match[str]) -> bool:
    return 7 <= sum(ch.isdigit() for ch in match.group()) <= 15


def redact(text: str, cfg: PiiConfig, counts: Counter[str]) -> str:
    """Replace PII by placeholders, adding how many of each kind to `counts`."""
    if not cfg.enabled:
        return text
    for kind, pattern, placeholder in (
        ("email", _EMAIL, cfg.email),
        ("ip_address", _IPV4, cfg.ip_address),
        ("ip_address", _IPV6, cfg.ip_address),
    ):
        if placeholder:
            text, n = pattern.subn(placeholder, text)
            counts[kind] += n
    if cfg.phone:

        def sub(match: re.Match[str]) -> str:
            if _phone(match):
                counts["phone"] += 1
                return cfg.phone
            return match.group()

        text = _PHONE.sub(sub, text)
    return text
