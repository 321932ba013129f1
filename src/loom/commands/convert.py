"""`loom convert`: Hugging Face model folders to Loom run folders and back."""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.errors import LoomError
from loom.core.options import option
from loom.models.convert import DTYPES, FORMATS, convert

DESCRIPTION = (
    "SRC: an HF model folder (config.json + safetensors), a .gguf file, or a "
    "Loom run folder or checkpoint (with --merge: a LoRA fine-tuning run)."
)


@dataclass
class Options:
    src: str = option("", positional=True, metavar="SRC")
    out: str = option("", required=True, help="a new folder")
    format: str = option("hf", required=True, choices=FORMATS)
    dtype: str = option("fp32", choices=tuple(DTYPES))
    merge: bool = option(False, help="fold a LoRA run's adapters into the base weights")

    def __post_init__(self) -> None:
        if self.format not in FORMATS or self.dtype not in DTYPES:
            raise LoomError(
                f"format = {self.format!r}, dtype = {self.dtype!r}: use format hf or loom and "
                "dtype fp32 or bf16"
            )


def run(options: Options) -> int:
    convert(options.src, options.out, options.format, options.dtype, merge=options.merge)
    return 0
