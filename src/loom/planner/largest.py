"""`loom plan --largest`: the largest model that trains on the given devices, and its layout.

The models are one family of Llama-3 shapes with one free number, the width: 128-wide heads,
as many layers as heads, up to 8 KV heads, a SwiGLU MLP of 3.5 x the width and Llama 3's
vocabulary. Width 4096 is Llama-3 8B exactly. The widest member any layout fits (with every
offload tier the search may use) is the answer.
"""

from __future__ import annotations

import math
from dataclasses import replace

from loom.core.errors import LoomError
from loom.planner.search import Plan, search
from loom.planner.spec import ModelShape, PlanSpec

HEAD_DIM = 128
STEP = 256  # widths are multiples of this
WIDEST = 65536
CHINCHILLA_TOKENS_PER_PARAM = 20  # training tokens when none are given (Hoffmann et al. 2022)


def family_shape(hidden: int, seq_len: int) -> ModelShape:
    """The family's model of width `hidden` (a multiple of STEP)."""
    heads = max(1, hidden // HEAD_DIM)
    return ModelShape(
        layers=heads,
        hidden=hidden,
        heads=heads,
        kv_heads=math.gcd(heads, 8),
        ffn_hidden=STEP * max(1, round(3.5 * hidden / STEP)),
        vocab=128256,
        seq_len=seq_len,
        head_dim=HEAD_DIM,
    )


def largest(spec: PlanSpec) -> tuple[PlanSpec, Plan, list[Plan]]:
    """The spec of the widest family member that fits `spec`'s hardware (its model gives only
    the sequence length), its best plan and the ranked plans. Fitting is taken to be monotone
    in the width (a wider model needs more of every tier), so a bisection finds the edge."""

    def ranked(hidden: int) -> tuple[PlanSpec, list[Plan]]:
        trial = replace(spec, model=family_shape(hidden, spec.model.seq_len))
        return trial, search(trial)

    low, high = 0, WIDEST // STEP + 1  # low fits (or 0), high does not
    while high - low > 1:
        mid = (low + high) // 2
        if ranked(mid * STEP)[1]:
            low = mid
        else:
            high = mid
    if low == 0:
        raise LoomError(
            f"no model of this family fits on {spec.hardware.devices} × "
            f"{spec.hardware.memory_gb:g} GB {spec.hardware.name}, even {STEP} wide; shorten "
            "the sequence (--seq-len)"
        )
    found, plans = ranked(low * STEP)
    if found.training_tokens is None:
        found = replace(found, training_tokens=CHINCHILLA_TOKENS_PER_PARAM * found.model.params())
    return found, plans[0], plans
