"""`[pretrain]`: `config = "tiny.toml"` (a `loom train` config) plus override tables named like
its sections (`[pretrain.train] steps = 60`); `data.path` defaults to the data stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from loom.core.config import Config, config_from_dict
from loom.core.errors import LoomError
from loom.pipeline.sections import expand, need
from loom.pipeline.stage import BaseStage, Loading
from loom.pipeline.stages.training import TrainingStage, read_training_section
from loom.train.trainer import TrainResult, train


class PretrainStage(TrainingStage):
    name: ClassVar[str] = "pretrain"
    module: ClassVar[str] = "loom.train"
    options: Config

    @classmethod
    def load(cls, at: Loading) -> PretrainStage:
        read = read_training_section(at)
        data = read.tree.setdefault("data", {})
        given = at.section.get("data")
        inputs: list[str] = []
        if isinstance(given, dict) and ("path" in given or "mix" in given):
            if data.get("path"):
                data["path"] = expand(data["path"], at.base, "[pretrain] data.path")
            for item in data.get("mix", []):
                if isinstance(item, dict) and item.get("path"):
                    item["path"] = expand(item["path"], at.base, "[pretrain] data.mix.path")
        else:
            need("pretrain", "data.path", "data", "data" in at.raw)
            data["path"], inputs = str(at.root / "data"), ["data"]
            data.pop("mix", None)
        try:
            cfg = config_from_dict(read.tree)
        except LoomError as e:
            raise LoomError(f"[pretrain] {e}") from None
        tokenizer = at.stage("tokenizer")
        if (
            tokenizer is not None
            and not tokenizer.options.path
            and tokenizer.options.vocab_size > cfg.model.vocab_size
        ):
            raise LoomError(
                f"[tokenizer] vocab_size = {tokenizer.options.vocab_size} exceeds the pretrain "
                f"model's model.vocab_size = {cfg.model.vocab_size}; lower vocab_size or set "
                "[pretrain.model] vocab_size"
            )
        return cls(at.folder, cfg, inputs, hardware=read.hardware, launch=read.launch)

    def trainer(self) -> Callable[[Any], TrainResult]:
        return train

    def training_config(self, earlier: list[BaseStage]) -> Config:
        return self.options
