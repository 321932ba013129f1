"""The commands' Options: the generated parsers keep the public flags, and every pipeline stage
reads the options of the command it stands for (a key of `[eval]` is a flag of `loom eval`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from test_pipeline import finetune_section, pipeline_text, write

from loom.cli import COMMANDS, build_parser, main
from loom.core.config import tree_from_dict

# `loom <command> --help` before the commands became Options classes (the public interface):
# (flags or positional metavar, type, action, nargs, choices, default, required)
EXPECTED_FLAGS = {
    "tokenizer train": [
        (("--input",), None, "Store", "+", None, None, True),
        (("--vocab-size",), "int", "Store", None, None, None, True),
        (("--out",), None, "Store", None, None, None, True),
        (("--text-field",), None, "Store", None, None, "text", False),
    ],
    "data tokenize": [
        (("--input",), None, "Store", "+", None, None, True),
        (("--tokenizer",), None, "Store", None, None, None, True),
        (("--out",), None, "Store", None, None, None, True),
        (("--val-fraction",), "float", "Store", None, None, 0.05, False),
        (("--seed",), "int", "Store", None, None, 0, False),
        (("--shard-tokens",), "int", "Store", None, None, 67108864, False),
        (("--text-field",), None, "Store", None, None, "text", False),
        (("--overwrite",), None, "StoreTrue", 0, None, False, False),
    ],
    "data prepare": [
        ("CONFIG", None, "Store", None, None, None, True),
    ],
    "data inspect": [
        ("OUT", None, "Store", None, None, None, True),
    ],
    "train": [
        ("CONFIG", None, "Store", None, None, None, True),
        (("--nproc",), "int", "Store", None, None, None, False),
        (("--max-restarts",), "int", "Store", None, None, 0, False),
        (("--nnodes",), "int", "Store", None, None, 1, False),
        (("--rdzv-endpoint",), None, "Store", None, None, "", False),
        (("--simulate",), "int", "Store", None, None, None, False),
        (("--rank",), "int", "Store", None, None, 0, False),
        (("--json",), None, "StoreTrue", 0, None, False, False),
    ],
    "finetune": [
        ("CONFIG", None, "Store", None, None, None, True),
        (("--nproc",), "int", "Store", None, None, None, False),
        (("--max-restarts",), "int", "Store", None, None, 0, False),
        (("--nnodes",), "int", "Store", None, None, 1, False),
        (("--rdzv-endpoint",), None, "Store", None, None, "", False),
    ],
    "torchrun": [],
    # issue 24: launch files for Slurm and Kubernetes
    "launch": [
        (None, None, "Store", None, ("slurm", "k8s"), None, True),
        ("CONFIG", None, "Store", None, None, None, True),
        (("--nodes",), "int", "Store", None, None, None, True),
        (("--gpus-per-node",), "int", "Store", None, None, None, True),
        (("--out",), None, "Store", None, None, None, False),
        (("--job-name",), None, "Store", None, None, None, False),
        (("--port",), "int", "Store", None, None, 29500, False),
        (("--max-restarts",), "int", "Store", None, None, 3, False),
        (("--time",), None, "Store", None, None, None, False),
        (("--cpus-per-node",), "int", "Store", None, None, None, False),
        (("--image",), None, "Store", None, None, None, False),
        (("--pvc",), None, "Store", None, None, None, False),
    ],
    "plan": [
        (("--spec",), None, "Store", None, None, None, False),
        (("--json",), None, "StoreTrue", 0, None, False, False),
        (("--calibrate",), None, "StoreTrue", 0, None, False, False),
        (("--model",), None, "Store", None, None, None, False),
        (("--gpu",), None, "Store", None, None, None, False),
        (("--gpus",), "int", "Store", None, None, None, False),
        (("--mem-gb",), "float", "Store", None, None, None, False),
        (("--tokens",), "float", "Store", None, None, None, False),
        (("--seq-len",), "int", "Store", None, None, None, False),
        (("--global-batch-tokens",), "float", "Store", None, None, None, False),
        (("--tp",), "int", "Store", None, None, None, False),
        (("--pp",), "int", "Store", None, None, None, False),
        (("--dp",), "int", "Store", None, None, None, False),
        (("--micro-batch",), "int", "Store", None, None, None, False),
        (("--zero",), "int", "Store", None, None, None, False),
        (("--virtual-stages",), "int", "Store", None, None, None, False),
        (("--recompute",), None, "Store", None, ("none", "selective", "full"), None, False),
        (("--offload",), None, "Store", None, ("none", "optimizer", "params"), None, False),
        (("--precision",), None, "Store", None, ("bf16", "fp16", "fp8", "fp32"), None, False),
        (("--finetune",), None, "Store", None, ("full", "lora", "qlora"), None, False),
        (("--framework",), None, "Store", None, ("loom", "pytorch", "megatron"), None, False),
        (("--activation-offload",), None, "StoreTrue", 0, None, False, False),
        (("--offload-nvme",), None, "StoreTrue", 0, None, False, False),
        (("--unbuilt",), None, "StoreTrue", 0, None, False, False),
        (("--host-mem-gb",), "float", "Store", None, None, None, False),
        (("--largest",), None, "StoreTrue", 0, None, False, False),
        (("--simulate",), None, "StoreTrue", 0, None, False, False),
        (("--rank",), "int", "Store", None, None, 0, False),
    ],
    "convert": [
        ("SRC", None, "Store", None, None, None, True),
        (("--out",), None, "Store", None, None, None, True),
        (("--format",), None, "Store", None, ("hf", "loom"), None, True),
        (("--dtype",), None, "Store", None, ("fp32", "bf16"), "fp32", False),
        (("--merge",), None, "StoreTrue", 0, None, False, False),
    ],
    "eval": [
        ("MODEL", None, "Store", None, None, None, True),
        (("--tasks",), None, "Store", "+", None, None, True),
        (("--json",), None, "StoreTrue", 0, None, False, False),
        (("--few-shot",), "int", "Store", None, None, 0, False),
        (("--limit",), "int", "Store", None, None, None, False),
        (("--seq-len",), "int", "Store", None, None, None, False),
        (("--max-tokens",), "int", "Store", None, None, 32, False),
        (("--seed",), "int", "Store", None, None, 0, False),
        (("--quantize",), None, "Store", None, ("int8",), None, False),
        # added with the Options of issue 18: [eval] batch_tokens had no flag
        (("--batch-tokens",), "int", "Store", None, None, 4096, False),
    ],
    "generate": [
        ("RUN_DIR", None, "Store", None, None, None, True),
        (("--prompt",), None, "Store", None, None, None, True),
        (("--max-tokens",), "int", "Store", None, None, 100, False),
        (("--temperature",), "float", "Store", None, None, 0.8, False),
        (("--top-k",), "int", "Store", None, None, 50, False),
        (("--top-p",), "float", "Store", None, None, 0.95, False),
        (("--seed",), "int", "Store", None, None, None, False),
    ],
    "run": [
        ("PIPELINE", None, "Store", None, None, None, True),
        (("--run_dir", "--run-dir"), None, "Store", None, None, None, False),
        (("--dry-run",), None, "StoreTrue", 0, None, False, False),
    ],
    "status": [
        ("RUN_DIR", None, "Store", None, None, None, True),
    ],
    "report": [
        ("RUN_DIR", None, "Store", None, None, None, True),
    ],
    "serve": [
        ("MODEL", None, "Store", None, None, None, True),
        (("--host",), None, "Store", None, None, "127.0.0.1", False),
        (("--port",), "int", "Store", None, None, 8000, False),
        (("--api-key",), None, "Store", None, None, None, False),
        (("--served-name",), None, "Store", None, None, None, False),
        (("--max-batch",), "int", "Store", None, None, 32, False),
        (("--max-queue",), "int", "Store", None, None, 256, False),
        (("--step-tokens",), "int", "Store", None, None, 256, False),
        (("--block-size",), "int", "Store", None, None, 16, False),
        # added with issue 22: prefix caching, speculative decoding, int4
        (("--prefix-cache", "--no-prefix-cache"), None, "BooleanOptional", 0, None, True, False),
        (("--speculate",), None, "Store", None, None, None, False),
        (("--speculate-tokens",), "int", "Store", None, None, 4, False),
        (("--kv-cache-mb",), "int", "Store", None, None, None, False),
        # issue 22: an int8 KV cache
        (("--kv-dtype",), None, "Store", None, ("auto", "int8"), "auto", False),
        (("--dtype",), None, "Store", None, ("fp32", "bf16"), None, False),
        (("--quantize",), None, "Store", None, ("int8", "int4"), None, False),
        (("--adapter",), None, "Append", None, None, (), False),
        (("--tp",), "int", "Store", None, None, 1, False),
    ],
}


def leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every leaf command's parser by its words: `train`, `data prepare`, ..."""

    def walk(parser: argparse.ArgumentParser, words: str) -> dict[str, argparse.ArgumentParser]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return {words: parser}
        out: dict[str, argparse.ArgumentParser] = {}
        for name, sub in subs[0].choices.items():
            out.update(walk(sub, f"{words} {name}".strip()))
        return out

    return walk(build_parser(), "")


def flags(parser: argparse.ArgumentParser) -> set[tuple[object, ...]]:
    return {
        (
            tuple(a.option_strings) if a.option_strings else a.metavar,
            getattr(a.type, "__name__", None),
            type(a).__name__.strip("_").replace("Action", ""),
            a.nargs,
            tuple(a.choices) if a.choices else None,
            tuple(a.default) if isinstance(a.default, list) else a.default,
            a.required,
        )
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction)
    }


def dests(words: str) -> set[str]:
    parser = leaf_parsers()[words]
    return {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def test_generated_parsers_keep_every_flag() -> None:
    parsers = leaf_parsers()
    assert set(parsers) == set(EXPECTED_FLAGS)
    for words, expected in EXPECTED_FLAGS.items():
        assert flags(parsers[words]) == set(expected), words


def test_every_registered_command_has_options_and_run() -> None:
    import importlib

    for words, module_name, _ in COMMANDS:
        module = importlib.import_module(f"loom.commands.{module_name}")
        assert dataclasses.is_dataclass(module.Options), words
        assert callable(module.run), words


def keys(options: object) -> set[str]:
    return {str(f.metadata.get("key", f.name)) for f in dataclasses.fields(options)}  # type: ignore[arg-type]


def test_pipeline_stages_and_commands_share_their_options(corpus_dir: Path, tmp_path: Path) -> None:
    """Load a pipeline with every stage; each stage's options are its command's, key for flag."""
    from loom.commands import eval as eval_command
    from loom.commands import serve as serve_command
    from loom.data.prepare import TokenizerSection
    from loom.pipeline.load import load_pipeline
    from loom.pipeline.stages.training import LaunchSection

    extra = finetune_section(corpus_dir, tmp_path, steps=2)
    extra += '\n[serve]\nport = 8124\nadapters = { sft = "run/finetune" }\n'
    path = write(tmp_path, pipeline_text(corpus_dir, extra=extra), tmp_path / "run")
    pipe = load_pipeline(path)
    stages = {s.name: s for s in pipe.stages}
    assert set(stages) == {"data", "tokenizer", "pretrain", "finetune", "eval", "export", "serve"}

    # eval and serve: the very Options class of the command, every flag a key and back
    assert type(stages["eval"].options) is eval_command.Options
    assert keys(eval_command.Options) == dests("eval")
    assert type(stages["serve"].options) is serve_command.Options
    assert keys(serve_command.Options) == dests("serve")  # `--adapter NAME=PATH` <-> adapters
    assert stages["serve"].options.adapters == {"sft": str(tmp_path / "run" / "finetune")}
    # pretrain/finetune: `[STAGE] config` and `[STAGE.launch]` are the launch flags; --simulate
    # (with --rank, --json) runs one fake step instead of training, which no stage does
    launch = {"config"} | keys(LaunchSection)
    assert dests("train") - {"simulate", "rank", "json"} == launch
    assert dests("finetune") == launch
    # export is `loom convert` with SRC named model and --out the stage's folder
    export = keys(type(stages["export"].options))
    assert dests("convert") - {"src", "out"} == export - {"model"}
    # [tokenizer] is `loom data prepare`'s [tokenizer] table; [data] is its CONFIG
    assert type(stages["tokenizer"].options) is TokenizerSection
    assert dests("data prepare") == {"config"}


def test_eval_batch_tokens_flag_reaches_the_options() -> None:
    from loom.cli import command_module
    from loom.commands.options import from_args

    module = command_module("eval")
    parser = build_parser(["eval"])
    args = parser.parse_args(["eval", "m", "--tasks", "t", "--batch-tokens", "512"])
    options = from_args(module.Options, args)
    assert options.batch_tokens == 512 and options.tasks == ["t"] and options.limit is None
    assert tree_from_dict(module.Options, {"batch_tokens": 512}).batch_tokens == 512


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "m", "--max-batch", "0"], "--max-batch must be at least 1"),
        (["serve", "m", "--adapter", "nopath"], "--adapter 'nopath': write NAME=PATH"),
        (["finetune", "c.toml", "--max-restarts", "2"], "--max-restarts needs --nproc N"),
        (["train", "c.toml", "--nproc", "1", "--nnodes", "2"], "--rdzv-endpoint HOST:PORT"),
        (["train", "c.toml", "--nnodes", "2", "--rdzv-endpoint", "h:1"], "needs --nproc N"),
        (["finetune", "c.toml", "--nproc", "1", "--nnodes", "0"], "--nnodes 0: give 1 or more"),
    ],
)
def test_options_are_validated_once_with_the_flag_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
