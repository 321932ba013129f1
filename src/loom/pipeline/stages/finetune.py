"""`[finetune]`: a `loom finetune` config tree (optionally `config = ...` as a base);
`model.path` defaults to the pretrain stage. `[align]`: the same tree for an online method
(GRPO, the default), after `[finetune]`, whose model it starts from by default."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

from loom.align.trainer import trainer_for
from loom.core.config import Config
from loom.core.errors import LoomError
from loom.finetune.config import (
    ONLINE_METHODS,
    FinetuneConfig,
    finetune_config_from_dict,
    training_config,
    validate_finetune,
    with_base_architecture,
)
from loom.pipeline.sections import expand, need
from loom.pipeline.stage import BaseStage, Loading
from loom.pipeline.stages.training import TrainingStage, read_training_section
from loom.train.trainer import TrainResult


class FinetuneStage(TrainingStage):
    name: ClassVar[str] = "finetune"
    module: ClassVar[str] = "loom.finetune"
    sources: ClassVar[tuple[str, ...]] = ("pretrain",)  # model.path's default, first found
    options: FinetuneConfig

    @classmethod
    def load(cls, at: Loading) -> FinetuneStage:
        read = read_training_section(at)
        model = read.tree.setdefault("model", {})
        given = at.section.get("model")
        inputs: list[str] = []
        where = f"[{cls.name}]"
        if isinstance(given, dict) and given.get("path"):
            model["path"] = expand(model["path"], at.base, f"{where} model.path")
        else:
            source = next((s for name in cls.sources if (s := at.stage(name))), None)
            need(cls.name, "model.path", " or ".join(cls.sources), source is not None)
            assert source is not None
            model["path"], inputs = str(source.dir), [source.name]
        cls.check_method(read.tree)
        data = read.tree.get("data", {})
        if isinstance(data, dict):
            for key in ("path", "val_path"):
                if data.get(key):
                    data[key] = expand(data[key], at.base, f"{where} data.{key}")
        try:
            cfg = finetune_config_from_dict(read.tree)
            # the pretrain stage's folder does not exist yet: check everything else now
            checked = copy.deepcopy(cfg)
            if inputs:
                checked.model.path = str(at.base)
            validate_finetune(checked)
        except LoomError as e:
            raise LoomError(f"{where} {e}") from None
        return cls(at.folder, cfg, inputs, hardware=read.hardware, launch=read.launch)

    @classmethod
    def check_method(cls, tree: dict[str, Any]) -> None:
        """(`[finetune]` takes any method.)"""

    def trainer(self) -> Callable[[Any], TrainResult]:
        return trainer_for(self.options)

    def training_config(self, earlier: list[BaseStage]) -> Config:
        """The source stage's architecture (its folder holds no model before it has run)."""
        for at, stage in enumerate(earlier):
            if stage.name in self.inputs and isinstance(stage, TrainingStage):
                return training_config(self.options, stage.training_config(earlier[:at]).model)
        return with_base_architecture(self.options)

    def planner_extra(self) -> dict[str, object]:
        """The fine-tuning method as the planner's strategy names it."""
        ft = self.options
        if not ft.uses_lora:
            return {}
        method = "qlora" if ft.finetune.method == "qlora" else "lora"
        return {"finetune": method, "lora_rank": ft.lora.rank}


class AlignStage(FinetuneStage):
    name: ClassVar[str] = "align"
    sources: ClassVar[tuple[str, ...]] = ("finetune", "pretrain")

    @classmethod
    def check_method(cls, tree: dict[str, Any]) -> None:
        """An online method: GRPO unless the section names another."""
        method = tree.setdefault("finetune", {}).setdefault("method", "grpo")
        if method not in ONLINE_METHODS:
            raise LoomError(
                f"[align] finetune.method={method!r}: the align stage trains online methods "
                f"({', '.join(ONLINE_METHODS)}); put {method} in [finetune]"
            )
