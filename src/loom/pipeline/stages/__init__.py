"""The stages in the order they run; a pipeline file names a subset of them."""

from __future__ import annotations

from loom.pipeline.stage import Stage
from loom.pipeline.stages.data import DataStage
from loom.pipeline.stages.eval import EvalStage
from loom.pipeline.stages.export import ExportStage
from loom.pipeline.stages.finetune import AlignStage, FinetuneStage
from loom.pipeline.stages.pretrain import PretrainStage
from loom.pipeline.stages.serve import ServeStage
from loom.pipeline.stages.tokenizer import TokenizerStage

STAGE_TYPES: dict[str, type[Stage]] = {
    cls.name: cls
    for cls in (
        DataStage,
        TokenizerStage,
        PretrainStage,
        FinetuneStage,
        AlignStage,
        EvalStage,
        ExportStage,
        ServeStage,
    )
}
STAGES = tuple(STAGE_TYPES)
