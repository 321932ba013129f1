"""`loom plan`: predict memory, step time, MFU and days; search the best parallel layout."""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.options import option
from loom.planner.spec import FRAMEWORKS

DESCRIPTION = "Give a spec file (--spec) or a model and hardware as flags."
_FIXED = "fix this degree (else: searched)"


@dataclass
class Options:
    spec: str | None = option(
        None, metavar="FILE", help="JSON spec: model, hardware, strategy?, training?"
    )
    json: bool = option(False, help="print the JSON answer")
    calibrate: bool = option(False, help="measure this machine and save a profile")
    model: str | None = option(None, help="a preset name (see README)")
    gpu: str | None = option(None, help="a GPU from the table, e.g. h100, a100, rtx4090, or 'this'")
    gpus: int | None = option(None, metavar="N", help="number of devices")
    mem_gb: float | None = option(None, help="memory per device, GB (overrides the table)")
    tokens: float | None = option(None, help="training tokens, for days and device-hours")
    seq_len: int | None = option(None)
    global_batch_tokens: float | None = option(None, help="tokens per optimizer step")
    tp: int | None = option(None, help=_FIXED)
    pp: int | None = option(None, help=_FIXED)
    dp: int | None = option(None, help=_FIXED)
    micro_batch: int | None = option(None, help=_FIXED)
    zero: int | None = option(None, help=_FIXED)
    virtual_stages: int | None = option(None, help=_FIXED)
    recompute: str | None = option(None, choices=("none", "selective", "full"))
    offload: str | None = option(None, choices=("none", "optimizer", "params"))
    precision: str | None = option(None, choices=("bf16", "fp16", "fp8", "fp32"))
    finetune: str | None = option(None, choices=("full", "lora", "qlora"))
    framework: str | None = option(None, choices=FRAMEWORKS)
    activation_offload: bool = option(False, help="fix: saved activations wait in host memory")
    offload_nvme: bool = option(False, help="fix: with --offload optimizer, its state on NVMe")
    unbuilt: bool = option(False, help="also plan offload tiers loom train does not run yet")
    host_mem_gb: float | None = option(None, help="host memory per node, GB (offload tiers)")
    largest: bool = option(False, help="the largest model that trains on --gpus x --gpu")
    simulate: bool = option(
        False, help="run one step of the layout on fake tensors and compare (imports torch)"
    )
    rank: int = option(0, metavar="R", help="with --simulate")


def run(options: Options) -> int:
    # Lazy: the registry imports every command module, and `loom --help` should stay fast.
    from loom.planner.command import run as plan

    if options.simulate:
        # Lazy: torch is imported only for --simulate, so plain `loom plan` never loads it.
        from loom.train.simulate import print_plan_simulation

        plan(options, print_plan_simulation)
    else:
        plan(options)
    return 0
