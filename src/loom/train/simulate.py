"""One rank of an N-rank training job, simulated on fake tensors and a fake process group.

`loom train CONFIG --simulate N [--rank R]` resolves the layout exactly as N real processes
would, builds the real model and applies the real parallel layout (FSDP/HSDP, TP+SP, pipeline
stages, recompute, float8, offload) under `FakeTensorMode` with torch's `fake` distributed
backend, and runs one optimizer step through the trainer's own code: micro-batch loop (or
pipeline schedule), loss, backward, clipping and AdamW. Fake tensors hold no data, so a 405B
model on 16,384 ranks runs on a laptop; what comes out is that rank's peak memory by category
(the planner's keys) and the bytes each collective moves, to be compared with `loom plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from loom.core.config import Config, load_config
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.loss import cross_entropy
from loom.parallel.activation_offload import ActivationStore
from loom.parallel.dims import MESH_DIMS, ParallelDims, resolve
from loom.parallel.parallelize import ParallelModel, parallelize
from loom.parallel.pipeline import stages_of_rank
from loom.planner.collectives import Collective, collectives
from loom.planner.layout import config_overrides
from loom.planner.memory import CONTEXT_BYTES, FRAGMENTATION, GB
from loom.planner.report import describe
from loom.planner.spec import ModelShape, Strategy, model_from_config
from loom.planner.training import local_hardware, predicted_memory, strategy_for
from loom.train.optim import Optimizers

GIB = 2**30
c10d = torch.ops.c10d
functional = torch.ops._c10d_functional

# The collective ops (in-place c10d and functional) and the kind each one is.
_KINDS: dict[Any, str] = {
    c10d._allgather_base_.default: "all_gather",
    c10d.allgather_.default: "all_gather",
    c10d.allgather_into_tensor_coalesced_.default: "all_gather",
    c10d._reduce_scatter_base_.default: "reduce_scatter",
    c10d.reduce_scatter_.default: "reduce_scatter",
    c10d.reduce_scatter_tensor_coalesced_.default: "reduce_scatter",
    c10d.allreduce_.default: "all_reduce",
    c10d.allreduce_coalesced_.default: "all_reduce",
    c10d.broadcast_.default: "broadcast",
    c10d.send.default: "send",
    c10d.recv_.default: "recv",
    c10d.alltoall_.default: "all_to_all",
    c10d.alltoall_base_.default: "all_to_all",
    functional.all_gather_into_tensor.default: "all_gather",
    functional.reduce_scatter_tensor.default: "reduce_scatter",
    functional.all_reduce.default: "all_reduce",
    functional.all_reduce_.default: "all_reduce",
    functional.broadcast.default: "broadcast",
    functional.all_to_all_single.default: "all_to_all",
}


@dataclass
class SimulationResult:
    world_size: int
    rank: int
    layout: dict[str, Any]
    memory_gib: dict[str, float]
    collectives: list[Collective]
    param_bytes: int = 0  # this rank's persistent parameter bytes (its shards)
    unsharded_params: list[str] = field(default_factory=list)  # left whole by the layout

    def to_json(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "layout": self.layout,
            "memory_gib": self.memory_gib,
            "collectives": [asdict(c) for c in self.collectives],
        }


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, list | tuple):
        return sum(_nbytes(x) for x in t)
    return 0


class _CommCounter(TorchDispatchMode):
    """Counts every collective this rank issues, by kind and mesh dimension, with the bytes of
    the unsharded tensor of each call (all-gather output, reduce-scatter input, all-reduce
    tensor, send/recv tensor)."""

    def __init__(self, group_dims: dict[str, str]) -> None:
        super().__init__()
        self.group_dims = group_dims  # process-group name -> mesh dimension
        self.counts: dict[tuple[str, str], list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if any(t is DTensor for t in types):
            return NotImplemented
        kind = _KINDS.get(func)
        if kind is not None:
            self._record(func, kind, args)
        return func(*args, **(kwargs or {}))

    def _record(self, func: Any, kind: str, args: tuple[Any, ...]) -> None:
        if func.namespace == "_c10d_functional":
            tensor, group = args[0], args[-1]
            volume = _nbytes(tensor)
            if kind == "all_gather":
                volume *= args[1]  # group size
        else:
            boxed = next(a for a in args if isinstance(a, torch.ScriptObject))
            group = dist.ProcessGroup.unbox(boxed).group_name
            if kind == "all_gather":
                volume = _nbytes(args[0])  # output
            elif kind == "reduce_scatter":
                volume = _nbytes(args[1])  # input
            else:
                volume = _nbytes(args[0])
        name = self.group_dims.get(str(group), "world")
        entry = self.counts.setdefault((kind, name), [0, 0])
        entry[0] += 1
        entry[1] += volume

    def collectives(self) -> list[Collective]:
        return [
            Collective(kind, group, count, volume)
            for (kind, group), (count, volume) in sorted(self.counts.items())
        ]


def _group_dims(mesh: DeviceMesh) -> dict[str, str]:
    """Process-group name -> mesh dimension name (and FSDP's flattened dp_shard × cp one)."""
    dims = [*(mesh.mesh_dim_names or ())]
    if "cp" in dims:
        dims.append("dp_shard_cp")
    return {mesh.get_group(dim).group_name: dim for dim in dims}


@contextmanager
def _fake_world(world_size: int, rank: int) -> Iterator[None]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise LoomError("--simulate needs a fresh process; a process group is already running")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        # DTensor caches sharding decisions and redistribution plans by layout; their entries
        # hold this world's meshes, whose process groups are gone: a second simulation of
        # the same layout (another rank) would find them.
        from torch.distributed.tensor._redistribute import _gen_transform_infos
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache

        _clear_sharding_prop_cache()
        _gen_transform_infos.cache_clear()


@contextmanager
def _real_meshes() -> Iterator[None]:
    """DeviceMesh computes a rank's coordinates with data-dependent tensor ops; FSDP builds
    meshes (TP × DP) while the fake mode is on. Build those from real tensors."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    original = DeviceMesh.__init__

    def init(self: DeviceMesh, *args: Any, **kwargs: Any) -> None:
        with unset_fake_temporarily():
            original(self, *args, **kwargs)

    DeviceMesh.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeviceMesh.__init__ = original  # type: ignore[method-assign]


@contextmanager
def _assignable_params() -> Iterator[None]:
    """`Module.to_empty` swaps (torch.utils.swap_tensors) each fake parameter for its new
    one, which torch refuses: the fake mode keeps a weak reference to every fake parameter.
    FSDP and tensor parallelism replace the parameters by DTensors, which swap; a part left
    plain (one rank, DDP) gets its new parameters and buffers by assignment instead, as
    `_apply` does for real tensors."""
    original = torch.nn.Module.to_empty

    def to_empty(self: torch.nn.Module, *, device: Any, recurse: bool = True) -> torch.nn.Module:
        modules = list(self.modules() if recurse else [self])
        if any(isinstance(p, DTensor) for m in modules for p in m._parameters.values()):
            return original(self, device=device, recurse=recurse)
        made: dict[int, torch.nn.Parameter] = {}  # tied weights stay one parameter
        for m in modules:
            for key, p in m._parameters.items():
                if p is not None:
                    if id(p) not in made:
                        new = torch.empty_like(p, device=device)
                        made[id(p)] = torch.nn.Parameter(new, p.requires_grad)
                    m._parameters[key] = made[id(p)]
            for key, b in m._buffers.items():
                if b is not None:
                    m._buffers[key] = torch.empty_like(b, device=device)
        return self

    torch.nn.Module.to_empty = to_empty  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.to_empty = original  # type: ignore[method-assign]


def check_request(world_size: int, rank: int) -> None:
    if world_size < 1:
        raise LoomError(f"--simulate {world_size}: the world size must be at least 1")
    if not 0 <= rank < world_size:
        raise LoomError(f"--rank {rank} is not a rank of {world_size}; use 0 to {world_size - 1}")


def layout_of(dims: ParallelDims, rank: int) -> dict[str, Any]:
    """The layout's degrees and this rank's coordinate on each mesh dimension."""
    coords, rest = {}, rank
    for name in reversed(dims.mesh_dims):
        size = getattr(dims, name)
        coords[name] = rest % size
        rest //= size
    return {
        **{name: getattr(dims, name) for name in dims.mesh_dims},
        "stages_per_rank": dims.stages_per_rank,
        "microbatches": dims.microbatches,
        "coordinates": {name: coords[name] for name in dims.mesh_dims},
    }


def simulate(
    cfg: Config,
    world_size: int,
    rank: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> SimulationResult:
    """Run one training step of rank `rank` of a `world_size`-rank job on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    check_request(world_size, rank)
    if cfg.parallel.auto:
        raise LoomError(
            "--simulate runs the layout in [parallel]; set parallel.auto=false and give the "
            "degrees (loom plan finds them)"
        )
    if cfg.train.compile:
        raise LoomError("--simulate does not run torch.compile; set train.compile=false")
    moe = cfg.model.moe
    if moe.enabled and moe.capacity_factor == 0:
        # dropless groups are as long as the busiest expert's, which fake tensors cannot know
        logger.info("--simulate routes an MoE as if balanced: moe.capacity_factor=1.0")
        model_cfg = replace(cfg.model, moe=replace(moe, capacity_factor=1.0))
        cfg = replace(cfg, model=model_cfg)
    dims = resolve(cfg, world_size)
    device = torch.device("cpu")
    with _fake_world(world_size, rank):
        mesh = dims.build_mesh(device.type)
        with FakeTensorMode(allow_non_fake_inputs=True), _real_meshes(), _assignable_params():
            model = parallelize(cfg, dims, mesh, device, loss_fn or cross_entropy)
            optimizers = Optimizers(model.parts, cfg.optimizer, cfg.train.steps)
            unsharded = _unsharded_parameters(model, dims)
            param_bytes = sum(_local_bytes(p) for part in model.parts for p in part.parameters())
            # A first step creates the optimizer's state: the tracked step is a steady one.
            pipeline = _pipeline_counter(cfg, model, mesh)
            _step(cfg, model, optimizers, pipeline)
            pipeline.reset()
            memory, collectives = _tracked_step(cfg, model, optimizers, mesh, pipeline)
    if cfg.memory.offload == "params":
        # The fake run has one device (the CPU): FSDP's offloaded shards, their gradients and
        # AdamW's state live in host memory on a GPU, so they leave the device's total.
        host = memory["params"] + memory["grads"] + memory["optimizer"]
        memory = {**memory, "params": 0.0, "grads": 0.0, "optimizer": 0.0}
        memory["total"] -= host
    return SimulationResult(
        world_size,
        rank,
        layout_of(dims, rank),
        memory,
        collectives,
        param_bytes,
        unsharded,
    )


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _unsharded_parameters(model: ParallelModel, dims: ParallelDims) -> list[str]:
    """Parameters this rank holds whole although the layout has ranks to split them over."""
    if dims.dp_shard * dims.tp == 1:
        return []
    return [
        name
        for part in model.parts
        for name, p in part.named_parameters()
        if not isinstance(p, DTensor) or all(pl.is_replicate() for pl in p.placements)
    ]


def _step(cfg: Config, model: ParallelModel, optimizers: Optimizers, pipeline: _Pipeline) -> None:
    """The trainer's step: micro-batches, clipping, AdamW (fake batches of the real shape)."""
    t = cfg.train
    micro = t.micro_batch_size or t.batch_size
    local = micro // model.dims.dp
    accum = t.grad_accum_steps
    for part in model.parts:
        part.train()
    for _ in range(accum):
        if model.dims.pp > 1:
            pipeline.run(local, 1.0 / accum)
        else:
            tokens = torch.zeros(local, t.seq_len, dtype=torch.long)
            model.forward_backward(tokens, tokens, 1.0 / accum)
    model.clip_grad_norm_(cfg.optimizer.grad_clip or float("inf"))
    optimizers.step()


def _tracked_step(
    cfg: Config,
    model: ParallelModel,
    optimizers: Optimizers,
    mesh: DeviceMesh,
    pipeline: _Pipeline,
) -> tuple[dict[str, float], list[Collective]]:
    params = [p for part in model.parts for p in part.parameters()]
    tracker = _peak_tracker(params, model.activation_store)
    tracker.track_external(*model.parts, *optimizers.optimizers)
    counter = _CommCounter(_group_dims(mesh))
    with tracker, counter, _untracked_shape_propagation():
        _step(cfg, model, optimizers, pipeline)
    return tracker.categories(sum(_local_bytes(p) for p in params)), [
        *counter.collectives(),
        *pipeline.collectives(),
    ]


@contextmanager
def _untracked_shape_propagation() -> Iterator[None]:
    """DTensor derives an op's global output shape by running the op on fake tensors of the
    global shape (for loss-parallel cross-entropy, [tokens, vocab] in fp32: gigabytes). On a
    GPU rank those are fake and cost nothing; here they would run under the memory tracker
    and count as allocations. Run the derivation outside this rank's modes, as a GPU rank
    does (DTensor then makes its own fake mode)."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator
    from torch.utils._python_dispatch import _disable_current_modes

    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def propagate(self: ShardingPropagator, op_schema: Any) -> Any:
        with _disable_current_modes():
            return original(self, op_schema)

    ShardingPropagator._propagate_tensor_meta_non_cached = propagate  # type: ignore[method-assign]
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original  # type: ignore[method-assign]


@dataclass
class _Pipeline:
    """This rank's pipeline stages run by hand in the schedule's order, on fake tensors.

    torch's schedule objects agree on stage shapes through point-to-point messages and a
    data-dependent `.item()` that the fake process group cannot carry, so the order is
    replayed here and the messages are counted instead of sent: a stage other than the first
    receives its input (a fake activation that requires grad) and sends back its gradient; a
    stage other than the last sends its output and backpropagates a fake output gradient.

    Order, per schedule run of `microbatches` micro-batches (the operations are the unit the
    peak depends on: a forward keeps its saved activations until its backward):
    - GPipe: every forward, then every backward.
    - 1F1B: min(pp − stage, microbatches) warm-up forwards, then one backward and one forward
      while forwards remain, then the remaining backwards.
    - Several stages per rank (interleaved, V): the forwards go through the rank's stages in
      rounds of pp micro-batches (stage order), the backwards in reverse stage order; the
      warm-up is torch's Interleaved1F1B one, (stages_per_rank − 1)·pp + 2·(pp − 1 − rank)
      + 1 forwards, then one backward and one forward, then the remaining backwards. The V
      schedules' zero-bubble splitting of backward is not modelled: a peak no lower than
      theirs.
    FSDP runs as under torch's stages: gradients are accumulated unsharded and not reduced
    during the run, then each part reduces (and reshards) once at its end.
    """

    cfg: Config
    model: ParallelModel
    stage_ids: list[int]
    pp_rank: int
    sequence: int  # local sequence length of the activations between stages
    dtype: torch.dtype
    counts: dict[str, list[int]] = field(default_factory=dict)

    def reset(self) -> None:
        self.counts = {}

    def collectives(self) -> list[Collective]:
        return [Collective(kind, "pp", n, v) for kind, (n, v) in sorted(self.counts.items())]

    def _message(self, kind: str, t: torch.Tensor) -> None:
        entry = self.counts.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += _nbytes(t)

    def _share(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's share of the sequences (all of them without context parallelism)."""
        context = self.model.context
        return tokens if context is None else context.shard(tokens)

    def run(self, local_batch: int, scale: float) -> None:
        model, dims = self.model, self.model.dims
        size = local_batch // dims.microbatches
        seq_len = self.cfg.train.seq_len
        model._loss_scale = scale
        last_stage = dims.num_stages - 1
        fsdp = [p for p in model.parts if isinstance(p, FSDPModule)]
        for part in fsdp:
            part.set_is_last_backward(False)
            part.set_reshard_after_backward(False)
            part.set_requires_gradient_sync(False)
        saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        with model._context(), model.autocast:
            order = schedule_order(
                self.cfg.parallel.schedule, dims.pp, self.pp_rank, self.stage_ids, dims.microbatches
            )
            for op, k, mb in order:
                stage, part = self.stage_ids[k], model.parts[k]
                if op == "forward":
                    if stage == 0:
                        inputs = self._share(torch.zeros(size, seq_len, dtype=torch.long))
                    else:
                        shape = (size, self.sequence, self.cfg.model.dim)
                        inputs = torch.empty(shape, dtype=self.dtype, requires_grad=True)
                        self._message("recv", inputs)
                    out = part(inputs)
                    if stage == last_stage:
                        targets = self._share(torch.zeros(size, seq_len, dtype=torch.long))
                        out = model._pipeline_loss(out, targets)
                    else:
                        self._message("send", out)
                    saved[k, mb] = inputs, out
                else:
                    inputs, out = saved.pop((k, mb))
                    if stage == last_stage:
                        out.backward()
                    else:
                        grad = torch.empty_like(out)
                        self._message("recv", grad)
                        out.backward(grad)
                    if stage != 0:
                        self._message("send", inputs.grad)
        for part in fsdp:
            # What torch's stage does after the run (perform_reduce_grad).
            part.set_is_last_backward(True)
            part.set_reshard_after_backward(True)
            part.set_requires_gradient_sync(True)
            root = fully_shard.state(part)  # type: ignore[attr-defined]
            for state in root._state_ctx.all_states:
                for group in state._fsdp_param_groups:
                    group.post_backward()
            root._root_post_backward_final_callback()


def schedule_order(
    schedule: str, pp: int, pp_rank: int, stage_ids: list[int], microbatches: int
) -> list[tuple[str, int, int]]:
    """(forward | backward, index into `stage_ids`, micro-batch) in the order `_Pipeline` runs
    them (see its docstring)."""
    m, v = microbatches, len(stage_ids)
    forwards = [(k, mb) for k in range(v) for mb in range(m)]
    if v > 1:
        forwards = [(k, mb) for _, k, mb in sorted((mb // pp, k, mb) for k, mb in forwards)]
        warmup = (v - 1) * pp + 2 * (pp - 1 - pp_rank) + 1
    elif schedule == "GPipe":
        warmup = m
    else:
        warmup = pp - stage_ids[0]
    backwards = [(v - 1 - k, mb) for k, mb in forwards]
    warmup = min(warmup, len(forwards))
    ops = [("forward", k, mb) for k, mb in forwards[:warmup]]
    pending = forwards[warmup:]
    for k, mb in backwards:
        ops.append(("backward", k, mb))
        if pending:
            ops.append(("forward", *pending.pop(0)))
    return ops


def _pipeline_counter(cfg: Config, model: ParallelModel, mesh: DeviceMesh) -> _Pipeline:
    """The hand-run pipeline of this rank (empty without pipeline parallelism)."""
    dims = model.dims
    pp_rank = mesh.get_local_rank("pp")
    sp = dims.tp > 1 and cfg.parallel.sequence_parallel
    fsdp_casts = any(isinstance(p, FSDPModule) for p in model.parts)
    bf16 = cfg.train.precision == "bf16" and fsdp_casts
    return _Pipeline(
        cfg,
        model,
        stages_of_rank(pp_rank, dims, cfg.parallel.schedule) if dims.pp > 1 else [0],
        pp_rank,
        cfg.train.seq_len // dims.cp // (dims.tp if sp else 1),
        torch.bfloat16 if bf16 else torch.float32,
    )


def _peak_tracker(params: list[torch.Tensor], store: ActivationStore | None) -> Any:
    """torch's MemTracker, run over several micro-batches, noting which of this rank's own
    gradient shards are alive at the peak, and the bytes memory.activation_offload's host
    store holds then (the fake run has one device, the CPU: on a GPU they are host memory)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class PeakTracker(MemTracker):
        grads_at_peak = 0
        host_at_peak = 0

        def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
            # Each micro-batch (and pipeline micro-batch) calls the model again: start its
            # module statistics afresh; the peak over the step is kept.
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state: Any) -> None:
            # The step's peak only: MemTracker's own also scans every module for per-module
            # peaks at each operation, which nothing here reads (quadratic in the blocks).
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snapshot)
                    grads = (_local_bytes(p.grad) for p in params if p.grad is not None)
                    self.grads_at_peak = sum(grads)
                    self.host_at_peak = store.held_bytes if store is not None else 0

        def categories(self, param_bytes: int) -> dict[str, float]:
            """The planner's keys: persistent shards as params / grads / optimizer, saved
            tensors as activations, the rest (gathered weights and gradients, buffers,
            communication buffers, temporaries of backward) as other."""
            snap = next(iter(self.get_tracker_snapshot("peak").values()))
            total = snap[_TOTAL_KEY] - self.host_at_peak
            optimizer = snap[_MemRefType.OPT]
            activations = snap[_MemRefType.ACT] - self.host_at_peak
            grads = self.grads_at_peak
            other = total - param_bytes - grads - optimizer - activations
            values = {
                "params": param_bytes,
                "grads": grads,
                "optimizer": optimizer,
                "activations": activations,
                "other": other,
                "total": total,
            }
            return {k: v / GIB for k, v in values.items()}

    return PeakTracker()


def _tensor_memory(memory: Any) -> dict[str, float]:
    """A planner `Memory` in GiB, tensors only: its `other` also holds a fixed allowance for
    the CUDA context and NCCL (CONTEXT_BYTES) and the caching allocator's fragmentation,
    which fake tensors cannot see; both are taken out, so that the two compare like with
    like."""
    states = memory.params + memory.grads + memory.optimizer + memory.activations
    other = memory.other - CONTEXT_BYTES - FRAGMENTATION * states
    values = {
        "params": memory.params,
        "grads": memory.grads,
        "optimizer": memory.optimizer,
        "activations": memory.activations,
        "other": other,
        "total": states + other,
    }
    return {k: v / GIB for k, v in values.items()}


def planner_prediction(cfg: Config, world_size: int) -> tuple[dict[str, float], list[Collective]]:
    """The planner's memory (GiB, tensors only) and collectives for the same layout."""
    dims = resolve(cfg, world_size)
    # The fake ranks stand for GPUs: a GPU's runtime allowance (taken out again below), and
    # device memory apart from the host's.
    hw = replace(
        local_hardware(torch.device("cpu"), world_size),
        runtime_gb=CONTEXT_BYTES / GB,
        host_device=False,
    )
    model = model_from_config(cfg.model, cfg.train.seq_len)
    predicted = collectives(model, hw, strategy_for(cfg, dims))
    return _tensor_memory(predicted_memory(cfg, dims, hw)), predicted


def config_for_plan(model: ModelShape, s: Strategy) -> Config:
    """The `loom train` config that runs the planner's layout `s` of `model`: the planner's
    model and strategy fields, one by one, or a refusal naming the one Loom cannot run."""
    refusals = {
        "strategy.framework": (s.framework == "megatron", "Loom does not run Megatron"),
        "strategy.zero_stage": (s.zero_stage in (1, 2), "Loom runs ZeRO-3 (FSDP) or none"),
        "strategy.finetune": (s.finetune != "full", "simulated pretraining steps only"),
        "strategy.offload": (s.offload == "optimizer", "the host optimizer step is not simulated"),
        "strategy.precision": (s.precision == "fp16", "Loom trains in bf16 or fp32"),
        "strategy.schedule": (s.schedule == "ZeroBubble", "pick 1F1B or Interleaved1F1B"),
        "model.arch": (model.arch != "llama", "Loom builds Llama-style models"),
    }
    for name, (refused, why) in refusals.items():
        if refused:
            owner, field_name = name.split(".")
            value = getattr(model if owner == "model" else s, field_name)
            raise LoomError(f"--simulate: {name}={value} cannot be simulated: {why}")
    overrides = {
        "model.vocab_size": model.vocab,
        "model.dim": model.hidden,
        "model.n_layers": model.layers,
        "model.n_heads": model.heads,
        "model.n_kv_heads": model.kv_heads,
        "model.head_dim": model.head_dim,
        "model.ffn_hidden": model.ffn_hidden,
        "model.max_seq_len": model.seq_len,
        "model.tie_embeddings": str(model.tied).lower(),
        "train.device": "cpu",
        **config_overrides(model, s),
    }
    return load_config(None, [f"--{k}={v}" for k, v in overrides.items()])


def print_plan_simulation(
    spec: Any, ranked: list[Any], rank: int, plan_json: dict[str, Any] | None = None
) -> None:
    """`loom plan ... --simulate`: the planner's memory and collectives for the best layout
    Loom runs (the first of `ranked` that `config_for_plan` accepts) next to one simulated step
    of it on `rank`; with `plan_json` (--json), one JSON object holding the plan, the
    planner's tensors and collectives, and the simulation."""
    import json

    refusals = []
    for plan in ranked:
        try:
            cfg = config_for_plan(spec.model, plan.strategy)
            break
        except LoomError as e:
            refusals.append(f"{describe(plan)}: {e}")
    else:
        raise LoomError(
            f"{refusals[0]}; fix a layout Loom runs (e.g. --zero 3 or --zero 0, --cp 1)"
        )
    if refusals:
        logger.info("skipped layouts Loom cannot run: %s", "; ".join(refusals))
    s = plan.strategy
    result = simulate(cfg, s.devices, rank)
    memory = _tensor_memory(plan.memory)
    predicted = collectives(spec.model, spec.hardware, s)
    if plan_json is not None:
        planner = {"memory_gib": memory, "collectives": [asdict(c) for c in predicted]}
        out = {
            "plan": plan_json,
            "simulated_layout": describe(plan),
            "planner": planner,
            "simulated": result.to_json(),
        }
        print(json.dumps(out, indent=2))
        return
    print(f"{describe(plan)}: rank {rank} of {s.devices} simulated, one step")
    print("memory (GiB; tensors only: the planner's CUDA context and fragmentation left out):")
    print(f"{'':<14}" + "".join(f"{k:>12}" for k in memory))
    print(f"{'planner':<14}" + "".join(f"{v:>12.2f}" for v in memory.values()))
    print(f"{'simulated':<14}" + "".join(f"{v:>12.2f}" for v in result.memory_gib.values()))
    planned = {(c.kind, c.group): c for c in predicted}
    simulated = {(c.kind, c.group): c for c in result.collectives}
    print(
        f"{'collective':<16}{'group':<14}{'planner calls':>14}{'GiB':>10}"
        f"{'simulated calls':>17}{'GiB':>10}"
    )
    for key in sorted(planned.keys() | simulated.keys()):
        p, m = planned.get(key), simulated.get(key)
        cells = [
            f"{c.count if c else 0:>{w}}{(c.bytes if c else 0) / GIB:>10.3f}"
            for c, w in ((p, 14), (m, 17))
        ]
        print(f"{key[0]:<16}{key[1]:<14}" + "".join(cells))


def print_simulation(cfg: Config, world_size: int, rank: int, as_json: bool) -> None:
    """`loom train CONFIG --simulate N`: the simulated rank's memory and collectives."""
    import json

    result = simulate(cfg, world_size, rank)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    layout = result.layout
    degrees = " × ".join(f"{k} {layout[k]}" for k in MESH_DIMS if layout[k] > 1) or "1 rank"
    coords = ", ".join(f"{k} {v}" for k, v in layout["coordinates"].items())
    print(f"rank {rank} of {world_size} ({degrees}; coordinates {coords}), one step:")
    print("peak memory (GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in result.memory_gib.items()))
    print(f"{'collective':<16}{'group':<14}{'calls':>8}{'GiB':>12}")
    for c in result.collectives:
        print(f"{c.kind:<16}{c.group:<14}{c.count:>8}{c.bytes / GIB:>12.4f}")
