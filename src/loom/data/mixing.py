"""Source mixing: how many times each training document appears so that sources get their shares.

With no weights every document appears once (each source's natural share). With weights,
source i should get share s_i = w_i / Σw of the training tokens. The mix is as large as the
scarcest source allows: total T = min_i(tokens_i · max_epochs_i / s_i); source i is sampled
with factor f_i = s_i · T / tokens_i (< 1: a seeded subset of its documents, > 1: repeats).
A document appears ⌊f⌋ times, plus once more with probability f − ⌊f⌋ (seeded by its index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loom.core.errors import LoomError
from loom.data.hashing import mix64


@dataclass
class SourceShare:
    name: str
    tokens: int  # training tokens after cleaning and deduplication
    weight: float  # 0 = natural share
    max_epochs: float


def sampling_factors(sources: list[SourceShare]) -> dict[str, float]:
    if all(s.weight == 0 for s in sources):
        return {s.name: 1.0 for s in sources}
    total_weight = sum(s.weight for s in sources)
    empty = [s.name for s in sources if s.weight > 0 and s.tokens == 0]
    if empty:
        raise LoomError(
            f"source(s) {empty} have no training tokens left after cleaning, so their weight "
            "cannot be met; loosen their filters or remove their weight"
        )
    shares = {s.name: s.weight / total_weight for s in sources}
    total = min(s.tokens * s.max_epochs / shares[s.name] for s in sources if s.weight > 0)
    return {s.name: shares[s.name] * total / s.tokens if s.tokens else 0.0 for s in sources}


def repeats(global_index: np.ndarray, factor: float, seed: int) -> np.ndarray:
    """How many times each document appears for a source sampled with `factor`."""
    whole = int(np.floor(factor))
    fraction = factor - whole
    draw = mix64(global_index.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B1 + 0x5BD1E995))
    extra = (draw.astype(np.float64) / 2.0**64) < fraction
    return whole + extra.astype(np.int64)
