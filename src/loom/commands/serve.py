"""`loom serve`: an OpenAI-compatible HTTP server. Its options are the serving feature's
ServeJob (defaults, help and validation there), which the pipeline's `[serve]` reads too."""

from __future__ import annotations

from loom.serve.server import ServeJob as Options

DESCRIPTION = (
    "MODEL: an HF model folder, a .gguf file, or a Loom run folder or checkpoint "
    "(a LoRA run is served merged). Endpoints: /v1/models, /v1/completions, "
    "/v1/chat/completions, /health, /metrics. The API key may also come from $LOOM_API_KEY."
)
__all__ = ["DESCRIPTION", "Options", "run"]


def run(options: Options) -> int:
    from loom.serve.server import serve

    serve(options.model, options)
    return 0
