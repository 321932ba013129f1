"""Rollouts: the policy's completions of a batch of prompts, sampled by the serving engine
(paged KV cache, continuous batching) running the policy module itself, so the weights the
trainer just updated are the weights that sample: no copy, no sync."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from loom.core.chat import ChatTemplate, stop_token_ids
from loom.models.llama import Transformer
from loom.serve.engine import Engine, EngineConfig, SamplingParams, Sequence
from loom.serve.runner import LocalRunner, RunnerSetup, kv_blocks, new_cache


@dataclass
class Completion:
    """One sampled completion: its tokens (the end-of-text token included when it stopped)."""

    ids: list[int]
    stopped: bool  # ended by an end-of-text token, not by max_new_tokens


class Rollouts:
    """Samples completions from `model` with the engine; one engine per call, over a KV cache
    kept between calls."""

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, tokenizer_dir: Path, template: ChatTemplate
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer, tokenizer_dir, template)
        device = model.rope_cos.device
        setup = RunnerSetup(None, None, EngineConfig().block_size, None, 1)
        self.blocks = kv_blocks(model, setup, device)
        self.cache = new_cache(model, setup, self.blocks, device)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
    ) -> list[Completion]:
        """One completion per (prompt, seed): a seed fixes its sampling, whatever else runs in
        the same batch."""
        sequences = [
            Sequence(
                prompt,
                SamplingParams(max_new_tokens, temperature, top_p, seed=seed),
                lambda event: None,
            )
            for prompt, seed in zip(prompts, seeds, strict=True)
        ]
        config = EngineConfig(
            max_batch=len(sequences), max_queue=len(sequences), num_blocks=self.blocks
        )
        engine = Engine(
            LocalRunner(self.model, self.cache),
            self.tokenizer,
            self.stop_ids,
            self.model.cfg.max_seq_len,
            config,
        )
        training = self.model.training
        self.model.eval()
        try:
            engine.submit(sequences)
            while engine.has_work():
                engine.step()
        finally:
            self.model.train(training)
        return [
            Completion(
                s.output_ids + ([s.stop_token] if s.stop_token is not None else []),
                s.stop_token is not None,
            )
            for s in sequences
        ]
