"""`loom generate`: sample text from a trained model."""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.options import option


@dataclass
class Options:
    run_dir: str = option(
        "", positional=True, metavar="RUN_DIR", help="run folder or checkpoint folder"
    )
    prompt: str = option("", required=True)
    max_tokens: int = option(100)
    temperature: float = option(0.8)
    top_k: int = option(50)
    top_p: float = option(0.95)
    seed: int | None = option(None)


def run(options: Options) -> int:
    from loom.eval.generate import generate_text

    text = generate_text(
        options.run_dir,
        options.prompt,
        options.max_tokens,
        options.temperature,
        options.top_k,
        options.top_p,
        options.seed,
    )
    print(options.prompt + text)
    return 0
