"""The `loom` command: bad input ends in one `error:` line and exit code 2 (--debug: traceback)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from loom.core.errors import LoomError
from loom.core.log import logger, setup_logging

if TYPE_CHECKING:
    from loom.core.config import Config

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every failure reads the same way."""

    def error(self, message: str) -> NoReturn:
        raise LoomError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> _Parser:
    parser = _Parser(
        prog="loom",
        description="Prepare data, train and sample language models.",
        allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tok = commands.add_parser("tokenizer", help="train a tokenizer")
    tok_commands = tok.add_subparsers(dest="action", required=True, parser_class=_Parser)
    tok_train = tok_commands.add_parser(
        "train", help="train a byte-level BPE tokenizer on text files"
    )
    tok_train.add_argument(
        "--input", nargs="+", required=True, metavar="GLOB", help="text or JSONL files"
    )
    tok_train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    tok_train.add_argument("--out", required=True, metavar="DIR")
    tok_train.add_argument("--text-field", default="text", help="JSONL field holding the text")

    data = commands.add_parser("data", help="turn text into token shards")
    data_commands = data.add_subparsers(dest="action", required=True, parser_class=_Parser)
    data_tok = data_commands.add_parser(
        "tokenize", help="tokenize text/JSONL files into packed shards"
    )
    data_tok.add_argument("--input", nargs="+", required=True, metavar="GLOB")
    data_tok.add_argument(
        "--tokenizer", required=True, metavar="DIR", help="folder with tokenizer.json"
    )
    data_tok.add_argument("--out", required=True, metavar="DIR")
    data_tok.add_argument("--val-fraction", type=float, default=0.05, metavar="F")
    data_tok.add_argument("--seed", type=int, default=0)
    data_tok.add_argument(
        "--shard-tokens", type=int, default=1 << 26, metavar="N", help="tokens per shard"
    )
    data_tok.add_argument("--text-field", default="text", help="JSONL field holding the text")
    data_tok.add_argument(
        "--overwrite", action="store_true", help="replace existing shards in --out"
    )

    prep = data_commands.add_parser(
        "prepare",
        help="clean, filter, deduplicate, mix and tokenize sources into shards",
        description="Run a data pipeline config; override any key as --section.key=value.",
    )
    prep.add_argument("config", metavar="CONFIG", help="TOML pipeline config")
    inspect = data_commands.add_parser("inspect", help="print the funnel of a prepared folder")
    inspect.add_argument("out", metavar="OUT", help="a folder written by `loom data prepare`")

    train = commands.add_parser(
        "train",
        help="pretrain a model",
        description="Train from a TOML config; override any key as --section.key=value.",
    )
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a released model: full, LoRA, QLoRA or DPO",
        description="Fine-tune from a TOML config (model.path, data.path, finetune.method, "
        "lora.*, dpo.*, train.*, ...); override any key as --section.key=value.",
    )
    for command in (train, finetune):
        command.add_argument("config", metavar="CONFIG", help="TOML config file")
        command.add_argument(
            "--nproc",
            type=int,
            metavar="N",
            help="launch N worker processes on this machine (the [parallel] layout splits them)",
        )
        command.add_argument(
            "--max-restarts",
            type=int,
            default=0,
            metavar="K",
            help="with --nproc: restart all workers up to K times after a failure; each start "
            "resumes from the newest complete checkpoint",
        )
    train.add_argument(
        "--simulate",
        type=int,
        metavar="N",
        help="run one step of one rank of an N-rank job on fake tensors and a fake process "
        "group: its peak memory by category and the bytes of each collective",
    )
    train.add_argument("--rank", type=int, default=0, metavar="R", help="with --simulate")
    train.add_argument("--json", action="store_true", help="with --simulate: print JSON")

    commands.add_parser(
        "torchrun",
        help="torchrun, with restarts that work on gloo (for multi-node launches)",
        description="The arguments of torchrun, e.g. `loom torchrun --nnodes 2 "
        "--nproc-per-node 8 --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint HOST:29500 "
        "-m loom.train CONFIG`.",
        add_help=False,
    )

    from loom.planner.command import add_arguments

    plan = commands.add_parser(
        "plan",
        help="predict memory, step time, MFU and days; search the best parallel layout",
        description="Give a spec file (--spec) or a model and hardware as flags.",
    )
    add_arguments(plan)

    conv = commands.add_parser(
        "convert",
        help="Hugging Face model folders to Loom run folders and back",
        description="SRC: an HF model folder (config.json + safetensors), a .gguf file, or a "
        "Loom run folder or checkpoint (with --merge: a LoRA fine-tuning run).",
    )
    conv.add_argument("src", metavar="SRC")
    conv.add_argument("--out", required=True, help="a new folder")
    conv.add_argument("--format", required=True, choices=["hf", "loom"], dest="fmt")
    conv.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    conv.add_argument(
        "--merge", action="store_true", help="fold a LoRA run's adapters into the base weights"
    )

    ev = commands.add_parser(
        "eval",
        help="perplexity, multiple-choice and generation scores of a model",
        description="MODEL: a Loom run folder or checkpoint, an HF model folder or a .gguf file. "
        "TASK: a token-shard folder or a .txt/.jsonl text file (perplexity), a JSONL of "
        '{"context", "choices", "answer"} (multiple choice) or of {"prompt", "answer(s)"} '
        "(generation). A run folder's results are appended to its eval.jsonl.",
    )
    ev.add_argument("model", metavar="MODEL")
    ev.add_argument("--tasks", nargs="+", required=True, metavar="TASK")
    ev.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    ev.add_argument("--few-shot", type=int, default=0, metavar="K")
    ev.add_argument("--limit", type=int, default=None, metavar="N", help="first N examples")
    ev.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="N",
        help="perplexity window (default: min(context, 1024))",
    )
    ev.add_argument("--max-tokens", type=int, default=32, metavar="N", help="generation length")
    ev.add_argument("--seed", type=int, default=0, help="few-shot example choice")
    ev.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8 weight-only linear layers (torchao), to measure their quality cost",
    )

    gen = commands.add_parser("generate", help="sample text from a trained model")
    gen.add_argument("run_dir", metavar="RUN_DIR", help="run folder or checkpoint folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=None)
    run = commands.add_parser(
        "run",
        help="run a pipeline: data, tokenizer, pretrain, finetune, eval, export, serve",
        description="Run the stages of a pipeline TOML into <run_dir>/<stage>/; re-running skips "
        "stages that are done and unchanged and resumes an interrupted one. The planner's "
        "prediction for every training stage is printed first.",
    )
    run.add_argument("pipeline", metavar="PIPELINE", help="pipeline TOML file")
    run.add_argument(
        "--run_dir",
        "--run-dir",
        dest="run_dir",
        default=None,
        metavar="DIR",
        help="the run folder (default: the pipeline's run_dir)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the stages and the planner's predictions, run nothing",
    )
    status = commands.add_parser("status", help="the stages of a pipeline run folder")
    status.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `loom run`")
    rep = commands.add_parser(
        "report",
        help="write a self-contained HTML report of a run or pipeline folder",
        description="RUN_DIR: a training or fine-tuning run folder, or a pipeline folder "
        "(pipeline.json). Writes RUN_DIR/report.html (figures embedded) and prints its path.",
    )
    rep.add_argument("run_dir", metavar="RUN_DIR")
    srv = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with continuous batching",
        description="MODEL: an HF model folder, a .gguf file, or a Loom run folder or checkpoint "
        "(a LoRA run is served merged). Endpoints: /v1/models, /v1/completions, "
        "/v1/chat/completions, /health, /metrics. The API key may also come from $LOOM_API_KEY.",
    )
    srv.add_argument("model", metavar="MODEL")
    srv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    srv.add_argument("--served-name", default=None, help="model name (default: folder name)")
    srv.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    srv.add_argument("--max-queue", type=int, default=256, help="waiting sequences before 429")
    srv.add_argument(
        "--step-tokens", type=int, default=256, help="tokens per forward pass (prefill chunks)"
    )
    srv.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    srv.add_argument(
        "--kv-cache-mb", type=int, default=None, help="default 1024 on CPU, 80%% of free GPU memory"
    )
    srv.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    srv.add_argument("--quantize", choices=["int8"], default=None, help="weight-only (torchao)")
    srv.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a LoRA adapter (PEFT folder or Loom LoRA run) as model NAME; repeatable",
    )
    srv.add_argument("--tp", type=int, default=1, help="tensor-parallel workers (local)")
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
            from loom.parallel.launch import torchrun

            return torchrun(argv[1:])
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        takes_overrides = args.command in ("train", "finetune", "run") or (
            getattr(args, "action", "") == "prepare"
        )
        if extra and not takes_overrides:
            raise LoomError(f"unrecognized arguments: {' '.join(extra)}")
        _dispatch(args, _join_overrides(extra))
        return 0
    except LoomError as e:
        if debug:
            logger.exception("bad input")
        print(f"error: {e}", file=sys.stderr)
        if worker:  # the launcher reads this and names the rank and the reason
            _record_for_launcher(e)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if worker:
            _record_for_launcher(e)
        if debug:
            raise
        print(
            f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr
        )
        return EXIT_INTERNAL


def _record_for_launcher(error: BaseException) -> None:
    """Write the error file torchrun's agent reads, as its ErrorHandler would, but atomically:
    the agent may stop this worker mid-write, and a torn file crashes the agent itself."""
    import json
    import traceback

    path = os.environ["TORCHELASTIC_ERROR_FILE"]
    data = {
        "message": {
            "message": f"{type(error).__name__}: {error}",
            "extraInfo": {
                "py_callstack": traceback.format_exc(),
                "timestamp": str(int(time.time())),
            },
        }
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _join_overrides(extra: list[str]) -> list[str]:
    """Accept `--train.steps 200` as well as `--train.steps=200`."""
    joined: list[str] = []
    i = 0
    while i < len(extra):
        item = extra[i]
        if (
            item.startswith("--")
            and "=" not in item
            and i + 1 < len(extra)
            and not extra[i + 1].startswith("--")
        ):
            joined.append(f"{item}={extra[i + 1]}")
            i += 2
        else:
            joined.append(item)
            i += 1
    return joined


def _launch(
    cfg: Config,
    config: str,
    overrides: list[str],
    nproc: int,
    max_restarts: int,
    module: str = "loom.train",
) -> None:
    """Check the layout against N processes, then start them (see loom.parallel.launch)."""
    from loom.parallel.dims import resolve
    from loom.parallel.launch import launch

    if nproc < 1:
        raise LoomError(f"--nproc {nproc}: give at least 1 process")
    if not cfg.run_dir:
        raise LoomError(
            'run_dir is not set; add run_dir = "..." to the config or pass --run_dir=DIR'
        )
    if max_restarts < 0:
        raise LoomError(f"--max-restarts {max_restarts}: give 0 or more")
    resolve(cfg, nproc)
    launch(config, overrides, nproc, Path(cfg.run_dir), max_restarts, module)


def _dispatch(args: argparse.Namespace, extra: list[str]) -> None:
    if args.command == "tokenizer":
        from loom.core.tokenizer import save_tokenizer, train_bpe
        from loom.data.readers import DropReport, expand_inputs, read_documents

        drops = DropReport()
        texts = (d.text for d in read_documents(expand_inputs(args.input), drops, args.text_field))
        tokenizer = train_bpe(texts, args.vocab_size)
        path = save_tokenizer(tokenizer, args.out)
        logger.info("trained a %d-token BPE tokenizer: %s", tokenizer.get_vocab_size(), path)
        if drops.total:
            logger.warning("skipped %d input record(s): %s", drops.total, dict(drops.by_reason))
    elif args.command == "data" and args.action == "prepare":
        from loom.data.prepare import load_prepare_config, prepare

        prepare(load_prepare_config(args.config, extra))
    elif args.command == "data" and args.action == "inspect":
        from loom.data.inspect import print_funnel

        print_funnel(args.out)
    elif args.command == "data":
        from loom.data.tokenize import TokenizeOptions, tokenize_to_shards

        tokenize_to_shards(
            TokenizeOptions(
                inputs=args.input,
                tokenizer=args.tokenizer,
                out=args.out,
                val_fraction=args.val_fraction,
                seed=args.seed,
                shard_tokens=args.shard_tokens,
                text_field=args.text_field,
                overwrite=args.overwrite,
            )
        )
    elif args.command in ("train", "finetune"):
        from loom.core import distributed

        if args.command == "train":
            from loom.core.config import load_config
            from loom.train.trainer import train as run

            cfg: Any = load_config(args.config, extra)
            if args.simulate is not None:
                from loom.train.simulate import print_simulation

                print_simulation(cfg, args.simulate, args.rank, args.json)
                return
        else:
            from loom.finetune.config import load_finetune_config
            from loom.finetune.trainer import finetune as run

            cfg = load_finetune_config(args.config, extra)
        if args.nproc is not None:
            layout = cfg
            if args.command == "finetune":
                from loom.finetune.config import with_base_architecture

                layout = with_base_architecture(cfg)
            module = f"loom.{args.command}"
            _launch(layout, args.config, extra, args.nproc, args.max_restarts, module)
            return
        if args.max_restarts:
            raise LoomError(
                "--max-restarts needs --nproc N (or torchrun's own --max-restarts); "
                "a single process is restarted by running the command again"
            )
        result = run(cfg)
        if distributed.launched_by_torchrun():
            distributed.shutdown()
        if result.stopped_by and os.environ.get("RANK", "0") == "0":
            logger.warning(
                "stopped by %s after step %d with a checkpoint saved; run the same command to "
                "continue",
                result.stopped_by,
                result.step,
            )
            return
        if result.val_losses:
            last = max(result.val_losses)
            logger.info(
                "done: step %d, val_loss %.4f, run folder %s",
                result.step,
                result.val_losses[last],
                result.run_dir,
            )
    elif args.command == "plan":
        from loom.planner.command import run

        run(args)
    elif args.command == "convert":
        from loom.models.convert import convert

        convert(args.src, args.out, args.fmt, args.dtype, merge=args.merge)
    elif args.command == "eval":
        import json

        from loom.eval.evaluate import EvalOptions, evaluate, render

        opts = EvalOptions(
            few_shot=args.few_shot,
            limit=args.limit,
            seq_len=args.seq_len,
            max_tokens=args.max_tokens,
            seed=args.seed,
            quantize=args.quantize,
        )
        record, results = evaluate(args.model, args.tasks, opts)
        print(json.dumps(record, indent=2) if args.json else render(results))
    elif args.command == "run":
        from loom.pipeline import run_pipeline

        run_pipeline(args.pipeline, args.run_dir, dry_run=args.dry_run, overrides=extra)
    elif args.command == "status":
        from loom.pipeline import print_status

        print_status(args.run_dir)
    elif args.command == "report":
        from loom.report import write_report

        print(write_report(Path(args.run_dir)))
    elif args.command == "serve":
        from loom.serve.server import ServeOptions, serve

        adapters = {}
        for item in args.adapter:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise LoomError(f"--adapter {item!r}: write NAME=PATH")
            adapters[name] = path
        serve(
            args.model,
            ServeOptions(
                host=args.host,
                port=args.port,
                api_key=args.api_key,
                served_name=args.served_name,
                max_batch=args.max_batch,
                max_queue=args.max_queue,
                step_tokens=args.step_tokens,
                block_size=args.block_size,
                kv_cache_mb=args.kv_cache_mb,
                dtype=args.dtype,
                quantize=args.quantize,
                adapters=adapters,
                tp=args.tp,
            ),
        )
    elif args.command == "generate":
        from loom.eval.generate import generate_text

        text = generate_text(
            args.run_dir,
            args.prompt,
            args.max_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.seed,
        )
        print(args.prompt + text)


if __name__ == "__main__":
    sys.exit(main())
