"""Byte-level BPE tokenizers with HF `tokenizers`, saved so `transformers` can load them too."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loom.core.errors import LoomError

EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
MAX_VOCAB = 1 << 21  # token ids are stored as uint32; beyond 2M merges training is impractical


def train_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (EOS,)
) -> Tokenizer:
    """Train a byte-level BPE (every byte is in the alphabet, so nothing is ever unknown)."""
    if vocab_size < 256 + len(special_tokens):
        raise LoomError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{256 + len(special_tokens)} (256 bytes + special tokens)"
        )
    if vocab_size > MAX_VOCAB:
        raise LoomError(f"--vocab-size {vocab_size} is larger than the supported {MAX_VOCAB:,}")
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            seen += 1
            yield text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise LoomError("no text to train the tokenizer on: every input was empty or unreadable")
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write `tokenizer.json` and a `tokenizer_config.json` that `AutoTokenizer` understands."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / TOKENIZER_FILE))
    hf_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": None,
        "pad_token": None,
        "model_max_length": 1_000_000_000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out / TOKENIZER_FILE


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load from a folder holding `tokenizer.json`, or from the file itself."""
    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise LoomError(
            f"no tokenizer at {p}: expected {file} (make one with `loom tokenizer train`)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust library raises plain Exceptions for bad files
        raise LoomError(f"{file} is not a valid tokenizer.json: {e}") from None


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Identity of a tokenizer: sha256 of its canonical serialization."""
    return "sha256:" + hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS)
    if token_id is None:
        raise LoomError(f"the tokenizer has no {EOS} token to separate documents")
    return token_id
