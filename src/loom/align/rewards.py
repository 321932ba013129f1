"""GRPO's rewards: Python functions named in the config ("module:function", given the prompt,
the completion and the data row's fields) and a reward model, each weighted."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loom.core.chat import ChatTemplate
from loom.core.errors import LoomError
from loom.core.tokenizer import load_tokenizer
from loom.finetune.config import GRPOConfig
from loom.models.sources import load_model

RewardFunction = Callable[..., Any]


def import_reward(name: str) -> RewardFunction:
    """The function `module:function` (the module importable from the Python path)."""
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LoomError(
            f"grpo.rewards {name!r}: module {module_name!r} cannot be imported ({e}); put it on "
            "PYTHONPATH or in the folder you run loom from"
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise LoomError(f"grpo.rewards {name!r}: {module_name} has no function {attribute!r}")
    return function


class RewardModelScorer:
    """A reward model's score of prompt + completion, rendered as its own training rendered
    preference pairs (its tokenizer's chat template; the raw prompt + completion + EOS without
    one)."""

    def __init__(self, path: Path, device: torch.device, scratch: Path) -> None:
        self.model, tokenizer_dir = load_model(path, torch.float32, scratch, device)
        if self.model.cfg.num_labels != 1:
            raise LoomError(
                f"grpo.reward_model {path} is not a reward model (num_labels="
                f"{self.model.cfg.num_labels}); train one with finetune.method=reward"
            )
        self.model.requires_grad_(False).eval()
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.template = ChatTemplate.from_tokenizer_dir(tokenizer_dir)
        self.device = device

    def _text(self, prompt: Any, completion: str) -> str:
        if self.template.is_raw:
            assert isinstance(prompt, str)
            return prompt + completion + (self.template.eos_token or "")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.template.render([*messages, {"role": "assistant", "content": completion}])

    @torch.no_grad()
    def __call__(self, prompts: list[Any], completions: list[str]) -> list[float]:
        texts = [self._text(p, c) for p, c in zip(prompts, completions, strict=True)]
        limit = self.model.cfg.max_seq_len
        rows = [
            e.ids[-limit:] for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)
        ]
        tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for i, ids in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
        last = torch.tensor([len(ids) - 1 for ids in rows])[:, None].to(self.device)
        scores = self.model(tokens.to(self.device))[..., 0].gather(1, last)
        return scores.squeeze(1).float().cpu().tolist()


class Rewards:
    """Each completion's reward from each source, and their weighted sum."""

    def __init__(self, cfg: GRPOConfig) -> None:
        """The functions imported now (a bad name fails before training starts); the reward
        model is loaded by `load_model`, once the device is known."""
        self.functions = [(name, import_reward(name)) for name in cfg.rewards]
        self.model_path = Path(cfg.reward_model) if cfg.reward_model else None
        self.model: RewardModelScorer | None = None
        self.names = [name.rpartition(":")[2] for name in cfg.rewards]
        if self.model_path is not None:
            self.names.append("reward_model")
        self.weights = torch.tensor(cfg.reward_weights or [1.0] * len(self.names))

    def load_model(self, device: torch.device, scratch: Path) -> None:
        if self.model_path is not None:
            self.model = RewardModelScorer(self.model_path, device, scratch)

    def score(
        self, records: list[dict[str, Any]], completions: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[completions, sources] rewards and [completions] their weighted sums; `records[i]`
        is the data row of completion i's prompt."""
        columns = []
        for name, function in self.functions:
            column = []
            for record, completion in zip(records, completions, strict=True):
                fields = {k: v for k, v in record.items() if k != "prompt"}
                try:
                    value = function(prompt=record["prompt"], completion=completion, **fields)
                except Exception as e:
                    raise LoomError(
                        f"reward function {name} failed: {type(e).__name__}: {e}"
                    ) from e
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise LoomError(
                        f"reward function {name} returned {value!r}; it must return a number"
                    )
                if not math.isfinite(value):
                    raise LoomError(f"reward function {name} returned {value}; give finite rewards")
                column.append(float(value))
            columns.append(column)
        if self.model is not None:
            columns.append(self.model([r["prompt"] for r in records], completions))
        per_source = torch.tensor(columns, dtype=torch.float32).T
        return per_source, per_source @ self.weights
