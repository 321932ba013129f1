"""Fixed-length training samples served in a seeded order, with a position that checkpoints.

Sample i is tokens [i·seq_len, i·seq_len + seq_len + 1) of the split's stream: inputs are its
first seq_len tokens, targets the last seq_len. Each epoch visits every sample once, in a
permutation drawn from (seed, epoch). The position is a count of samples, so it stays valid
if the batch size changes on resume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loom.data.shards import SplitTokens
from loom.errors import LoomError


class TokenLoader:
    def __init__(self, tokens: SplitTokens, seq_len: int, seed: int, shuffle: bool = True) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_samples = (tokens.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise LoomError(
                f"the split holds {tokens.num_tokens} tokens, fewer than one sequence of "
                f"train.seq_len={seq_len} + 1; lower train.seq_len or add data"
            )
        self.epoch = 0
        self.cursor = 0  # samples consumed in the current epoch
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def next_indices(self, n: int) -> np.ndarray:
        """The next n sample indices, rolling into the next epoch when this one runs out."""
        out = []
        while n > 0:
            take = min(n, self.num_samples - self.cursor)
            out.append(self._order[self.cursor : self.cursor + take])
            self.cursor += take
            n -= take
            if self.cursor == self.num_samples:
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
        return np.concatenate(out)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack(
            [self.tokens.window(int(i) * self.seq_len, self.seq_len + 1) for i in indices]
        )
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each [n, seq_len] int64."""
        return self.batch(self.next_indices(n))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seq_len"] != self.seq_len:
            raise LoomError(
                f"the checkpoint's data position is in sequences of {state['seq_len']} tokens; "
                f"train.seq_len={self.seq_len} cannot resume it "
                f"(keep train.seq_len={state['seq_len']})"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._permutation(self.epoch)
