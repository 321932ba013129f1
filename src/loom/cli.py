"""The `loom` command: a registry of the commands in loom.commands and their dispatch. Bad
input ends in one `error:` line and exit code 2 (--debug: traceback)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from loom.commands.options import add_flags, from_args, join_overrides
from loom.core.errors import LoomError, record_for_launcher
from loom.core.log import logger, setup_logging

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1

# (words on the command line, module in loom.commands, one-line help), in `loom --help` order;
# only the chosen command's module is imported (`loom plan` must not import torch)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("tokenizer", "train"), "tokenizer_train", "train a byte-level BPE tokenizer on text files"),
    (("data", "tokenize"), "data_tokenize", "tokenize text/JSONL files into packed shards"),
    (
        ("data", "prepare"),
        "data_prepare",
        "clean, filter, deduplicate, mix and tokenize sources into shards",
    ),
    (("data", "inspect"), "data_inspect", "print the funnel of a prepared folder"),
    (("train",), "train", "pretrain a model"),
    (("finetune",), "finetune", "fine-tune a released model: full, LoRA, QLoRA or DPO"),
    (
        ("torchrun",),
        "torchrun",
        "torchrun, with restarts that work on gloo (for multi-node launches)",
    ),
    (("launch",), "launch", "write an sbatch script or a Kubernetes PyTorchJob for N nodes"),
    (("plan",), "plan", "predict memory, step time, MFU and days; search the best parallel layout"),
    (("convert",), "convert", "Hugging Face model folders to Loom run folders and back"),
    (("eval",), "eval", "perplexity, multiple-choice and generation scores of a model"),
    (("generate",), "generate", "sample text from a trained model"),
    (("run",), "run", "run a pipeline: data, tokenizer, pretrain, finetune, eval, export, serve"),
    (("status",), "status", "the stages of a pipeline run folder"),
    (("report",), "report", "write a self-contained HTML report of a run or pipeline folder"),
    (("serve",), "serve", "an OpenAI-compatible HTTP server with continuous batching"),
]
GROUPS = {"tokenizer": "train a tokenizer", "data": "turn text into token shards"}


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every failure reads the same way."""

    def error(self, message: str) -> NoReturn:
        raise LoomError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"loom.commands.{name}")


def build_parser(argv: Sequence[str] | None = None) -> _Parser:
    """Every command's parser; given `argv`, only its command gets its flags (and import)."""
    parser = _Parser(
        prog="loom",
        description="Prepare data, train and sample language models.",
        allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    top = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction[_Parser]] = {}
    for words, name, help in COMMANDS:
        where = top
        if len(words) == 2:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=GROUPS[words[0]])
                groups[words[0]] = group.add_subparsers(
                    dest="action", required=True, parser_class=_Parser
                )
            where = groups[words[0]]
        if argv is not None and list(argv[: len(words)]) != list(words):
            where.add_parser(words[-1], help=help)  # listed in --help, not chosen
            continue
        module = command_module(name)
        sub = where.add_parser(
            words[-1],
            help=help,
            description=getattr(module, "DESCRIPTION", None),
            add_help=getattr(module, "ADD_HELP", True),
        )
        add_flags(sub, module.Options)
        sub.set_defaults(module=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    worker = os.environ.get("TORCHELASTIC_ERROR_FILE") is not None
    quiet = worker and os.environ.get("RANK", "0") != "0"  # only rank 0 logs
    setup_logging(debug, quiet=quiet)
    try:
        if argv[:1] == ["torchrun"]:  # every other argument is torchrun's
            torchrun = command_module("torchrun")
            return torchrun.run(torchrun.Options(args=argv[1:]))
        args, extra = build_parser(argv).parse_known_args(argv)
        module = command_module(args.module)
        takes_overrides = getattr(module, "TAKES_OVERRIDES", False)
        if extra and not takes_overrides:
            raise LoomError(f"unrecognized arguments: {' '.join(extra)}")
        more = {"overrides": join_overrides(extra)} if takes_overrides else {}
        return module.run(from_args(module.Options, args, **more))
    except LoomError as e:
        if debug:
            logger.exception("bad input")
        print(f"error: {e}", file=sys.stderr)
        if worker:  # the launcher reads this and names the rank and the reason
            record_for_launcher(e)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if worker:
            record_for_launcher(e)
        if debug:
            raise
        print(
            f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
