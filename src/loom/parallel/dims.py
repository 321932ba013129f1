"""The parallel layout: degrees resolved against the world size, checked, and turned into a mesh.

Everything that can be known before a process starts is checked here, so `loom train --nproc N`
refuses an impossible layout before launching anything, and each message names the degree to
change and a value that works.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from loom.core.config import Config
from loom.core.errors import LoomError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    stages_per_rank: int
    microbatches: int
    ep: int = 1  # experts split over the FSDP ranks (1, or dp_shard × cp)
    cp: int = 1  # each sequence split over this many ranks

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each reads a different part of the batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def mesh_dims(self) -> tuple[str, ...]:
        """MESH_DIMS, with `cp` before `tp` when sequences are split."""
        return MESH_DIMS if self.cp == 1 else (*MESH_DIMS[:-1], "cp", MESH_DIMS[-1])

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The mesh of `mesh_dims`; with `cp`, FSDP shards over `dp_shard_cp`, the dp_shard
        and cp dimensions flattened into one."""
        names = self.mesh_dims
        shape = tuple(getattr(self, name) for name in names)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        if self.cp > 1:
            mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        return mesh


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve(cfg: Config, world_size: int) -> ParallelDims:
    """Resolve `dp_shard=-1` and the pipeline defaults, and check the layout against the model,
    the batch and the world size."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    for name in ("dp_replicate", "tp", "pp"):
        if getattr(p, name) < 1:
            raise LoomError(f"parallel.{name}={getattr(p, name)} must be at least 1")
    if p.dp_shard == 0 or p.dp_shard < -1:
        raise LoomError(f"parallel.dp_shard={p.dp_shard} must be at least 1, or -1 for the rest")
    if p.cp < 1:
        raise LoomError(f"parallel.cp={p.cp} must be at least 1")
    others = p.dp_replicate * p.tp * p.pp * p.cp
    dp_shard = p.dp_shard
    if dp_shard == -1:
        if world_size % others:
            raise LoomError(
                f"{world_size} processes do not split into dp_replicate={p.dp_replicate} × "
                f"tp={p.tp} × pp={p.pp}{_cp(p.cp)} = {others}; launch a multiple of {others} "
                "processes or change those degrees"
            )
        dp_shard = world_size // others
    if others * dp_shard != world_size:
        fix = (
            f"set parallel.dp_shard={world_size // others} (or -1)"
            if world_size % others == 0
            else f"launch {others * dp_shard} processes"
        )
        raise LoomError(
            f"the layout needs dp_replicate × dp_shard × tp × pp = {p.dp_replicate} × {dp_shard} "
            f"× {p.tp} × {p.pp}{_cp(p.cp)} = {others * dp_shard} processes but {world_size} are "
            f"running; {fix}"
        )

    if p.tp > 1:
        heads = _divisors(m.n_kv_heads)
        if m.n_heads % p.tp or m.n_kv_heads % p.tp:
            raise LoomError(
                f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads} and "
                f"model.n_kv_heads={m.n_kv_heads}; use tp in {heads}"
            )
        if m.ffn_hidden % p.tp:
            raise LoomError(f"parallel.tp={p.tp} must divide model.ffn_hidden={m.ffn_hidden}")
        if p.loss_parallel and m.vocab_size % p.tp:
            raise LoomError(
                f"parallel.loss_parallel shards the vocabulary ({m.vocab_size}) over tp={p.tp}; "
                "make model.vocab_size a multiple of tp or set parallel.loss_parallel=false"
            )
        if p.sequence_parallel and t.seq_len % p.tp:
            raise LoomError(
                f"parallel.sequence_parallel splits train.seq_len={t.seq_len} over tp={p.tp}; "
                "use a multiple of tp or set parallel.sequence_parallel=false"
            )
        if t.float8:
            raise LoomError("train.float8 is not combined with parallel.tp > 1; set tp=1")

    dp = p.dp_replicate * dp_shard
    micro = t.micro_batch_size or t.batch_size
    if micro % dp:
        good = [d * dp for d in range(1, t.batch_size // dp + 1) if t.batch_size % (d * dp) == 0]
        raise LoomError(
            f"train.micro_batch_size={micro} sequences do not split over {dp} data-parallel "
            f"ranks; use a multiple of {dp}"
            + (f" that divides batch_size, e.g. {good}" if good else "")
        )

    stages_per_rank = p.stages_per_rank or (1 if p.schedule in SINGLE_STAGE_SCHEDULES else 2)
    microbatches = 1
    if p.pp > 1:
        if m.tie_embeddings:
            raise LoomError(
                "models with tied embeddings (model.tie_embeddings=true) are not split into "
                "pipeline stages (first and last stage share a weight); set parallel.pp=1"
            )
        if p.schedule in SINGLE_STAGE_SCHEDULES and stages_per_rank != 1:
            raise LoomError(
                f"parallel.schedule={p.schedule} runs one stage per rank; set "
                "parallel.stages_per_rank=1 or pick Interleaved1F1B / InterleavedZeroBubble"
            )
        if p.schedule in V_SCHEDULES and stages_per_rank != 2:
            raise LoomError(
                f"parallel.schedule={p.schedule} places exactly 2 stages per rank (a V); "
                "set parallel.stages_per_rank=2"
            )
        if p.schedule not in SINGLE_STAGE_SCHEDULES + V_SCHEDULES and stages_per_rank < 2:
            raise LoomError(
                f"parallel.schedule={p.schedule} interleaves several stages per rank; set "
                "parallel.stages_per_rank to 2 or more"
            )
        stages = p.pp * stages_per_rank
        if p.split_points:
            points = p.split_points
            if (
                len(points) != stages - 1
                or points != sorted(set(points))
                or not (points[0] > 0 and points[-1] < m.n_layers)
            ):
                raise LoomError(
                    f"parallel.split_points={points} must be {stages - 1} increasing layer "
                    f"indices between 1 and {m.n_layers - 1} (one per stage boundary)"
                )
        elif m.n_layers % stages:
            good = [d for d in _divisors(m.n_layers) if d % p.pp == 0]
            raise LoomError(
                f"pp={p.pp} × stages_per_rank={stages_per_rank} = {stages} stages do not divide "
                f"model.n_layers={m.n_layers}; use a stage count in {good} or give "
                "parallel.split_points"
            )
        microbatches = p.microbatches or stages
        local = micro // dp
        if local % microbatches:
            raise LoomError(
                f"each data-parallel rank gets {local} sequences per forward/backward "
                f"(train.micro_batch_size / dp), which do not split into "
                f"parallel.microbatches={microbatches}; use a divisor of {local} or a larger "
                "train.micro_batch_size"
            )
        if p.schedule == "DualPipeV" and microbatches < stages:
            raise LoomError(
                f"parallel.schedule=DualPipeV needs parallel.microbatches >= {stages} (stages)"
            )
    offload = cfg.memory.offload
    if offload == "params" and p.tp > 1:
        raise LoomError("memory.offload=params is not combined with parallel.tp > 1; set tp=1")
    if p.ep != 1:
        _check_expert_parallel(cfg, dp_shard)
    if p.cp > 1:
        _check_context_parallel(cfg)
    return ParallelDims(
        p.pp, p.dp_replicate, dp_shard, p.tp, stages_per_rank, microbatches, p.ep, p.cp
    )


def _cp(cp: int) -> str:
    return f" × cp={cp}" if cp > 1 else ""


def _check_context_parallel(cfg: Config) -> None:
    """Context parallelism as Loom runs it: two equal chunks of each sequence per rank."""
    p, t = cfg.parallel, cfg.train
    if t.seq_len % (2 * p.cp):
        raise LoomError(
            f"parallel.cp={p.cp} splits each sequence into 2 × cp = {2 * p.cp} equal chunks; "
            f"train.seq_len={t.seq_len} must be a multiple of {2 * p.cp}"
        )
    if cfg.memory.offload != "none":
        raise LoomError("parallel.cp > 1 does not run with memory.offload yet; set it to none")


def _check_expert_parallel(cfg: Config, dp_shard: int) -> None:
    """Expert parallelism as Loom runs it: every FSDP rank holds experts/ep whole experts."""
    p, moe = cfg.parallel, cfg.model.moe
    if p.ep < 1:
        raise LoomError(f"parallel.ep={p.ep} must be at least 1")
    if not moe.enabled:
        raise LoomError(
            f"parallel.ep={p.ep} splits a mixture of experts; the model has none (set "
            "moe.experts) or use parallel.ep=1"
        )
    if p.ep != dp_shard * p.cp:
        ranks = (
            f"parallel.dp_shard × parallel.cp = {dp_shard} × {p.cp}"
            if p.cp > 1
            else (f"parallel.dp_shard={dp_shard}")
        )
        raise LoomError(
            f"parallel.ep={p.ep} must equal {ranks}: the experts are split over the FSDP ranks "
            f"(set parallel.ep={dp_shard * p.cp}; experts over a subgroup of them are not built "
            "yet)"
        )
    if moe.experts % p.ep:
        good = [d for d in _divisors(moe.experts) if d > 1]
        raise LoomError(
            f"parallel.ep={p.ep} must divide moe.experts={moe.experts}; use ep in {good}"
        )
    if p.dp_replicate > 1 or cfg.memory.offload != "none":
        raise LoomError(
            "parallel.ep > 1 runs with parallel.dp_replicate=1 and memory.offload=none for now "
            "(replicated or offloaded experts are not built yet)"
        )
