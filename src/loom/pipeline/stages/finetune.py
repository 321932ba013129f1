"""`[finetune]`: a `loom finetune` config tree (optionally `config = ...` as a base);
`model.path` defaults to the pretrain stage."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

from loom.align.trainer import trainer_for
from loom.core.config import Config
from loom.core.errors import LoomError
from loom.finetune.config import (
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
    options: FinetuneConfig

    @classmethod
    def load(cls, at: Loading) -> FinetuneStage:
        read = read_training_section(at)
        model = read.tree.setdefault("model", {})
        given = at.section.get("model")
        inputs: list[str] = []
        if isinstance(given, dict) and given.get("path"):
            model["path"] = expand(model["path"], at.base, "[finetune] model.path")
        else:
            pretrain = at.stage("pretrain")
            need("finetune", "model.path", "pretrain", pretrain is not None)
            assert pretrain is not None
            model["path"], inputs = str(pretrain.dir), ["pretrain"]
        data = read.tree.get("data", {})
        if isinstance(data, dict):
            for key in ("path", "val_path"):
                if data.get(key):
                    data[key] = expand(data[key], at.base, f"[finetune] data.{key}")
        try:
            cfg = finetune_config_from_dict(read.tree)
            # the pretrain stage's folder does not exist yet: check everything else now
            checked = copy.deepcopy(cfg)
            if inputs:
                checked.model.path = str(at.base)
            validate_finetune(checked)
        except LoomError as e:
            raise LoomError(f"[finetune] {e}") from None
        return cls(at.folder, cfg, inputs, hardware=read.hardware, launch=read.launch)

    def trainer(self) -> Callable[[Any], TrainResult]:
        return trainer_for(self.options)

    def training_config(self, earlier: list[BaseStage]) -> Config:
        pretrain = next((s for s in earlier if s.name == "pretrain"), None)
        if "pretrain" in self.inputs and pretrain is not None:
            return training_config(self.options, pretrain.options.model)
        return with_base_architecture(self.options)

    def planner_extra(self) -> dict[str, object]:
        """The fine-tuning method as the planner's strategy names it."""
        ft = self.options
        if not ft.uses_lora:
            return {}
        method = "qlora" if ft.finetune.method == "qlora" else "lora"
        return {"finetune": method, "lora_rank": ft.lora.rank}
