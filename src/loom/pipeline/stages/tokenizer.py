"""`[tokenizer]`: `loom data prepare` trains the tokenizer (with these settings, passed into the
data stage); this stage records it, copying its files into the stage folder."""

from __future__ import annotations

import json
import shutil
from typing import Any, ClassVar

from loom.core.config import tree_from_dict
from loom.core.errors import LoomError
from loom.core.run_files import RunFiles
from loom.data.prepare import TokenizerSection
from loom.pipeline.stage import BaseStage, Loading


class TokenizerStage(BaseStage):
    name: ClassVar[str] = "tokenizer"
    options: TokenizerSection

    @classmethod
    def load(cls, at: Loading) -> TokenizerStage:
        if "data" not in at.raw:
            raise LoomError(
                "[tokenizer] records the tokenizer the [data] stage trains; add a [data] "
                "section (a `loom data prepare` config)"
            )
        return cls(at.folder, tree_from_dict(TokenizerSection, at.section), ["data"])

    def run(self) -> dict[str, Any]:
        """Record the tokenizer the data stage trained (or was given) as this stage's output."""
        data = RunFiles(self.dir.parent / "data")
        source = data.tokenizer
        if not (source / "tokenizer.json").is_file():
            raise LoomError(f"stage tokenizer: {source}/tokenizer.json is missing; re-run [data]")
        shutil.copytree(source, self.dir)
        manifest = json.loads(data.manifest.read_text())
        tok = manifest["tokenizer"]
        return {"vocab_size": tok["vocab_size"], "hash": str(tok["hash"]).split(":")[-1][:16]}
