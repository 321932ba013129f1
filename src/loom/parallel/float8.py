"""float8 training of the linear layers through torchao (dynamic scaling per tensor).

Matmuls run in float8 with higher-precision master weights; the gain is real on GPUs with
float8 tensor cores (H100 and later). Elsewhere it runs, emulated, and is slower.
"""

from __future__ import annotations

from torch import nn

from loom.core.errors import LoomError


def convert_to_float8(model: nn.Module) -> None:
    """Swap eligible nn.Linear modules in place (the output head stays in higher precision)."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise LoomError(
            "train.float8 needs torchao; install it (pip install torchao) or set train.float8=false"
        ) from None

    def eligible(module: nn.Module, name: str) -> bool:
        # float8 matmuls need both dimensions divisible by 16.
        return (
            isinstance(module, nn.Linear)
            and not name.endswith("lm_head")
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    convert_to_float8_training(model, module_filter_fn=eligible)
