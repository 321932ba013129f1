"""Build this rank's share of the model in the parallel layout, and run steps through it.

Order, all from outside the model's code: build on the meta device → cut into pipeline stages
(each stage is then treated as a model) → float8 → tensor/sequence parallel → activation
recomputation → compile → activation offload → FSDP/HSDP or DDP → materialise and initialise →
(optimizer, by the trainer). Initial values are drawn per parameter from (seed, name) on the
whole tensor and then sliced to the local shard, so every layout starts from exactly the
single-process model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from loom.core.config import Config
from loom.core.errors import LoomError
from loom.models.llama import Transformer, build_model, init_parameter_
from loom.parallel.activation_offload import ActivationStore, apply_activation_offload
from loom.parallel.compile import ForwardLoss, compile_forward_loss, forward_loss
from loom.parallel.context import ContextParallel, context_parallel_loss
from loom.parallel.data_parallel import DTYPES, apply_ddp, apply_fsdp
from loom.parallel.dims import V_SCHEDULES, ParallelDims
from loom.parallel.expert import apply_expert_parallel
from loom.parallel.float8 import convert_to_float8
from loom.parallel.pipeline import (
    build_schedule,
    build_stage_model,
    stage_layer_ranges,
    stages_of_rank,
)
from loom.parallel.recompute import apply_recompute, clean_name
from loom.parallel.tensor import apply_tensor_parallel

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ParallelModel:
    """The parts of the model on this rank and how to run a forward/backward through them."""

    parts: list[Transformer]
    dims: ParallelDims
    mesh: DeviceMesh | None
    loss_fn: LossFn
    autocast: AbstractContextManager[object]
    loss_parallel: bool = False
    schedule: _PipelineSchedule | None = None
    has_first_stage: bool = True
    has_last_stage: bool = True
    forward_loss: ForwardLoss | None = None
    forward_only_eval: bool = True
    activation_store: ActivationStore | None = None  # memory.activation_offload's host store
    context: ContextParallel | None = None  # parallel.cp: this rank's share of each sequence
    _loss_scale: float = field(default=1.0, repr=False)

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def dp_rank(self) -> int:
        if self.mesh is None:
            return 0
        replica = self.mesh.get_local_rank("dp_replicate")
        return replica * self.dims.dp_shard + self.mesh.get_local_rank("dp_shard")

    def _context(self) -> AbstractContextManager[object]:
        return loss_parallel() if self.loss_parallel else nullcontext()

    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Called by the schedule on each micro-batch of the last stage; what it returns is
        backpropagated, so it carries the accumulation scale and the 1/micro-batches mean."""
        loss_fn = self.loss_fn if self.context is None else self.context.loss
        return loss_fn(logits, targets) * (self._loss_scale / self.dims.microbatches)

    def forward_backward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        scale: float,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Backpropagate `scale` × the mean loss of this rank's sequences; return the unscaled
        loss (None on pipeline ranks without the last stage). `doc_ids` (packed documents)
        work without a pipeline only."""
        with self._context(), self.autocast:
            if self.schedule is None:
                assert self.forward_loss is not None
                loss = self.forward_loss(inputs, targets, doc_ids)
                (loss * scale).backward()
                return _local(loss.detach())
            return self._pipeline_step(inputs, targets, scale, train=True)

    def eval_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        with self._context(), self.autocast:
            if self.schedule is None:
                with torch.no_grad():
                    if self.context is not None:
                        assert self.forward_loss is not None
                        return _local(self.forward_loss(inputs, targets, doc_ids))
                    logits = self.parts[0](inputs, doc_ids=doc_ids)
                    return _local(self.loss_fn(logits, targets))
            if self.forward_only_eval:
                with torch.no_grad():
                    return self._pipeline_step(inputs, targets, 1.0, train=False)
            # V-shaped schedules cannot run forward-only (torch <= 2.13; older torch has no
            # forward-only mode at all): run the whole step and drop the gradients it leaves.
            loss = self._pipeline_step(inputs, targets, 1.0, train=True)
            for part in self.parts:
                part.zero_grad(set_to_none=True)
            return loss

    def _pipeline_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, scale: float, train: bool
    ) -> torch.Tensor | None:
        assert self.schedule is not None
        self._loss_scale = scale
        if self.context is not None:
            self.context.begin(None)
            inputs, targets = self.context.shard(inputs), self.context.shard(targets)
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        args = (inputs,) if self.has_first_stage else ()
        run(*args, target=targets, losses=losses)
        if not self.has_last_stage:
            return None
        # Each entry is loss · scale / micro-batches: their sum is `scale` × the mean loss.
        return torch.stack([_local(x.detach()) for x in losses]).sum() / scale

    def global_mean(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The mean over data-parallel ranks of a per-rank mean loss (the same on every rank)."""
        if self.mesh is None:
            assert loss is not None
            return loss
        counts = self.has_last_stage and self.mesh.get_local_rank("tp") == 0
        value = loss.float() if counts and loss is not None else torch.zeros(())
        value = value.to(_device_of(self.parts)).clone()
        dist.all_reduce(value)
        return value / (self.dims.dp * self.dims.cp)  # every cp rank holds a share of tokens

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over every shard and stage); return it before clipping."""
        # grouped by mesh: foreach kernels take DTensors of one mesh or plain tensors, not both
        by_mesh: dict[object, list[torch.Tensor]] = {}
        for p in (p for part in self.parts for p in part.parameters()):
            if p.grad is not None:
                key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
                by_mesh.setdefault(key, []).append(p)
        squares = torch.zeros((), device=_device_of(self.parts))
        for params in by_mesh.values():
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            squares = squares + _local(norm).float().to(squares.device) ** 2
        if self.dims.pp > 1 and self.mesh is not None:
            dist.all_reduce(squares, group=self.mesh.get_group("pp"))
        total = squares.sqrt()
        for params in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return total


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _device_of(parts: list[Transformer]) -> torch.device:
    buffer = next(iter(parts[0].buffers()))
    return buffer.device


def parallelize(
    cfg: Config,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    device: torch.device,
    loss_fn: LossFn,
    adapt: Callable[[nn.Module], None] | None = None,
    init: ParamInit | None = None,
    on_host: bool = False,
) -> ParallelModel:
    """This rank's model parts, sharded, initialised from `train.seed`, ready for an optimizer.

    Fine-tuning passes `adapt` (applied to each part on the meta device before any
    parallelism, e.g. LoRA) and `init` (fills each parameter instead of the pretraining
    initialisation; the base weights are loaded afterwards). `on_host` leaves the parameters
    in host memory for the caller to move (QLoRA quantizes each weight on its way there)."""
    p, t, memory = cfg.parallel, cfg.train, cfg.memory
    param_dtype = DTYPES[
        p.mixed_precision.param_dtype if p.mixed_precision.param_dtype != "auto" else t.precision
    ]
    use_fsdp = mesh is not None and (
        dims.dp_shard * dims.cp > 1
        or memory.offload == "params"
        or (dims.dp_replicate > 1 and (dims.tp > 1 or dims.pp > 1))
    )
    use_ddp = mesh is not None and dims.dp_replicate > 1 and not use_fsdp
    # FSDP casts parameters itself; otherwise bf16 runs under autocast.
    fsdp_casts = use_fsdp and param_dtype == torch.bfloat16
    autocast: AbstractContextManager[object] = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if t.precision == "bf16" and not fsdp_casts
        else nullcontext()
    )

    if dims.pp > 1:
        assert mesh is not None
        stage_ids = stages_of_rank(mesh.get_local_rank("pp"), dims, p.schedule)
        ranges = stage_layer_ranges(cfg.model.n_layers, dims.num_stages, p.split_points)
        parts = [build_stage_model(cfg.model, s, dims.num_stages, ranges[s]) for s in stage_ids]
    else:
        stage_ids = [0]
        parts = [build_model(cfg.model)]
    store = ActivationStore(device) if memory.activation_offload else None
    context = ContextParallel(mesh["cp"], t.seq_len) if dims.cp > 1 and mesh else None
    if store is not None and t.compile:
        raise LoomError(
            "memory.activation_offload runs the blocks eagerly (saved-tensor hooks do not reach "
            "into compiled graphs); set train.compile=false or memory.activation_offload=false"
        )

    for part in parts:
        if adapt is not None:
            adapt(part)
        if t.float8:
            convert_to_float8(part)
        if context is not None:
            context.apply(part)
        if dims.tp > 1:
            assert mesh is not None
            apply_tensor_parallel(part, mesh["tp"], p.sequence_parallel, p.loss_parallel)
        experts = set()
        if dims.ep > 1 and mesh is not None:  # over the FSDP ranks: dp_shard (× cp)
            experts = apply_expert_parallel(
                part, mesh["dp_shard_cp" if dims.cp > 1 else "dp_shard"]
            )
        apply_recompute(part, memory.recompute, memory.recompute_every)
        if t.compile and mesh is not None:
            for block in part.layers.values():
                block.compile()
        if store is not None:
            apply_activation_offload(part, store)
        if use_fsdp:
            assert mesh is not None
            shard = "dp_shard_cp" if dims.cp > 1 else "dp_shard"  # cp ranks hold the same
            dp_mesh = mesh["dp_replicate", shard] if dims.dp_replicate > 1 else mesh[shard]
            apply_fsdp(
                part,
                dp_mesh,
                param_dtype=param_dtype,
                reduce_dtype=DTYPES[p.mixed_precision.reduce_dtype],
                reshard_after_forward=p.fsdp_reshard_after_forward,
                offload_params=memory.offload == "params",
                ignored=experts,
            )
        elif use_ddp:
            assert mesh is not None
            apply_ddp(part, mesh["dp_replicate"])
        offloaded = memory.offload == "params" or on_host
        materialize(part, cfg, device, offloaded=offloaded, init=init)

    model = ParallelModel(
        parts=parts,
        dims=dims,
        mesh=mesh,
        loss_fn=loss_fn,
        autocast=autocast,
        loss_parallel=dims.tp > 1 and p.loss_parallel,
        has_first_stage=0 in stage_ids,
        has_last_stage=dims.num_stages - 1 in stage_ids,
        forward_only_eval=p.schedule not in V_SCHEDULES and hasattr(_PipelineSchedule, "eval"),
        activation_store=store,
        context=context,
    )
    if dims.pp > 1:
        assert mesh is not None
        model.schedule = build_schedule(
            parts, stage_ids, dims, p.schedule, device, mesh.get_group("pp"), model._pipeline_loss
        )
    else:
        # One process compiles forward and loss as one graph; under a mesh each block is compiled.
        single_graph = t.compile and mesh is None
        build = compile_forward_loss if single_graph else forward_loss
        model.forward_loss = build(parts[0], loss_fn)
        if context is not None:
            model.forward_loss = context_parallel_loss(parts[0], context)
    return model


ParamInit = Callable[[str, torch.Tensor], None]  # (name, whole tensor) -> fill it in place


@torch.no_grad()
def set_whole_parameter(param: torch.Tensor, name: str, fill: ParamInit) -> None:
    """Let `fill` write the whole value of `param`, and keep this rank's shard of it."""
    if isinstance(param, DTensor):
        local = param.to_local()
        whole = torch.empty(param.shape, dtype=param.dtype, device=local.device)
        fill(name, whole)
        shard = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
        local.copy_(shard.to_local())
    else:
        fill(name, param)


@torch.no_grad()
def materialize(
    part: nn.Module,
    cfg: Config,
    device: torch.device,
    offloaded: bool,
    init: ParamInit | None = None,
) -> None:
    """Allocate the meta-device part and give every parameter its layout-independent value."""
    part.to_empty(device="cpu" if offloaded else device)
    if init is None:

        def init(name: str, tensor: torch.Tensor) -> None:
            init_parameter_(cfg.model, name, tensor, cfg.train.seed)

    for name, param in part.named_parameters():
        set_whole_parameter(param, clean_name(name), init)
    for module in part.modules():
        if isinstance(module, Transformer):  # rotary tables live where compute happens
            for buffer in ("rope_cos", "rope_sin"):
                table = torch.empty_like(getattr(module, buffer), device=device)
                module.register_buffer(buffer, table, persistent=False)
            module.init_buffers()
