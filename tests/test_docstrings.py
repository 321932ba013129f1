"""The standard-library docstring instruction set: shape, provenance, split and determinism."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loom.core.errors import LoomError
from loom.finetune.docstrings import build_docstring_dataset

NAME = re.compile(r"`([\w.]+)`")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def asked_about(record: dict) -> str:
    """The qualified name the question is about, e.g. "json.dumps"."""
    match = NAME.search(record["messages"][0]["content"])
    assert match, record
    return match.group(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docstrings")
    build_docstring_dataset(out)
    return out


def test_records_are_chat_messages(built: Path) -> None:
    records = read_jsonl(built / "train.jsonl") + read_jsonl(built / "val.jsonl")
    assert 300 <= len(records) <= 3000
    for record in records:
        assert list(record) == ["messages"]
        roles = [message["role"] for message in record["messages"]]
        assert roles == ["user", "assistant"]
        assert all(isinstance(m["content"], str) for m in record["messages"])
        assert len(record["messages"][1]["content"]) >= 20
    answers = [record["messages"][1]["content"] for record in records]
    assert len(set(answers)) == len(answers)


def test_answers_come_from_the_real_docstrings(built: Path) -> None:
    records = read_jsonl(built / "train.jsonl") + read_jsonl(built / "val.jsonl")
    by_name = {asked_about(record): record["messages"][1]["content"] for record in records}
    for name, function in [("json.dumps", json.dumps), ("textwrap.dedent", textwrap.dedent)]:
        answer = by_name[name]
        assert answer.startswith(f"`{name}(")
        first_sentence = re.split(r"\.\s", function.__doc__.strip())[0]
        words = re.findall(r"\w+", first_sentence)
        assert words and all(word in answer for word in words), (answer, words)


def test_split_is_disjoint_by_function_and_deterministic(built: Path, tmp_path: Path) -> None:
    train = {asked_about(r) for r in read_jsonl(built / "train.jsonl")}
    val = {asked_about(r) for r in read_jsonl(built / "val.jsonl")}
    assert train and val and not train & val
    again = build_docstring_dataset(tmp_path)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes()
    assert again.train_path == tmp_path / "train.jsonl"
    other_seed = build_docstring_dataset(tmp_path / "seed1", seed=1)
    assert other_seed.val_path.read_bytes() != (built / "val.jsonl").read_bytes()


def test_summary_counts_match_files(built: Path) -> None:
    summary = json.loads((built / "dataset.json").read_text())
    assert summary["train"] == len(read_jsonl(built / "train.jsonl"))
    assert summary["val"] == len(read_jsonl(built / "val.jsonl"))
    assert 0.05 < summary["val"] / (summary["train"] + summary["val"]) < 0.15
    assert "json" in summary["modules"] and summary["python"] == sys.version
    assert summary["dropped_short"] >= 0 and summary["duplicates"] >= 0


def test_long_answers_are_cut_and_bad_input_is_a_loom_error(tmp_path: Path) -> None:
    ds = build_docstring_dataset(tmp_path, modules=["json", "textwrap"], max_answer_chars=40)
    for record in read_jsonl(ds.train_path) + read_jsonl(ds.val_path):
        description = record["messages"][1]["content"].split("`: ", 1)[-1]
        assert len(description) <= 40 and description.endswith((".", "!", "?", "…"))
    with pytest.raises(LoomError, match="no_such_module"):
        build_docstring_dataset(tmp_path, modules=["no_such_module"])
    with pytest.raises(LoomError, match="val_fraction"):
        build_docstring_dataset(tmp_path, val_fraction=1.5)


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "loom.finetune.docstrings", "--out", str(out), "--seed", "3"],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads((out / "dataset.json").read_text())
    assert f"{out / 'train.jsonl'} ({summary['train']} examples)" in result.stdout
    assert f"{out / 'val.jsonl'} ({summary['val']} examples)" in result.stdout
