"""The one exception type for bad input (the CLI prints its message as a single `error:` line),
and how a torchrun worker records an error for its launcher."""

from __future__ import annotations

import json
import os
import time
import traceback
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


def record_for_launcher(error: BaseException) -> None:
    """Write the error file torchrun's agent reads, as its ErrorHandler would, but atomically:
    the agent may stop this worker mid-write, and a torn file crashes the agent itself."""
    path = os.environ["TORCHELASTIC_ERROR_FILE"]
    data = {
        "message": {
            "message": f"{type(error).__name__}: {error}",
            "extraInfo": {
                "py_callstack": traceback.format_exc(),
                "timestamp": str(int(time.time())),
            },
        }
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
