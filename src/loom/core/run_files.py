"""The run folder's file names and the records kept in them, defined once.

Writers (trainer, resilience, pipeline, data) and readers (report, `loom status`, the
launcher, the pipeline) import these names and types instead of repeating string literals and
key lists, so a renamed file or key changes in one place and the report cannot drift from the
ledger it draws. The on-disk contract is DESIGN.md's "Run folder": these are its names.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypedDict

# -- names ------------------------------------------------------------------------------------

CONFIG = "config.toml"  # the resolved config of a train/finetune run
METRICS = "metrics.jsonl"  # one MetricsLine per logged step
GOODPUT = "goodput.json"  # a GoodputRecord, rewritten after every step
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"  # step-<N>/ folders plus `latest`
LATEST = "latest"  # inside CHECKPOINTS: the newest complete checkpoint
TOKENIZER = "tokenizer"  # a copy of the tokenizer folder the run trained with
EVAL_LOG = "eval.jsonl"  # one object per `loom eval` (or eval stage) of the run
DATA_REPORT = "data_report.json"  # a fine-tuning run's data statistics
HANGS = "hangs"  # rank-<r>-attempt-<a>.txt stack dumps of the hang watchdog
RANKS = ".ranks"  # rank-<r>.json: a RankNote per rank, for the launcher's failure messages
SAMPLES = "samples"  # rank-<r>.jsonl: the samples a rank trained on, when asked for
MANIFEST = "manifest.json"  # a token-shard folder's Manifest (the pipeline's data stage)
PIPELINE_STATE = "pipeline.json"  # a `loom run` folder's PipelineState
STAGE_CONFIG = "stage.toml"  # a multi-process stage's resolved config, which its workers read
REPORT = "report.html"  # `loom report`'s page
HEALTH = "health.json"  # every rank's pre-flight hardware checks (loom.train.health)

NAMES = frozenset(
    {
        CONFIG,
        METRICS,
        GOODPUT,
        TENSORBOARD,
        CHECKPOINTS,
        TOKENIZER,
        EVAL_LOG,
        DATA_REPORT,
        HANGS,
        RANKS,
        SAMPLES,
        MANIFEST,
        PIPELINE_STATE,
        STAGE_CONFIG,
        REPORT,
        HEALTH,
    }
)  # every name a run folder's top level may hold (besides a pipeline's stage folders)


@dataclass(frozen=True)
class RunFiles:
    """The paths of one run folder: `RunFiles(run_dir).goodput` and so on."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def goodput(self) -> Path:
        return self.root / GOODPUT

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER

    @property
    def eval_log(self) -> Path:
        return self.root / EVAL_LOG

    @property
    def data_report(self) -> Path:
        return self.root / DATA_REPORT

    @property
    def hangs(self) -> Path:
        return self.root / HANGS

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def pipeline_state(self) -> Path:
        return self.root / PIPELINE_STATE

    @property
    def stage_config(self) -> Path:
        return self.root / STAGE_CONFIG

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def health(self) -> Path:
        return self.root / HEALTH

    def rank_note(self, rank: int) -> Path:
        return self.root / RANKS / f"rank-{rank}.json"

    def samples(self, rank: int) -> Path:
        return self.root / SAMPLES / f"rank-{rank}.jsonl"

    def hang_dumps(self, rank: int | str = "*") -> list[Path]:
        """The watchdog's stack dumps of `rank` (all ranks by default), oldest attempt first."""
        return sorted(self.hangs.glob(f"rank-{rank}-attempt-*.txt"))

    def hang_dump(self, rank: int, attempt: int) -> Path:
        return self.hangs / f"rank-{rank}-attempt-{attempt}.txt"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one step: the report and `loom status` may read it at any moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- goodput.json -----------------------------------------------------------------------------


@dataclass
class GoodputRecord:
    """`goodput.json`: the ledger's state (first block) and its summary (second block).

    The wall-time parts (`PARTS`) add up to `wall_s`; the report draws them in this order.
    """

    path: str = ""
    started: float = 0.0  # wall clock of the first attempt's start
    last_seen: float = 0.0
    attempts: int = 0
    high_water: int = 0  # the furthest step any attempt completed
    productive_s: float = field(default=0.0, metadata={"part": "productive"})
    recomputed_s: float = field(default=0.0, metadata={"part": "recomputed steps"})
    recomputed_steps: int = field(default=0, metadata={"count": "recomputed steps"})
    checkpoint_s: float = field(default=0.0, metadata={"part": "checkpoints"})
    setup_s: float = field(default=0.0, metadata={"part": "set-up"})
    restarts_s: float = field(default=0.0, metadata={"part": "restarts"})
    skipped_steps: int = field(default=0, metadata={"count": "skipped steps"})
    rollbacks: int = field(default=0, metadata={"count": "rollbacks"})
    # summary
    goodput: float = 0.0  # productive_s / wall_s
    wall_s: float = 0.0
    restarts: int = 0  # attempts - 1
    other_s: float = field(default=0.0, metadata={"part": "other"})

    PART_ORDER: ClassVar[tuple[str, ...]] = (
        "productive_s",
        "checkpoint_s",
        "setup_s",
        "restarts_s",
        "recomputed_s",
        "other_s",
    )
    SUMMARY: ClassVar[tuple[str, ...]] = (
        "goodput",
        "wall_s",
        "productive_s",
        "restarts",
        "restarts_s",
        "recomputed_steps",
        "recomputed_s",
        "checkpoint_s",
        "setup_s",
        "other_s",
        "skipped_steps",
        "rollbacks",
    )

    @classmethod
    def parts(cls) -> list[tuple[str, str]]:
        """(key, label) of the parts the wall time is split into."""
        labels = {f.name: f.metadata["part"] for f in fields(cls) if "part" in f.metadata}
        return [(key, labels[key]) for key in cls.PART_ORDER]

    @classmethod
    def counts(cls) -> list[tuple[str, str]]:
        """(key, label) of the step and event counters."""
        return [(f.name, f.metadata["count"]) for f in fields(cls) if "count" in f.metadata]

    def summary(self) -> dict[str, float | int]:
        return {key: getattr(self, key) for key in self.SUMMARY}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GoodputRecord:
        """Known keys are taken, others ignored, absent ones keep their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> GoodputRecord:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("goodput.json is not a JSON object")
        return cls.from_dict(raw)


# -- metrics.jsonl ----------------------------------------------------------------------------


class MetricsLine(TypedDict, total=False):
    """One line of `metrics.jsonl`. Every logged training step has the first block; an
    evaluation-only line (a fine-tuning run's step-0 baseline) has `step` and `val_loss`."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    mfu: float
    peak_mem_gib: float  # the highest over all ranks
    tokens: int
    skipped_steps: int
    peak_mem_gib_per_rank: list[float]  # when there is more than one rank
    goodput: float  # rank 0, from the ledger
    checkpoint_s: float
    # more than one rank, resilience.straggler_factor > 0 (see loom.train.stragglers):
    rank_own_s_median: float  # the median over ranks of a rank's own time per step
    slowest_rank: int  # the rank with the longest own time this interval
    slowest_ratio: float  # its own time over the median
    straggler_ranks: list[int]  # ranks slow for resilience.straggler_intervals in a row
    val_loss: float  # on evaluation steps
    reward_accuracy: float  # preference (DPO) fine-tuning
    reward_margin: float
    val_reward_accuracy: float
    val_reward_margin: float
    moe_expert_load: list[float]  # a mixture of experts: each expert's share of routed tokens
    moe_max_load: float  # the busiest expert's tokens over the mean (1.0 = balanced)
    moe_dropped_tokens: float  # assignments over an expert's capacity (moe.capacity_factor)
    moe_balance_loss: float  # the auxiliary load-balancing loss (logged with either balance)


def metrics_line_json(line: MetricsLine) -> str:
    return json.dumps(line) + "\n"


# -- .ranks/rank-<r>.json ---------------------------------------------------------------------


class RankNote(TypedDict):
    """Where a rank is, so that the launcher can name the step a dead or hung rank was in."""

    pid: int
    step: int


# -- pipeline.json (read by `loom status` and the report) -------------------------------------


class StageRecord(TypedDict):
    """One stage of a pipeline, as `loom status` shows it."""

    name: str
    status: str  # pending | running | done | failed
    seconds: float | None
    dir: str  # relative to the pipeline's run folder
    fingerprint: str
    figures: dict[str, Any]  # the stage's key numbers (steps, final_loss, tokens, ...)


class PipelineState(TypedDict):
    stages: list[StageRecord]
    plan: dict[str, Any]  # the planner's prediction per training stage


# -- manifest.json ----------------------------------------------------------------------------


class TokenizerInfo(TypedDict):
    path: str  # relative to the shard folder
    hash: str
    vocab_size: int
    eos_id: int


class Manifest(TypedDict, total=False):
    """A token-shard folder's `manifest.json` (`loom data tokenize` or `loom data prepare`;
    the keys of the second block are prepare's)."""

    format: str
    created_by: str
    created_at: str
    inputs: dict[str, Any]
    tokenizer: TokenizerInfo
    dtype: str
    seed: int
    val_fraction: float
    documents: dict[str, int]  # read, kept (and dropped)
    dropped: dict[str, Any]
    tokens: int
    splits: dict[str, dict[str, Any]]  # train/val: documents, tokens, shards
    seconds: float
    config: dict[str, Any]
    stages: dict[str, dict[str, Any]]  # per cleaning stage: per_source, dropped
    redactions: dict[str, Any]
    read_errors_by_file: dict[str, Any]
    tokens_by_source: dict[str, dict[str, int]]
    mixing: dict[str, dict[str, Any]]
