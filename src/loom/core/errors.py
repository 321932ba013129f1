"""The one exception type for bad input: the CLI prints its message as a single `error:` line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class LoomError(Exception):
    """A problem the user can fix; the message names the file or field and the fix."""


def read_json(path: Path, what: str) -> Any:
    """The JSON content of a file the user gave, or a LoomError naming it (`what` says what
    the file should be, e.g. "spec file")."""
    if not path.is_file():
        raise LoomError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise LoomError(f"{what} {path} is not valid JSON: {e}") from None
