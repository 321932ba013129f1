"""`[data]`: a `loom data prepare` config tree; its output folder is the stage's, and the
tokenizer settings come from the pipeline's `[tokenizer]` section."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from loom.core.config import tree_from_dict
from loom.core.errors import LoomError
from loom.data.prepare import PrepareConfig, TokenizerSection, prepare, validate
from loom.pipeline.sections import expand, forced, table
from loom.pipeline.stage import BaseStage, Loading


class DataStage(BaseStage):
    name: ClassVar[str] = "data"
    resumable: ClassVar[bool] = True  # data prepare continues from its finished tasks
    options: PrepareConfig

    @classmethod
    def load(cls, at: Loading) -> DataStage:
        section, folder = at.section, at.folder
        forced("data", section, "output.dir", str(folder))
        if "tokenizer" in section:
            raise LoomError(
                "[data.tokenizer]: put the tokenizer settings in the pipeline's [tokenizer] "
                "section (vocab_size, special_tokens, sample_bytes or path)"
            )
        settings = tree_from_dict(TokenizerSection, table(at.raw, "tokenizer"))
        tokenizer = dataclasses.asdict(settings)
        tokenizer["train"] = settings.train and not settings.path
        if settings.path:
            tokenizer["path"] = expand(settings.path, at.base, "[tokenizer] path")
        section["tokenizer"] = tokenizer
        section.setdefault("output", {})["dir"] = str(folder)
        for i, source in enumerate(section.get("sources", [])):
            if isinstance(source, dict) and isinstance(source.get("paths"), list):
                where = f"[data] sources[{i}].paths"
                source["paths"] = [expand(p, at.base, where) for p in source["paths"]]
        filters = section.get("filters", {})
        if isinstance(filters, dict) and filters.get("bad_words_file"):
            filters["bad_words_file"] = expand(filters["bad_words_file"], at.base, "[data] filters")
        cfg = tree_from_dict(PrepareConfig, section)
        try:
            validate(cfg)
        except LoomError as e:
            raise LoomError(f"[data] {e}") from None
        return cls(folder, cfg)

    def run(self) -> dict[str, Any]:
        manifest = prepare(self.options)
        return {
            "documents_in": manifest["documents"]["read"],
            "documents_kept": manifest["documents"]["kept"],
            "tokens": manifest["tokens"],
            "train_tokens": manifest["splits"]["train"]["tokens"],
        }
