"""Fixed-length training samples from one or several datasets, in a seeded, resumable order.

Sample i of a dataset is tokens [i·seq_len, i·seq_len + seq_len + 1) of its split's stream:
inputs are its first seq_len tokens, targets the last seq_len. Each dataset visits all its
samples once per epoch in a permutation drawn from (seed, dataset, epoch). With several
datasets, each sample slot goes to a dataset by smooth weighted round-robin, which is
deterministic and keeps the proportions exact at every point of the stream.

All positions are global: every rank walks the same stream and takes its own contiguous part
of each global batch, so the saved state (per-dataset epoch and cursor, and the round-robin
credits) resumes on any number of ranks without repeating or skipping a sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from loom.core.errors import LoomError
from loom.data.shards import SplitTokens


class SampleOrder:
    """The global stream of (dataset, sample) pairs and its resumable position; subclasses
    turn pairs into tensors (`batch`)."""

    def __init__(
        self,
        num_samples: list[int],
        weights: Sequence[float],
        seq_len: int,
        seed: int,
        shuffle: bool,
    ) -> None:
        w = np.array(weights, dtype=np.float64)
        if len(w) == 0 or (w <= 0).any():
            raise LoomError("a data mixture needs at least one dataset, each with a weight > 0")
        self.weights = w / w.sum()
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = [0] * len(num_samples)
        self.cursor = [0] * len(num_samples)  # samples consumed in the current epoch
        self.credit = np.zeros(len(num_samples))  # smooth weighted round-robin state
        self._order = [self._permutation(d, 0) for d in range(len(num_samples))]

    def _permutation(self, dataset: int, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples[dataset])
        rng = np.random.default_rng([self.seed, dataset, epoch])
        return rng.permutation(self.num_samples[dataset])

    def _take(self, dataset: int) -> int:
        sample = int(self._order[dataset][self.cursor[dataset]])
        self.cursor[dataset] += 1
        if self.cursor[dataset] == self.num_samples[dataset]:
            self.epoch[dataset] += 1
            self.cursor[dataset] = 0
            self._order[dataset] = self._permutation(dataset, self.epoch[dataset])
        return sample

    def next_indices(self, n: int) -> np.ndarray:
        """The next n (dataset, sample) pairs of the global stream: int64 [n, 2]."""
        out = np.empty((n, 2), dtype=np.int64)
        for i in range(n):
            if len(self.num_samples) == 1:
                dataset = 0
            else:
                self.credit += self.weights
                dataset = int(np.argmax(self.credit))
                self.credit[dataset] -= 1.0
            out[i] = dataset, self._take(dataset)
        return out

    def next_share(self, n: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """The (dataset, sample) pairs of this rank's share of the next global batch of n."""
        if n % world_size:
            raise LoomError(
                f"a global batch of {n} sequences does not split over {world_size} ranks"
            )
        pairs = self.next_indices(n)
        share = n // world_size
        return pairs[rank * share : (rank + 1) * share]

    def state_dict(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "seed": self.seed,
            "num_samples": list(self.num_samples),
            "epoch": list(self.epoch),
            "cursor": list(self.cursor),
            "credit": self.credit.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seq_len"] != self.seq_len:
            raise LoomError(
                f"the checkpoint's data position is in sequences of {state['seq_len']} tokens; "
                f"train.seq_len={self.seq_len} cannot resume it "
                f"(keep train.seq_len={state['seq_len']})"
            )
        if state["num_samples"] != self.num_samples:
            raise LoomError(
                f"the checkpoint's data position belongs to dataset(s) of {state['num_samples']} "
                f"sequences, but the data given now has {self.num_samples}; "
                "resume with the same data"
            )
        epochs = state["epoch"]
        self.seed = int(state["seed"])
        self.epoch = [int(e) for e in epochs]
        self.cursor = [int(c) for c in state["cursor"]]
        self.credit = np.array(state["credit"], dtype=np.float64)
        self._order = [self._permutation(d, e) for d, e in enumerate(self.epoch)]


class TokenLoader(SampleOrder):
    """Samples of seq_len + 1 tokens cut from token shards (see the module's docstring)."""

    def __init__(
        self,
        tokens: SplitTokens | Sequence[tuple[SplitTokens, float]],
        seq_len: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        sources = [(tokens, 1.0)] if isinstance(tokens, SplitTokens) else list(tokens)
        self.splits = [s for s, _ in sources]
        num_samples = [(s.num_tokens - 1) // seq_len for s in self.splits]
        if num_samples and min(num_samples) < 1:
            tokens_have = min(s.num_tokens for s in self.splits)
            raise LoomError(
                f"the split holds {tokens_have} tokens, fewer than one sequence of "
                f"train.seq_len={seq_len} + 1; lower train.seq_len or add data"
            )
        super().__init__(num_samples, [w for _, w in sources], seq_len, seed, shuffle)

    def batch(self, pairs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.seq_len + 1
        rows = np.stack([self.splits[d].window(int(i) * self.seq_len, length) for d, i in pairs])
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def next_batch(
        self, n: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch of n: inputs, targets [n/world, seq_len]."""
        return self.batch(self.next_share(n, rank, world_size))
