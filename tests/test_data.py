"""Tokenizer training, token shards + manifest, and the deterministic, resumable loader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import transformers
from conftest import TEST_VOCAB

from loom.core.errors import LoomError
from loom.core.tokenizer import EOS, load_tokenizer, tokenizer_hash
from loom.data.loader import TokenLoader
from loom.data.readers import DropReport, expand_inputs, read_documents
from loom.data.shards import TokenDataset
from loom.data.tokenize import TokenizeOptions, is_validation, tokenize_to_shards


def test_tokenizer_is_lossless_and_loads_in_transformers(
    tokenizer_dir: Path, corpus_dir: Path
) -> None:
    tok = load_tokenizer(tokenizer_dir)
    assert tok.get_vocab_size() == TEST_VOCAB
    text = (corpus_dir / sorted(p.name for p in corpus_dir.iterdir())[0]).read_text()
    text += "\nünïcödé ✓ 中文 \x00 tabs\tand  spaces"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text  # byte-level: nothing is unknown
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.eos_token == EOS


def test_manifest_tokens_equal_a_retokenization(
    data_dir: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    tok = load_tokenizer(tokenizer_dir)
    files = sorted(corpus_dir.glob("*.py"))
    expected = {"train": [0, 0], "val": [0, 0]}
    for path in files:
        split = "val" if is_validation(path.name, 0, 0.1) else "train"
        expected[split][0] += 1
        expected[split][1] += len(tok.encode(path.read_text(), add_special_tokens=False).ids) + 1
    for split, (docs, tokens) in expected.items():
        assert manifest["splits"][split]["documents"] == docs
        assert manifest["splits"][split]["tokens"] == tokens
    assert expected["val"][0] > 0 and expected["train"][0] > expected["val"][0]
    assert manifest["tokens"] == expected["train"][1] + expected["val"][1]
    assert manifest["tokenizer"]["hash"] == tokenizer_hash(tok)
    assert manifest["tokenizer"]["vocab_size"] == TEST_VOCAB
    assert len(manifest["splits"]["train"]["shards"]) > 1  # small shards in the fixture


def test_document_index_marks_each_document(data_dir: Path) -> None:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    eos = manifest["tokenizer"]["eos_id"]
    total_docs = 0
    for shard in manifest["splits"]["train"]["shards"]:
        tokens = np.fromfile(data_dir / shard["path"], dtype=manifest["dtype"])
        starts = np.load(data_dir / shard["index"])
        assert starts[0] == 0 and len(starts) == shard["documents"]
        assert (tokens[starts[1:] - 1] == eos).all() and tokens[-1] == eos
        assert (tokens == eos).sum() == shard["documents"]  # one end-of-text per document
        total_docs += len(starts)
    assert total_docs == manifest["splits"]["train"]["documents"]


def test_bad_records_are_counted_not_lost(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    lines = [
        json.dumps({"text": "a good document", "id": "doc-1"}),
        "{not json",
        json.dumps({"body": "wrong field"}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "another good one"}),
    ]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    (src / "b.txt").write_bytes(b"\xff\xfe not utf-8 \x80")
    (src / "c.txt").write_text("plain text document")
    manifest = tokenize_to_shards(
        TokenizeOptions(
            inputs=[f"{src}/*"],
            tokenizer=str(tokenizer_dir),
            out=str(tmp_path / "out"),
            val_fraction=0,
        )
    )
    assert manifest["documents"] == {"read": 7, "kept": 3, "dropped": 4}
    assert manifest["dropped"]["by_reason"] == {
        "malformed JSON": 1,
        "no string field 'text'": 1,
        "empty": 1,
        "not UTF-8": 1,
    }
    assert manifest["dropped"]["by_file"][str(src / "b.txt")] == {"not UTF-8": 1}


def test_ids_and_split_are_stable(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"text": "t", "id": 7}) + "\n" + json.dumps({"text": "u"}) + "\n")
    docs = list(read_documents([f], DropReport()))
    assert [d.id for d in docs] == ["7", "x.jsonl:2"]
    # The split depends on (seed, id) only; about the requested fraction lands in validation.
    chosen = [is_validation(f"doc-{i}", 3, 0.2) for i in range(5000)]
    assert chosen == [is_validation(f"doc-{i}", 3, 0.2) for i in range(5000)]
    assert 0.18 < sum(chosen) / 5000 < 0.22


def test_input_globs_must_match(tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="matches no files"):
        expand_inputs([f"{tmp_path}/*.none"])
    with pytest.raises(LoomError, match="is a folder"):
        expand_inputs([str(tmp_path)])


def test_existing_output_needs_overwrite(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    opts = TokenizeOptions(
        inputs=[f"{corpus_dir}/a*.py"], tokenizer=str(tokenizer_dir), out=str(tmp_path / "o")
    )
    tokenize_to_shards(opts)
    with pytest.raises(LoomError, match="--overwrite"):
        tokenize_to_shards(opts)
    opts.overwrite = True
    tokenize_to_shards(opts)


def test_loader_visits_every_sample_once_per_epoch(data_dir: Path) -> None:
    split = TokenDataset(data_dir).split("train")
    loader = TokenLoader(split, seq_len=64, seed=1)
    (n,) = loader.num_samples
    assert n == (split.num_tokens - 1) // 64
    first_epoch = loader.next_indices(n)[:, 1]
    assert sorted(first_epoch.tolist()) == list(range(n))
    assert loader.epoch == [1] and loader.cursor == [0]
    second = loader.next_indices(n)[:, 1]
    assert sorted(second.tolist()) == list(range(n)) and not np.array_equal(first_epoch, second)


def test_loader_samples_are_windows_of_the_stream(data_dir: Path) -> None:
    dataset = TokenDataset(data_dir)
    manifest = dataset.manifest
    stream = np.concatenate(
        [
            np.fromfile(data_dir / s["path"], dtype=manifest["dtype"])
            for s in manifest["splits"]["train"]["shards"]
        ]
    ).astype(np.int64)
    loader = TokenLoader(dataset.split("train"), seq_len=100, seed=0, shuffle=False)
    (n,) = loader.num_samples
    inputs, targets = loader.next_batch(n)  # includes windows crossing shard edges
    for i in range(n):
        assert inputs[i].tolist() == stream[i * 100 : i * 100 + 100].tolist()
        assert targets[i].tolist() == stream[i * 100 + 1 : i * 100 + 101].tolist()


def test_loader_state_resumes_the_same_sequence(data_dir: Path) -> None:
    split = TokenDataset(data_dir).split("train")
    straight = TokenLoader(split, 32, seed=5)
    expected = [straight.next_batch(7)[0] for _ in range(40)]  # crosses an epoch boundary
    first = TokenLoader(split, 32, seed=5)
    got = [first.next_batch(7)[0] for _ in range(15)]
    resumed = TokenLoader(split, 32, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.next_batch(7)[0] for _ in range(25)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
    with pytest.raises(LoomError, match="keep train.seq_len=32"):
        TokenLoader(split, 64, seed=5).load_state_dict(first.state_dict())


def test_truncated_or_missing_shards_are_refused(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    out = tmp_path / "d"
    tokenize_to_shards(
        TokenizeOptions(inputs=[f"{corpus_dir}/*.py"], tokenizer=str(tokenizer_dir), out=str(out))
    )
    shard = out / "train" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(LoomError, match="truncated or corrupt"):
        TokenDataset(out)
    shard.unlink()
    with pytest.raises(LoomError, match="is missing"):
        TokenDataset(out)
    with pytest.raises(LoomError, match="holds no token shards"):
        TokenDataset(tmp_path)
    with pytest.raises(LoomError, match="does not exist"):
        TokenDataset(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(LoomError, match="not valid JSON"):
        TokenDataset(tmp_path)


def test_output_does_not_depend_on_where_the_corpus_lives(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    digests = []
    for place in ("here", "somewhere/else"):
        src = tmp_path / place / "corpus"
        src.mkdir(parents=True)
        for path in sorted(corpus_dir.glob("*.py"))[:12]:
            (src / path.name).write_bytes(path.read_bytes())
        manifest = tokenize_to_shards(
            TokenizeOptions(
                inputs=[f"{src}/*.py"],
                tokenizer=str(tokenizer_dir),
                out=str(tmp_path / place / "out"),
                val_fraction=0.3,
            )
        )
        digests.append(
            {s: [sh["sha256"] for sh in v["shards"]] for s, v in manifest["splits"].items()}
        )
    assert digests[0] == digests[1] and digests[0]["val"]


def test_literal_end_of_text_in_a_document_is_text(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "a.txt").write_text('tokens = ["<|endoftext|>", "<pad>"]  # special markers\n')
    (tmp_path / "b.txt").write_text("a second document\n")
    manifest = tokenize_to_shards(
        TokenizeOptions(
            inputs=[f"{tmp_path}/*.txt"],
            tokenizer=str(tokenizer_dir),
            out=str(tmp_path / "o"),
            val_fraction=0,
        )
    )
    tokens = np.fromfile(
        tmp_path / "o" / manifest["splits"]["train"]["shards"][0]["path"], dtype=manifest["dtype"]
    )
    assert (tokens == manifest["tokenizer"]["eos_id"]).sum() == 2  # one per document, no more


def test_out_folder_is_never_clobbered(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    project = tmp_path / "project"
    (project / "train").mkdir(parents=True)
    (project / "train" / "model.py").write_text("precious")
    opts = TokenizeOptions(
        inputs=[f"{corpus_dir}/a*.py"],
        tokenizer=str(tokenizer_dir),
        out=str(project),
        overwrite=True,
    )
    with pytest.raises(LoomError, match="holds no Loom token shards"):
        tokenize_to_shards(opts)
    assert (project / "train" / "model.py").read_text() == "precious"
    # A failing --overwrite leaves the previous shards usable.
    good = tmp_path / "good"
    tokenize_to_shards(
        TokenizeOptions(inputs=[f"{corpus_dir}/a*.py"], tokenizer=str(tokenizer_dir), out=str(good))
    )
    before = TokenDataset(good).split("train").num_tokens
    (tmp_path / "empty.txt").write_text("   ")
    with pytest.raises(LoomError, match="no usable documents"):
        tokenize_to_shards(
            TokenizeOptions(
                inputs=[str(tmp_path / "empty.txt")],
                tokenizer=str(tokenizer_dir),
                out=str(good),
                overwrite=True,
            )
        )
    assert TokenDataset(good).split("train").num_tokens == before


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda m: m.pop("dtype"), "malformed (KeyError"),
        (lambda m: m.update(dtype="bogus"), "malformed"),
        (lambda m: m["splits"]["train"]["shards"][0].update(tokens="abc"), "malformed"),
        (lambda m: m["tokenizer"].update(vocab_size=100), "does not match"),
    ],
)
def test_tampered_manifest_is_refused(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, tamper, message: str
) -> None:
    out = tmp_path / "d"
    tokenize_to_shards(
        TokenizeOptions(inputs=[f"{corpus_dir}/a*.py"], tokenizer=str(tokenizer_dir), out=str(out))
    )
    manifest = json.loads((out / "manifest.json").read_text())
    tamper(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoomError, match=re.escape(message)):
        TokenDataset(out)


def test_tokenizer_training_needs_text_and_a_sane_size() -> None:
    from loom.core.tokenizer import train_bpe

    with pytest.raises(LoomError, match="no text to train"):
        train_bpe(iter([]), 300)
    with pytest.raises(LoomError, match="larger than the supported"):
        train_bpe(["text"], 5_000_000_000)


def test_an_empty_split_is_reported(
    tmp_path: Path, tokenizer_dir: Path, loom_logs: pytest.LogCaptureFixture
) -> None:
    """Three documents and a 5 % validation share: which split each lands in is a hash of its
    id; found here by the same hash, so the test knows an empty validation split comes."""
    names = [f"doc-{i}" for i in range(100)]
    train_only = [n for n in names if not is_validation(n, 0, 0.05)][:3]
    val_only = [n for n in names if is_validation(n, 0, 0.99)][:3]
    for case, ids, fraction, message in (
        ("no-val", train_only, 0.05, "no document fell into the validation split"),
        ("no-train", val_only, 0.99, "all 3 document(s) fell into the validation split"),
    ):
        src = tmp_path / case
        src.mkdir()
        (src / "a.jsonl").write_text(
            "".join(json.dumps({"text": f"text of {i}", "id": i}) + "\n" for i in ids)
        )
        loom_logs.clear()
        manifest = tokenize_to_shards(
            TokenizeOptions(
                inputs=[f"{src}/*"],
                tokenizer=str(tokenizer_dir),
                out=str(tmp_path / f"{case}-out"),
                val_fraction=fraction,
            )
        )
        assert manifest["documents"]["kept"] == 3
        warnings = [r.getMessage() for r in loom_logs.records if r.levelname == "WARNING"]
        assert any(message in w and "--val-fraction" in w for w in warnings), warnings
