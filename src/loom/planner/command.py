"""`loom plan`: a spec file or flags in, the best layout (or the given one) out."""

from __future__ import annotations

import argparse
import json
from typing import Any

from loom.core.errors import LoomError
from loom.planner.report import print_table, to_json
from loom.planner.search import plan
from loom.planner.spec import FRAMEWORKS, load_spec, parse_spec

STRATEGY_FLAGS = {
    "tp": "tp",
    "pp": "pp",
    "dp": "dp",
    "micro_batch": "micro_batch",
    "recompute": "recompute",
    "zero": "zero_stage",
    "offload": "offload",
    "virtual_stages": "virtual_stages",
}
CHOICE_FLAGS = {"precision": "precision", "finetune": "finetune", "framework": "framework"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spec", metavar="FILE", help="JSON spec: model, hardware, strategy?, training?"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON answer")
    parser.add_argument(
        "--calibrate", action="store_true", help="measure this machine and save a profile"
    )
    parser.add_argument("--model", help="a preset name (see README)")
    parser.add_argument("--gpu", help="a GPU from the table, e.g. h100, a100, rtx4090, or 'this'")
    parser.add_argument("--gpus", type=int, metavar="N", help="number of devices")
    parser.add_argument("--mem-gb", type=float, help="memory per device, GB (overrides the table)")
    parser.add_argument("--tokens", type=float, help="training tokens, for days and device-hours")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--global-batch-tokens", type=float, help="tokens per optimizer step")
    for flag in ("tp", "pp", "dp", "micro-batch", "zero", "virtual-stages"):
        parser.add_argument(f"--{flag}", type=int, help="fix this degree (else: searched)")
    parser.add_argument("--recompute", choices=("none", "selective", "full"))
    parser.add_argument("--offload", choices=("none", "optimizer", "params"))
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp8", "fp32"))
    parser.add_argument("--finetune", choices=("full", "lora", "qlora"))
    parser.add_argument("--framework", choices=FRAMEWORKS)
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="run one step of the layout on fake tensors and compare (imports torch)",
    )
    parser.add_argument("--rank", type=int, default=0, metavar="R", help="with --simulate")


def spec_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as a spec: parse_spec reads both the same way."""
    if not args.model or not args.gpu or not args.gpus:
        raise LoomError("loom plan needs --spec FILE, or --model, --gpu and --gpus")
    hardware: dict[str, Any] = {"gpu": args.gpu, "n_gpus": args.gpus}
    if args.mem_gb:
        hardware["gpu_mem_gb"] = args.mem_gb
    raw: dict[str, Any] = {"model": args.model, "hardware": hardware}
    training = {
        "tokens": args.tokens,
        "seq_len": args.seq_len,
        "global_batch_tokens": args.global_batch_tokens,
    }
    training = {k: v for k, v in training.items() if v is not None}
    if training:
        raw["training"] = training
    fixed = {key: getattr(args, flag) for flag, key in STRATEGY_FLAGS.items()}
    fixed = {k: v for k, v in fixed.items() if v is not None}
    choices = {key: getattr(args, flag) for flag, key in CHOICE_FLAGS.items()}
    choices = {k: v for k, v in choices.items() if v is not None}
    if fixed:
        raw["strategy"] = {**fixed, **choices}
    elif choices:
        raw["search"] = choices
    return raw


def run(args: argparse.Namespace) -> None:
    if args.calibrate:
        from loom.planner.calibrate import calibrate

        calibrate()
        return
    spec = load_spec(args.spec) if args.spec else parse_spec(spec_from_flags(args))
    best, ranked = plan(spec)
    if args.simulate:
        from loom.train.simulate import print_plan_simulation  # torch only from here on

        if not args.json:
            print_table(spec, best, ranked)
        print_plan_simulation(
            spec, ranked, args.rank, to_json(spec, best, ranked) if args.json else None
        )
    elif args.json:
        print(json.dumps(to_json(spec, best, ranked), indent=2))
    else:
        print_table(spec, best, ranked)
    if not best.fits:
        raise LoomError(
            f"this layout needs {best.memory.total / 2**30:.1f} GiB per device but the devices "
            f"have {spec.hardware.memory_gb:g} GB; run `loom plan` without a strategy for one "
            "that fits"
        )
