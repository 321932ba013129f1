"""`loom serve`: an OpenAI-compatible HTTP server. Its options are the serving feature's
ServeOptions (defaults, help and validation there) plus the model; `[serve]` reads the same."""

from __future__ import annotations

from dataclasses import dataclass

from loom.commands.options import option
from loom.serve.server import ServeOptions

DESCRIPTION = (
    "MODEL: an HF model folder, a .gguf file, or a Loom run folder or checkpoint "
    "(a LoRA run is served merged). Endpoints: /v1/models, /v1/completions, "
    "/v1/chat/completions, /health, /metrics. The API key may also come from $LOOM_API_KEY."
)


@dataclass
class Options(ServeOptions):
    model: str = option("", positional=True, metavar="MODEL")


def run(options: Options) -> int:
    from loom.serve.server import serve

    serve(options.model, options)
    return 0
