"""What the two training stages share: the pipeline-only `[STAGE.hardware]` and
`[STAGE.launch]` tables, training in this process or on local workers, the figures read back
from the run folder, and the planner's prediction made before anything runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from loom.core.config import Config, config_to_dict, save_config
from loom.core.errors import LoomError
from loom.core.run_files import GoodputRecord, RunFiles
from loom.parallel.launch import Nodes
from loom.parallel.launch import launch as launch_workers
from loom.pipeline.sections import base_config, forced, pop_table
from loom.pipeline.stage import BaseStage, Loading
from loom.planner.spec import parse_hardware
from loom.train.metrics import read_metrics
from loom.train.trainer import TrainResult


@dataclass
class HardwareSection:
    """`[pretrain.hardware]` / `[finetune.hardware]`: what the stage is meant to run on, so the
    prediction (and `--dry-run` on a laptop) is the cluster's, not this machine's. The layout
    is the stage's own `[parallel]` section, resolved against `gpus`."""

    gpu: str = ""  # as `loom plan --gpu` names it: h100, h100-pcie, a100, h200, b200, ...
    gpus: int = 0  # devices in all (nodes × GPUs per node)
    nodes: int = 1
    gpu_mem_gb: float = 0.0  # memory per GPU in GB when it differs from the table (0: table's)

    def validate(self, section: str) -> None:
        if not self.gpu:
            raise LoomError(
                f'[{section}.hardware] gpu is not set; add gpu = "h100" (a GPU `loom plan '
                "--gpu` knows) or remove the table to predict for this machine"
            )
        if self.gpus < 1 or self.nodes < 1 or self.gpus % self.nodes:
            raise LoomError(
                f"[{section}.hardware] gpus = {self.gpus}, nodes = {self.nodes}: gpus is the "
                "total and must be a positive multiple of nodes (e.g. gpus = 64, nodes = 8)"
            )
        if self.gpu_mem_gb < 0:
            raise LoomError(f"[{section}.hardware] gpu_mem_gb = {self.gpu_mem_gb} must be >= 0")
        self.planner(section)  # an unknown gpu name is refused now, not at prediction

    def planner(self, section: str) -> Any:
        """The planner's Hardware, built the way `loom plan --gpu G --gpus N` builds it."""
        raw: dict[str, Any] = {
            "gpu": self.gpu,
            "n_gpus": self.gpus,
            "gpus_per_node": self.gpus // self.nodes,
        }
        if self.gpu_mem_gb:
            raw["gpu_mem_gb"] = self.gpu_mem_gb
        try:
            return parse_hardware(raw)
        except LoomError as e:
            raise LoomError(f"[{section}.hardware] {e}") from None

    def words(self) -> str:
        per_node = f", {self.nodes} nodes × {self.gpus // self.nodes}" if self.nodes > 1 else ""
        return f"{self.gpus} × {self.gpu}{per_node}"


@dataclass
class LaunchSection:
    """`[pretrain.launch]` / `[finetune.launch]`: train the stage on `nproc` local worker
    processes through torchrun's elastic agent, as `loom train --nproc N --max-restarts K`;
    with `nnodes` > 1, on that many machines: this one hosts the rendezvous at `rdzv_endpoint`
    and `loom run` prints the `loom torchrun` command for the others."""

    nproc: int = 0  # per node; 0: [hardware] gpus / nnodes when that table is set, else 1
    max_restarts: int = 0
    nnodes: int = 1
    rdzv_endpoint: str = ""  # HOST:PORT of this machine, which the other nodes reach


def read_launch(
    section: str, raw: dict[str, Any], hardware: HardwareSection | None
) -> LaunchSection:
    """Pop and validate the stage's `launch` table; `nproc` resolved to a process count."""
    launch = pop_table(section, raw, "launch", LaunchSection) or LaunchSection()
    if launch.nproc < 0 or launch.max_restarts < 0:
        raise LoomError(
            f"[{section}.launch] nproc = {launch.nproc}, max_restarts = {launch.max_restarts}: "
            "give 0 or more (nproc 0: [hardware] gpus, else 1)"
        )
    if launch.nnodes < 1 or (launch.nnodes > 1 and ":" not in launch.rdzv_endpoint):
        raise LoomError(
            f"[{section}.launch] nnodes = {launch.nnodes}, rdzv_endpoint = "
            f"{launch.rdzv_endpoint!r}: nnodes is 1 or more, and more than 1 needs "
            'rdzv_endpoint = "HOST:PORT" of this machine (where the other nodes meet it)'
        )
    nodes = f"{launch.nnodes} × " if launch.nnodes > 1 else ""
    if hardware is not None and launch.nproc and launch.nnodes * launch.nproc != hardware.gpus:
        raise LoomError(
            f"[{section}.launch] nproc = {nodes}{launch.nproc} but [{section}.hardware] gpus = "
            f"{hardware.gpus}: the stage trains on the GPUs its hardware names; remove nproc"
        )
    multi = launch.nnodes > 1 or (hardware is not None and hardware.nodes > 1 and launch.nproc)
    if hardware is not None and multi and launch.nnodes != hardware.nodes:
        raise LoomError(
            f"[{section}.launch] nnodes = {launch.nnodes} but [{section}.hardware] nodes = "
            f"{hardware.nodes}: set nnodes = {hardware.nodes} (and rdzv_endpoint)"
        )
    per_node = hardware.gpus // launch.nnodes if hardware is not None else 1
    launch.nproc = launch.nproc or per_node
    return launch


def read_hardware(section: str, raw: dict[str, Any]) -> HardwareSection | None:
    """Pop and validate the stage's `hardware` table (the training config does not know it)."""
    hardware = pop_table(section, raw, "hardware", HardwareSection)
    if hardware is not None:
        hardware.validate(section)
    return hardware


@dataclass
class TrainingSection:
    """A training stage's section after its pipeline-only tables are taken out: the config
    tree (its `config = FILE` merged in, run_dir the stage folder) and the two tables."""

    tree: dict[str, Any]
    hardware: HardwareSection | None
    launch: LaunchSection


def read_training_section(at: Loading) -> TrainingSection:
    section = at.section
    forced(at.name, section, "run_dir", str(at.folder))
    hardware = read_hardware(at.name, section)
    launch = read_launch(at.name, section, hardware)
    tree = base_config(at.name, section, at.base)
    tree["run_dir"] = str(at.folder)
    return TrainingSection(tree, hardware, launch)


@dataclass
class TrainingStage(BaseStage):
    """pretrain and finetune: resumable from the newest checkpoint; the target hardware and
    the local processes are not in the fingerprint (they change the prediction and the launch,
    not what is trained)."""

    resumable: ClassVar[bool] = True
    module: ClassVar[str]  # `python -m MODULE CONFIG` trains it on worker processes
    hardware: HardwareSection | None = None
    launch: LaunchSection = field(default_factory=LaunchSection)

    def identity(self) -> Any:
        return config_to_dict(self.options)

    def trainer(self) -> Callable[[Any], TrainResult]:
        """The function that trains the stage's config in this process."""
        raise NotImplementedError

    def training_config(self, earlier: list[BaseStage]) -> Config:
        """The `loom train` config the planner predicts for."""
        raise NotImplementedError

    def planner_extra(self) -> dict[str, object]:
        """Strategy fields the training config does not carry (fine-tuning's method)."""
        return {}

    def run(self) -> dict[str, Any]:
        step, stopped_by, goodput = self._train()
        records = read_metrics(self.dir)
        if step is None:  # the last step is always logged
            step = max((r["step"] for r in records if "step" in r), default=0)
        if stopped_by:
            raise LoomError(
                f"stage {self.name} was stopped by {stopped_by} after step {step} "
                "with a checkpoint saved; run the same command to continue"
            )
        losses = [r for r in records if "loss" in r]
        vals = [r for r in records if "val_loss" in r]
        t = self.options.train
        ledger = RunFiles(self.dir).goodput
        if goodput is None and ledger.is_file():
            goodput = GoodputRecord.from_json(ledger.read_text()).goodput
        return {
            "steps": step,
            "final_loss": losses[-1]["loss"] if losses else None,
            "final_val_loss": vals[-1]["val_loss"] if vals else None,
            "tokens": step * t.batch_size * t.seq_len,
            "goodput": goodput,
        }

    def _train(self) -> tuple[int | None, str | None, float | None]:
        """Train in this process, or on `[launch] nproc` workers (as `loom train --nproc`):
        (last step, or None to read it from the metrics; the signal that stopped it before
        train.steps; goodput, or None to read it from goodput.json)."""
        workers = self.launch
        if workers.nproc == 1 and not workers.max_restarts and workers.nnodes == 1:
            result = self.trainer()(self.options)
            return result.step, result.stopped_by, result.goodput.get("goodput")
        self.dir.mkdir(parents=True, exist_ok=True)
        config = RunFiles(self.dir).stage_config.resolve()
        save_config(self.options, config)
        nodes = None
        if workers.nnodes > 1:
            # One id per stage: agents of the other nodes still waiting after `loom run` was
            # stopped meet it again when it is run again.
            nodes = Nodes(workers.nnodes, workers.rdzv_endpoint, f"loom-{self.name}")
            nodes.announce(self.name, workers.nproc, workers.max_restarts, self.module, str(config))
        stopped_by = launch_workers(
            str(config), [], workers.nproc, self.dir, workers.max_restarts, self.module, nodes
        )
        return None, stopped_by, None
