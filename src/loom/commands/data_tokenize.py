"""`loom data tokenize`: text/JSONL files into packed token shards."""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.options import option


@dataclass
class Options:
    input: list[str] = option(nargs="+", required=True, metavar="GLOB", default_factory=list)
    tokenizer: str = option("", required=True, metavar="DIR", help="folder with tokenizer.json")
    out: str = option("", required=True, metavar="DIR")
    val_fraction: float = option(0.05, metavar="F")
    seed: int = option(0)
    shard_tokens: int = option(1 << 26, metavar="N", help="tokens per shard")
    text_field: str = option("text", help="JSONL field holding the text")
    overwrite: bool = option(False, help="replace existing shards in --out")


def run(options: Options) -> int:
    from loom.data.tokenize import TokenizeOptions, tokenize_to_shards

    tokenize_to_shards(
        TokenizeOptions(
            inputs=options.input,
            tokenizer=options.tokenizer,
            out=options.out,
            val_fraction=options.val_fraction,
            seed=options.seed,
            shard_tokens=options.shard_tokens,
            text_field=options.text_field,
            overwrite=options.overwrite,
        )
    )
    return 0
