"""`loom tokenizer train`: a byte-level BPE tokenizer from text files."""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.log import logger
from loom.core.options import option


@dataclass
class Options:
    input: list[str] = option(
        nargs="+", required=True, metavar="GLOB", help="text or JSONL files", default_factory=list
    )
    vocab_size: int = option(0, required=True, metavar="N")
    out: str = option("", required=True, metavar="DIR")
    text_field: str = option("text", help="JSONL field holding the text")


def run(options: Options) -> int:
    from loom.core.tokenizer import save_tokenizer, train_bpe
    from loom.data.readers import DropReport, expand_inputs, read_documents

    drops = DropReport()
    docs = read_documents(expand_inputs(options.input), drops, options.text_field)
    tokenizer = train_bpe((d.text for d in docs), options.vocab_size)
    path = save_tokenizer(tokenizer, options.out)
    logger.info("trained a %d-token BPE tokenizer: %s", tokenizer.get_vocab_size(), path)
    if drops.total:
        logger.warning("skipped %d input record(s): %s", drops.total, dict(drops.by_reason))
    return 0
