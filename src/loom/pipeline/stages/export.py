"""`[export]`: `loom convert` of the last training stage (or `model`) into the stage folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from loom.core.config import tree_from_dict
from loom.core.errors import LoomError
from loom.models.convert import DTYPES, FORMATS, convert
from loom.pipeline.stage import BaseStage, Loading, model_source


@dataclass
class ExportSection:
    """`loom convert`'s options as `[export]` keys: `model` is its SRC, the stage folder its
    --out, and the format has a default."""

    format: str = "hf"
    dtype: str = "fp32"
    model: str = ""
    merge: bool = False  # set automatically when the model is a LoRA fine-tuning stage

    def __post_init__(self) -> None:
        if self.format not in FORMATS or self.dtype not in DTYPES:
            raise LoomError(
                f"[export] format = {self.format!r}, dtype = {self.dtype!r}: use format "
                f"{' or '.join(FORMATS)} and dtype {' or '.join(DTYPES)}"
            )


class ExportStage(BaseStage):
    name: ClassVar[str] = "export"
    options: ExportSection

    @classmethod
    def load(cls, at: Loading) -> ExportStage:
        options = tree_from_dict(ExportSection, at.section)
        model, inputs = model_source(at, options.model)
        for name in ("finetune", "align"):
            stage = at.stage(name)
            if stage is not None and model == str(stage.dir) and stage.options.uses_lora:
                options.merge = True  # a LoRA run exports with its adapters folded in
        return cls(at.folder, options, inputs, model)

    def run(self) -> dict[str, Any]:
        c = self.options
        out = convert(self.model, self.dir, c.format, c.dtype, merge=c.merge)
        return {"format": c.format, "folder": os.path.relpath(out, self.dir.parent)}
