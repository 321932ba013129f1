"""torch.compile applied from outside the model, one transformer block at a time.

Compiling blocks rather than the whole model keeps compile time flat in depth (every block
has the same graph) and leaves parameter names unchanged (`Module.compile` works in place).
"""

from __future__ import annotations

from loom.models.llama import Transformer


def compile_blocks(model: Transformer) -> None:
    for block in model.layers.values():
        block.compile()
