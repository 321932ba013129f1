"""The config tree: dataclasses loaded from TOML, overridden by `--section.key=value`, validated.

Every error names the key and says how to fix it, before any compute is spent.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomli_w

from loom.core.errors import LoomError
from loom.core.model_config import ModelConfig
from loom.core.presets import get_preset

T = TypeVar("T")


@dataclass
class DataSource:
    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    """One prepared folder (`path`), or a weighted mixture of several (`[[data.mix]]`)."""

    path: str = ""  # a folder written by `loom data tokenize` or `loom data prepare`
    mix: list[DataSource] = field(default_factory=list)

    def sources(self) -> list[DataSource]:
        return self.mix or ([DataSource(self.path)] if self.path else [])


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = batch_size
    seq_len: int = 256
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    eval_interval: int = 50  # steps between validation-loss evaluations; 0 = only at the end
    eval_batches: int = 4  # validation micro-batches per evaluation
    compile: bool = False
    float8: bool = False  # train linear layers in float8 (torchao; fast on H100-class GPUs)
    force: bool = False  # start even when the planner predicts the layout will not fit
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 10
    decay_steps: int = 0  # length of the schedule; 0 = train.steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps between checkpoints (the final step is always saved)
    interval_minutes: float = 0.0  # also save when this much time passed since the last; 0 = off
    keep: int = 3  # newest complete checkpoints kept on disk
    # Stage the state in memory and write it in the background while training goes on
    # (`checkpoint.async` in TOML: `async` is a Python keyword).
    async_: bool = field(default=False, metadata={"key": "async"})


@dataclass
class ResilienceConfig:
    """What a run does about bad steps and hangs (see loom.train.resilience)."""

    max_bad_steps: int = 3  # consecutive skipped steps before rolling back to the last checkpoint
    spike_zscore: float = 0.0  # a loss this many standard deviations above the window's mean
    # is a spike; 0 = no spike detection
    spike_window: int = 50  # steps of recent losses the z-score is computed over
    spike_action: Literal["log", "skip"] = "log"  # skip: a spike counts as a bad step
    hang_timeout_s: float = 1800.0  # a step or checkpoint longer than this dumps the stacks of
    # every thread to <run_dir>/hangs/ and exits, so the launcher restarts; 0 = no watchdog
    straggler_factor: float = 1.5  # a rank whose own step time (compute + data wait) is above
    # this times the median of the ranks is slow; 0 = no straggler detection
    straggler_intervals: int = 3  # log intervals in a row a rank must be slow to be named
    straggler_action: Literal["log", "exclude"] = "log"  # exclude: on several nodes, every
    # rank saves a checkpoint and stops, the straggler's node stops its agent, and the other
    # agents restart without it (an elastic --nnodes MIN:MAX with restarts left)
    preflight: bool = True  # hardware health checks on every rank before the first step
    # (loom.train.health): a failed one stops the run naming the rank, host and device
    health_interval: int = 1000  # every N steps the device checks again (matmuls, NVML); a
    # failed check stops the run and moves the checkpoints written since the last passing one
    # to checkpoints/suspect/; 0 = never


@dataclass
class MetricsConfig:
    log_interval: int = 10
    tensorboard: bool = True
    progress: Literal["auto", "rich", "plain"] = "auto"  # auto = rich on a terminal
    # Each rank appends the (dataset, sample) ids it trains on to <run_dir>/samples/rank-R.jsonl
    # (to audit that every sample is seen once per epoch, across restarts and resizes).
    sample_log: bool = False


Schedule = Literal[
    "GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"
]


@dataclass
class MixedPrecisionConfig:
    """Dtypes FSDP uses: parameters all-gathered for compute, gradients reduce-scattered."""

    param_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 when train.precision=bf16
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"


@dataclass
class ParallelConfig:
    """Degrees of parallelism; their product is the number of processes (world size)."""

    dp_replicate: int = 1  # data-parallel replicas (DDP; HSDP with dp_shard > 1)
    dp_shard: int = -1  # FSDP degree; -1 = the rest of the world
    tp: int = 1  # tensor parallel degree
    sequence_parallel: bool = True  # with tp: shard norms and residuals along the sequence
    loss_parallel: bool = True  # with tp: cross-entropy on vocabulary-sharded logits
    pp: int = 1  # pipeline stages' ranks
    ep: int = 1  # expert parallelism (MoE): experts split over the dp_shard ranks (ep = dp_shard)
    cp: int = 1  # context parallelism: each sequence split over this many ranks
    schedule: Schedule = "1F1B"
    microbatches: int = 0  # pipeline micro-batches per forward/backward; 0 = number of stages
    stages_per_rank: int = 0  # 0 = 1, or 2 for the interleaved and V schedules
    split_points: list[int] = field(default_factory=list)  # first layer of stages 2, 3, ...
    fsdp_reshard_after_forward: bool = True
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    timeout_s: float = 600.0  # a collective waiting longer than this fails the run
    auto: bool = False  # take the planner's fastest layout for the world size


@dataclass
class MemoryConfig:
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_every: int = 1  # apply recomputation to every k-th layer only
    offload: Literal["none", "optimizer", "params"] = "none"
    activation_offload: bool = False  # each block's saved activations wait in host memory
    offload_dir: str = ""  # NVMe tier: optimizer state in files here (with offload=optimizer)
    host_budget_gb: float = 0.0  # host memory the offload tier may hold; 0 = no limit


@dataclass
class TrainingSections:
    """The sections every training command shares (pretraining and fine-tuning)."""

    run_dir: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)

    def sections(self) -> dict[str, Any]:
        """These sections by name (to build another config tree from them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingSections)}


@dataclass
class Config(TrainingSections):
    model: ModelConfig = field(default_factory=lambda: get_preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML file (or start from defaults), apply overrides, build and validate."""
    return config_from_dict(read_with_overrides(path, overrides))


def read_with_overrides(path: str | Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        _set_path(raw, key, value)
    return raw


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LoomError(f"config file {p} does not exist; pass the path of a TOML file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LoomError(f"config file {p} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise LoomError(f"config file {p} is not UTF-8 text") from None


def parse_override(item: str) -> tuple[str, str]:
    """`--train.steps=200` -> ("train.steps", "200")."""
    if not item.startswith("--") or "=" not in item:
        raise LoomError(f"override {item!r} must look like --section.key=value")
    key, value = item[2:].split("=", 1)
    return key, value


def _set_path(raw: dict[str, Any], key: str, value: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise LoomError(f"override --{key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = _CliValue(value)


class _CliValue(str):
    """A string from the command line, converted to the field's type when the tree is built."""


def load_tree(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Any config dataclass tree from TOML + overrides (type-checked; validate it yourself)."""
    return tree_from_dict(cls, read_with_overrides(path, overrides))


def tree_from_dict(cls: type[T], raw: dict[str, Any], prefix: str = "") -> T:
    """A config dataclass tree from raw TOML data (type-checked; validate it yourself); errors
    name keys as `prefix.key`."""
    return _build(cls, raw, prefix)


def model_config(architecture: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from the architecture record a checkpoint keeps (validated like config)."""
    return _build(ModelConfig, dict(architecture), "model")


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    model_raw = raw.pop("model", {})
    if not isinstance(model_raw, dict):
        raise LoomError(f"model must be a section ([model] in TOML), got {model_raw!r}")
    model_raw = dict(model_raw)
    preset = model_raw.pop("preset", "tiny")
    base = _to_raw(get_preset(str(preset)))
    # `[moe]` is the model's mixture-of-experts section; its keys override the preset's
    moe = raw.pop("moe", None)
    if moe is not None and "moe" in model_raw:
        raise LoomError("set the mixture of experts in [moe] or in [model.moe], not both")
    moe = model_raw.pop("moe", moe) or {}
    if not isinstance(moe, dict):
        raise LoomError(f"moe must be a section ([moe] in TOML), got {moe!r}")
    model_raw["moe"] = {**base["moe"], **moe}
    model = _build(ModelConfig, {**base, **model_raw, "preset": str(preset)}, "model")
    cfg = _build(Config, raw, "")
    cfg.model = model
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved tree as plain TOML-ready data (None values left out)."""
    return _to_raw(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(config_to_dict(cfg)), encoding="utf-8")


def _to_raw(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = _to_raw(getattr(obj, f.name))
            if f.metadata.get("tables"):
                out.update(value)  # written back as the tables it was read from
            else:
                out[_key(f)] = value
        return out
    if obj is None:
        return "none"
    if isinstance(obj, dict):
        return {k: _to_raw(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_raw(v) for v in obj]
    return obj


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise LoomError(f"{prefix} must be a section (a TOML table), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    # A field with metadata {"tables": True} collects the section's unknown keys whose values
    # are tables (`[filters.zh]`); the class checks their contents itself.
    tables = next((f.name for f in fields if f.metadata.get("tables")), None)
    attributes = {_key(f): f.name for f in fields if f.name != tables}
    names = list(attributes)
    collected: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names and tables is not None and isinstance(value, dict):
            collected[str(key)] = value
        elif key not in names:
            where = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            known = ", ".join(names)
            raise LoomError(f"unknown config key {where}{hint} (known keys here: {known})")
    kwargs = {
        attributes[key]: _coerce(
            hints[attributes[key]], value, f"{prefix}.{key}" if prefix else key
        )
        for key, value in data.items()
        if key not in collected
    }
    if collected:
        kwargs[tables] = collected
    return cls(**kwargs)


def _key(f: dataclasses.Field[Any]) -> str:
    """A field's name in TOML (its attribute name unless that is a Python keyword)."""
    return str(f.metadata.get("key", f.name))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check (and for command-line strings, convert) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None  # TOML has no null: optional fields are written as "none"
        return _coerce(options[0], value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            choices = ", ".join(map(str, allowed))
            raise LoomError(f"{key} must be one of {choices}; got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise LoomError(f"{key} must be a table, got {value!r}")
        value_type = typing.get_args(tp)[1]
        return {str(k): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, _CliValue):
            if dataclasses.is_dataclass(item_type):
                raise LoomError(f"{key} is a list of tables; edit it in the config file")
            value = [_CliValue(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise LoomError(f"{key} must be a list, got {value!r}")
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, _CliValue):
        value = _from_cli(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise LoomError(f"{key} must be a finite number, got {value}")
    if tp in (int, float, str, bool) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        raise LoomError(f"{key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _from_cli(tp: Any, text: str, key: str) -> Any:
    try:
        if tp is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            try:
                return int(text)
            except ValueError:
                number = float(text)  # "1e3" is a fine way to write 1000
                if not number.is_integer():
                    raise
                return int(number)
        if tp is float:
            return float(text)
    except ValueError:
        raise LoomError(f"{key} must be {_type_name(tp)}, got {text!r}") from None
    return str(text)


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


# ---------------------------------------------------------------------------------------------
# Validation


def _check_memory(m: MemoryConfig) -> None:
    """Every memory.* value must change what the run does, or be refused here."""
    if m.offload_dir and m.offload != "optimizer":
        raise LoomError(
            f"memory.offload_dir={m.offload_dir!r} holds the optimizer state on disk and needs "
            "memory.offload=optimizer"
        )
    if m.host_budget_gb < 0:
        raise LoomError(f"memory.host_budget_gb={m.host_budget_gb} must be >= 0 (0 = no limit)")
    if m.host_budget_gb and not m.offload_dir:
        raise LoomError(
            f"memory.host_budget_gb={m.host_budget_gb:g} bounds the host memory of the NVMe "
            "tier; set memory.offload_dir=PATH with it, or host_budget_gb=0"
        )
    if m.offload_dir:
        _check_writable_dir("memory.offload_dir", Path(m.offload_dir))


def _check_writable_dir(key: str, path: Path) -> None:
    """`path` is a folder this process can write in, or can create."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LoomError(f"{key}={str(path)!r}: {existing} is not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LoomError(
            f"{key}={str(path)!r}: {existing} is not writable by this user; choose another path"
        )


def check_moe(model: ModelConfig) -> None:
    """The `[moe]` section of a model: shapes that can be built."""
    moe = model.moe
    if moe.experts < 0:
        raise LoomError(f"moe.experts={moe.experts} must be >= 0 (0 = a dense model)")
    if not moe.enabled:
        return
    if not 1 <= moe.top_k <= moe.experts:
        raise LoomError(f"moe.top_k={moe.top_k} must be between 1 and moe.experts={moe.experts}")
    _positive({"moe.every": moe.every})
    _non_negative(
        {
            "moe.shared_experts": moe.shared_experts,
            "moe.expert_ffn_hidden": moe.expert_ffn_hidden,
            "moe.first_dense_layers": moe.first_dense_layers,
            "moe.capacity_factor": moe.capacity_factor,
            "moe.aux_loss_weight": moe.aux_loss_weight,
            "moe.bias_update_rate": moe.bias_update_rate,
        }
    )
    if moe.shared_expert_gate and not moe.shared_experts:
        raise LoomError(
            "moe.shared_expert_gate=true gates the shared experts; set moe.shared_experts"
        )
    if model.moe_layers == 0:
        raise LoomError(
            f"moe.first_dense_layers={moe.first_dense_layers} leaves no MoE layer of "
            f"model.n_layers={model.n_layers}; lower it or set moe.experts=0"
        )


def validate(cfg: Config) -> None:
    """Reject impossible values up front, naming the key and the fix."""
    m, t, o = cfg.model, cfg.train, cfg.optimizer
    check_moe(m)
    _positive(
        {
            "model.vocab_size": m.vocab_size,
            "model.dim": m.dim,
            "model.n_layers": m.n_layers,
            "model.n_heads": m.n_heads,
            "model.n_kv_heads": m.n_kv_heads,
            "model.ffn_hidden": m.ffn_hidden,
            "model.max_seq_len": m.max_seq_len,
            "train.steps": t.steps,
            "train.batch_size": t.batch_size,
            "train.seq_len": t.seq_len,
            "checkpoint.interval": cfg.checkpoint.interval,
            "checkpoint.keep": cfg.checkpoint.keep,
            "metrics.log_interval": cfg.metrics.log_interval,
            "train.eval_batches": t.eval_batches,
            "optimizer.lr": o.lr,
            "model.rope_theta": m.rope_theta,
            "model.norm_eps": m.norm_eps,
            "optimizer.eps": o.eps,
        }
    )
    _non_negative(
        {
            "train.micro_batch_size": t.micro_batch_size,
            "train.eval_interval": t.eval_interval,
            "optimizer.warmup_steps": o.warmup_steps,
            "optimizer.decay_steps": o.decay_steps,
            "optimizer.weight_decay": o.weight_decay,
            "optimizer.grad_clip": o.grad_clip,
            "model.head_dim": m.head_dim,
            "model.init_std": m.init_std,
            "model.num_labels": m.num_labels,
        }
    )
    if m.num_labels and m.tie_embeddings:
        raise LoomError(
            f"model.num_labels={m.num_labels} gives the model a score head of its own, which "
            "cannot be tied to the embedding; set model.tie_embeddings=false"
        )
    if m.head_dim == 0 and m.dim % m.n_heads:
        raise LoomError(
            f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; "
            "change one of them or set model.head_dim"
        )
    if m.n_heads % m.n_kv_heads:
        raise LoomError(
            f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} "
            "(grouped-query attention shares each key/value head among a group of query heads)"
        )
    if m.latent_attention and not (
        m.head_dim > m.rope_head_dim > 0 and m.v_head_dim > 0 and m.q_lora_rank >= 0
    ):
        raise LoomError(
            f"model.kv_lora_rank={m.kv_lora_rank} makes the attention latent (DeepSeek's MLA): "
            "set model.head_dim (query/key head width), model.rope_head_dim (its rotary part, "
            "above 0 and below head_dim) and model.v_head_dim (value head width)"
        )
    if m.rope_dim % 2:
        raise LoomError(f"rotary width {m.rope_dim} must be even (model.head_dim/rope_head_dim)")
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        divisors = [d for d in range(1, t.batch_size + 1) if t.batch_size % d == 0]
        raise LoomError(
            f"train.micro_batch_size={t.micro_batch_size} must divide "
            f"train.batch_size={t.batch_size}; use one of {divisors}"
        )
    if t.seq_len > m.max_seq_len:
        raise LoomError(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
            f"lower train.seq_len or raise model.max_seq_len"
        )
    if not 0 <= o.min_lr_ratio <= 1:
        raise LoomError(f"optimizer.min_lr_ratio={o.min_lr_ratio} must be between 0 and 1")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise LoomError(f"optimizer.{name}={getattr(o, name)} must be in [0, 1)")
    if o.decay_steps and o.decay_steps < t.steps:
        raise LoomError(
            f"optimizer.decay_steps={o.decay_steps} is shorter than train.steps={t.steps}; "
            "set it to at least train.steps (or 0 to follow train.steps)"
        )
    s = m.rope_scaling
    if s is not None and not (s.factor >= 1 and s.high_freq_factor > s.low_freq_factor > 0):
        raise LoomError(
            "model.rope_scaling needs factor >= 1 and high_freq_factor > low_freq_factor > 0"
        )
    if cfg.data.path and cfg.data.mix:
        raise LoomError("set data.path or [[data.mix]], not both")
    for i, source in enumerate(cfg.data.mix):
        if not source.path or source.weight <= 0:
            raise LoomError(f"data.mix[{i}] needs a path and a weight > 0")
    if cfg.memory.recompute_every < 1:
        raise LoomError(f"memory.recompute_every={cfg.memory.recompute_every} must be at least 1")
    _check_memory(cfg.memory)
    r, c = cfg.resilience, cfg.checkpoint
    _positive(
        {
            "resilience.max_bad_steps": r.max_bad_steps,
            "resilience.spike_window": r.spike_window,
            "resilience.straggler_intervals": r.straggler_intervals,
        }
    )
    if r.straggler_factor and not r.straggler_factor > 1:
        raise LoomError(
            f"resilience.straggler_factor={r.straggler_factor} must be greater than 1 (times the "
            "median step time of the ranks), or 0 to turn straggler detection off"
        )
    _non_negative(
        {
            "resilience.spike_zscore": r.spike_zscore,
            "resilience.hang_timeout_s": r.hang_timeout_s,
            "resilience.health_interval": r.health_interval,
            "checkpoint.interval_minutes": c.interval_minutes,
        }
    )
    if r.spike_zscore and r.spike_window < 3:
        raise LoomError(
            f"resilience.spike_window={r.spike_window} is too short to estimate a spread; use 3 "
            "or more"
        )
    if cfg.parallel.timeout_s <= 0:
        raise LoomError(f"parallel.timeout_s={cfg.parallel.timeout_s} must be greater than 0")


def _positive(values: dict[str, float]) -> None:
    for key, value in values.items():
        if value <= 0:
            raise LoomError(f"{key}={value} must be greater than 0")


def _non_negative(values: dict[str, float]) -> None:
    for key, value in values.items():
        if value < 0:
            raise LoomError(f"{key}={value} must not be negative")
