"""Pipeline parallelism: the model is cut into stages along its layers, each rank of the `pp`
mesh dimension holds one stage (or several, for the interleaved and V schedules), and a
`torch.distributed.pipelining` schedule runs micro-batches through them.

A stage is the model with the other stages' layers deleted: `layers` keeps the original keys,
so parameter names (and with them checkpoints) are the same as in the whole model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch.distributed import ProcessGroup
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    _PipelineSchedule,
    get_schedule_class,
)

from loom.core.errors import LoomError
from loom.models.llama import ModelConfig, Transformer, build_model
from loom.parallel.dims import V_SCHEDULES, ParallelDims


def stage_layer_ranges(n_layers: int, num_stages: int, split_points: list[int]) -> list[range]:
    """Layers of each stage: even splits, or cut before each layer in `split_points`."""
    bounds = (
        [0, *split_points, n_layers]
        if split_points
        else [n_layers * s // num_stages for s in range(num_stages + 1)]
    )
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def stages_of_rank(pp_rank: int, dims: ParallelDims, schedule: str) -> list[int]:
    """Loop placement (rank r holds r, r + pp, ...) or V placement (r and 2·pp − 1 − r)."""
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * dims.pp - 1 - pp_rank]
    return [pp_rank + i * dims.pp for i in range(dims.stages_per_rank)]


def build_stage_model(cfg: ModelConfig, stage: int, num_stages: int, layers: range) -> Transformer:
    """The model on the meta device with everything outside `stage` removed."""
    model = build_model(cfg)
    for key in list(model.layers.keys()):
        if int(key) not in layers:
            del model.layers[key]
    if stage != 0:
        model.embed_tokens = None
    if stage != num_stages - 1:
        model.norm = None
        model.lm_head = None
    return model


def build_schedule(
    parts: list[Transformer],
    stage_ids: list[int],
    dims: ParallelDims,
    schedule: str,
    device: torch.device,
    group: ProcessGroup,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> _PipelineSchedule:
    stages = [
        PipelineStage(part, stage_id, dims.num_stages, device, group=group)
        for part, stage_id in zip(parts, stage_ids, strict=True)
    ]
    cls = get_schedule_class(schedule)
    # scale_grads=False: the schedule would divide all gradients held, including those of
    # earlier accumulation steps; `loss_fn` scales each micro-batch's loss instead.
    try:
        if issubclass(cls, PipelineScheduleSingle):
            return cls(stages[0], dims.microbatches, loss_fn=loss_fn, scale_grads=False)
        return cls(stages, dims.microbatches, loss_fn=loss_fn, scale_grads=False)
    except (ValueError, AssertionError, RuntimeError) as e:
        raise LoomError(
            f"parallel.schedule={schedule} refuses pp={dims.pp}, "
            f"stages_per_rank={dims.stages_per_rank}, microbatches={dims.microbatches}: {e}"
        ) from None
