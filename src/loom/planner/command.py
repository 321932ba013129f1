"""`loom plan`: a spec file or flags in, the best layout (or the given one) out."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from loom.core.errors import LoomError
from loom.planner.largest import largest
from loom.planner.report import print_table, to_json
from loom.planner.search import Plan, plan
from loom.planner.spec import PlanSpec, load_spec, parse_spec

STRATEGY_FLAGS = {
    "tp": "tp",
    "pp": "pp",
    "dp": "dp",
    "micro_batch": "micro_batch",
    "recompute": "recompute",
    "zero": "zero_stage",
    "offload": "offload",
    "virtual_stages": "virtual_stages",
    "activation_offload": "activation_offload",
    "offload_nvme": "offload_nvme",
}
LARGEST_SEQ_LEN = 4096  # --largest without --seq-len
# spec, ranked layouts, the rank to simulate, the plan's JSON (with --json) or None
Simulate = Callable[[PlanSpec, list[Plan], int, dict[str, Any] | None], None]
CHOICE_FLAGS = {"precision": "precision", "finetune": "finetune", "framework": "framework"}


def spec_from_flags(args: Any) -> dict[str, Any]:
    """The flags as a spec: parse_spec reads both the same way. With --largest the model is
    searched (the family of loom.planner.largest); only its sequence length is given."""
    if args.largest and args.model:
        raise LoomError("--largest searches the model size; drop --model")
    if not (args.model or args.largest) or not args.gpu or not args.gpus:
        raise LoomError("loom plan needs --spec FILE, or --model (or --largest), --gpu and --gpus")
    hardware: dict[str, Any] = {"gpu": args.gpu, "n_gpus": args.gpus}
    if args.mem_gb:
        hardware["gpu_mem_gb"] = args.mem_gb
    if args.host_mem_gb:
        hardware["host_mem_gb"] = args.host_mem_gb
    model = args.model or {"preset": "llama3-8b", "seq_len": args.seq_len or LARGEST_SEQ_LEN}
    raw: dict[str, Any] = {"model": model, "hardware": hardware}
    if args.unbuilt:
        raw["unbuilt"] = True
    training = {
        "tokens": args.tokens,
        "seq_len": args.seq_len,
        "global_batch_tokens": args.global_batch_tokens,
    }
    training = {k: v for k, v in training.items() if v is not None}
    if training:
        raw["training"] = training
    fixed = {key: getattr(args, flag) for flag, key in STRATEGY_FLAGS.items()}
    fixed = {k: v for k, v in fixed.items() if v not in (None, False)}  # a switch left off
    choices = {key: getattr(args, flag) for flag, key in CHOICE_FLAGS.items()}
    choices = {k: v for k, v in choices.items() if v is not None}
    if fixed:
        raw["strategy"] = {**fixed, **choices}
    elif choices:
        raw["search"] = choices
    return raw


def run(args: Any, simulate: Simulate | None = None) -> None:
    """`args`: loom.commands.plan.Options (the planner does not import the commands).

    `simulate` runs the layouts on fake tensors for `--simulate`; the command passes it in
    because it lives in loom.train, which imports the planner (the planner never imports it)."""
    if args.calibrate:
        # Lazy: calibrate imports torch, which plain `loom plan` never loads.
        from loom.planner.calibrate import calibrate

        calibrate()
        return
    spec = load_spec(args.spec) if args.spec else parse_spec(spec_from_flags(args))
    if args.largest:
        spec, best, ranked = largest(spec)
    else:
        best, ranked = plan(spec)
    if args.simulate:
        if simulate is None:
            raise LoomError("--simulate needs the simulator; run it through `loom plan`")
        if not args.json:
            print_table(spec, best, ranked)
        simulate(spec, ranked, args.rank, to_json(spec, best, ranked) if args.json else None)
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
