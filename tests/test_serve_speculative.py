"""Speculative decoding, by prompt lookup (`--speculate ngram`) or a draft model: proposals are
verified in the same forward pass as the rest of the batch; greedy answers are those of plain
decoding, and sampled tokens keep the model's distribution (checked exactly on Markov-chain
models whose sequence probabilities are known)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from scipy.stats import chi2
from test_serve_engine import greedy, make_engine, model, random_prompts, run_all, word_tokenizer

from loom.core.sampling import sampling_probs, verify_draft
from loom.eval.generate import generate
from loom.models.llama import ModelConfig, Transformer, build_model
from loom.serve.engine import (
    Engine,
    EngineConfig,
    SamplingParams,
    Sequence,
    StepBatch,
    propose_ngram,
)
from loom.serve.kv_cache import PagedKVCache
from loom.serve.metrics import ServeMetrics
from loom.serve.runner import LocalRunner

__all__ = ["model"]  # (the fixture, shared with the engine's tests)


def spec_counts(metrics: ServeMetrics) -> tuple[float, float]:
    """(proposed, accepted) tokens, as /metrics reports them."""
    get = metrics.registry.get_sample_value
    return get("loom_spec_proposed_tokens_total"), get("loom_spec_accepted_tokens_total")


def test_prompt_lookup_proposes_what_followed_the_latest_match() -> None:
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]  # latest of 3
    assert propose_ngram([7, 8, 1, 2, 6, 2], 3) == [6, 2]  # one token: the latest 2
    assert propose_ngram([5, 6, 7], 4) == []  # nothing repeats
    assert propose_ngram([4, 4, 4, 4], 2) == [4]  # (what is left after the match)


@pytest.mark.slow
def test_verification_keeps_the_target_distribution() -> None:
    """A one-token proposal accepted with probability p(draft), else a draw from p without it:
    the token's frequencies over 20,000 draws match p (chi-square), at a temperature and a
    top-p that cut the tail; greedy accepts exactly the argmax."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = sampling_probs(logits[None], 0.8, 0, 0.95)[0]
    assert p[-1] == 0  # top-p removed the last token
    generator = torch.Generator().manual_seed(0)
    for draft in (0, 2, 5):
        counts = torch.zeros(6)
        accepted = 0
        for _ in range(20_000):
            ok, token = verify_draft(logits, draft, 0.8, 0.95, generator)
            counts[token] += 1
            accepted += ok
        assert accepted / 20_000 == pytest.approx(float(p[draft]), abs=0.015)
        kept = p > 0
        expected = 20_000 * p[kept]
        statistic = float(((counts[kept] - expected) ** 2 / expected).sum())
        assert statistic < chi2.ppf(0.999, int(kept.sum()) - 1), (draft, counts, p)
        assert counts[~kept].sum() == 0
    assert verify_draft(logits, 0, 0.0, 1.0, None) == (True, 0)
    assert verify_draft(logits, 3, 0.0, 1.0, None) == (False, 0)


def test_greedy_answers_are_those_of_plain_decoding(model: Transformer) -> None:
    """Repetitive prompts (proposals often right) and random ones, chunked prefill beside the
    verification passes, a small cache that preempts: the same tokens as one-at-a-time
    generation, with proposals counted and many accepted."""
    prompts = [[5, 6, 7, 8] * 6, [9, 10] * 10, *random_prompts(6, 40, seed=3)]
    for num_blocks, step_tokens in ((256, 256), (40, 16)):
        engine = make_engine(model, num_blocks, max_batch=6, step_tokens=step_tokens)
        engine.config.speculate = "ngram"
        metrics = ServeMetrics(6)
        engine.metrics = metrics
        seqs = [greedy(p, 24) for p in prompts]
        engine.submit(seqs)
        run_all(engine)
        for prompt, seq in zip(prompts, seqs, strict=True):
            assert seq.output_ids == generate(model, prompt, 24, temperature=0)
        proposed, accepted = spec_counts(metrics)
        assert 0 < accepted < proposed
        assert engine.allocator.num_free == num_blocks
    assert engine.preemptions > 0


def draft_engine(target: Transformer, draft: Transformer, num_blocks: int, **kw: int) -> Engine:
    """An engine speculating with `draft` (its own cache, the same block ids)."""
    caches = [
        PagedKVCache(
            m.cfg.n_layers,
            num_blocks,
            4,
            m.cfg.n_kv_heads,
            m.cfg.attn_head_dim,
            torch.device("cpu"),
            torch.float32,
        )
        for m in (target, draft)
    ]
    config = EngineConfig(block_size=4, num_blocks=num_blocks, speculate="draft", **kw)
    return Engine(
        LocalRunner(target, caches[0]),
        word_tokenizer(target.cfg.vocab_size),
        set(),
        target.cfg.max_seq_len,
        config,
        ServeMetrics(8),
        draft=LocalRunner(draft, caches[1]),
    )


def test_a_draft_models_proposals_leave_greedy_answers_unchanged(model: Transformer) -> None:
    """A smaller random model as the draft (often wrong) and the target itself (always right),
    with chunked prefill, preemption and the prefix cache: the target's greedy answers, and
    every proposal of the target-as-draft accepted."""
    small = build_model(
        ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64),
        "cpu",
    )
    small.init_weights(seed=9)
    noisy = copy.deepcopy(model)  # the target, a little off: right part of the time
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * p.std())
    prompts = [[5, 6, 7, 8] * 6, *random_prompts(5, 40, seed=4)]
    for draft, num_blocks, step_tokens in ((small, 256, 256), (noisy, 40, 16), (model, 256, 256)):
        engine = draft_engine(model, draft.eval(), num_blocks, max_batch=6, step_tokens=step_tokens)
        seqs = [greedy(p, 20) for p in prompts]
        engine.submit(seqs[:3])
        engine.step()
        engine.submit([*seqs[3:], greedy(prompts[0], 20)])  # joins later; a cached prefix
        run_all(engine)
        for prompt, seq in zip(prompts, seqs, strict=True):
            assert seq.output_ids == generate(model, prompt, 20, temperature=0)
        proposed, accepted = spec_counts(engine.metrics)
        assert proposed > 0
        if draft is model:
            assert accepted == proposed
        elif draft is noisy:
            assert 0 < accepted < proposed and engine.preemptions > 0
        assert engine.allocator.num_free == num_blocks


def assert_markov_frequencies(seqs: list[Sequence], probs: torch.Tensor, last: int) -> None:
    """The first 3 tokens of the sequences' outputs are distributed as the Markov chain of
    transition probabilities `probs` says, from the prompt's `last` token (chi-square at
    0.1 %); continuations of probability 0 never occur."""
    counts = dict.fromkeys(itertools.product(range(len(probs)), repeat=3), 0)
    for seq in seqs:
        counts[tuple(seq.output_ids[:3])] += 1
    statistic, cells = 0.0, 0
    for (a, b, c), n in counts.items():
        expected = len(seqs) * float(probs[last, a] * probs[a, b] * probs[b, c])
        if expected > 0:
            statistic += (n - expected) ** 2 / expected
            cells += 1
        else:
            assert n == 0
    assert statistic < chi2.ppf(0.999, cells - 1), statistic


class MarkovRunner:
    """A model whose next-token logits depend on the current token only (a fixed table), so
    the probability of any continuation is known exactly. It reads the packed step as a real
    model does: one row of logits per position asked for."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def forward(self, batch: StepBatch) -> torch.Tensor:
        return self.table[batch.tokens[0, batch.logits_at]]


def sample_markov(
    table: torch.Tensor,
    draft: MarkovRunner | None,
    config: EngineConfig,
    prompt: list[int],
    max_tokens: int,
    temperature: float,
    top_p: float,
) -> None:
    """3,000 seeded continuations of `prompt` under the Markov model `table`, speculating as
    `config` says: their first 3 tokens keep the model's distribution, and proposals were
    both accepted and rejected."""
    metrics = ServeMetrics(64)
    engine = Engine(MarkovRunner(table), word_tokenizer(3), set(), 64, config, metrics, draft)
    seqs = [
        Sequence(prompt, SamplingParams(max_tokens, temperature, top_p, seed=i), lambda e: None)
        for i in range(3000)
    ]
    engine.submit(seqs)
    run_all(engine)
    assert_markov_frequencies(seqs, sampling_probs(table, temperature, 0, top_p), prompt[-1])
    proposed, accepted = spec_counts(metrics)
    assert 0 < accepted < proposed


def test_sampled_continuations_keep_the_models_distribution() -> None:
    """3,000 sampled continuations of 3 tokens, with prompt-lookup proposals verified in the
    batch: the frequency of each of the 27 continuations matches its exact probability under
    the model (chi-square), at a temperature and top-p; proposals were both accepted and
    rejected."""
    torch.manual_seed(0)
    table = torch.randn(3, 3) * 1.5
    temperature, top_p = 0.9, 0.97
    prompt = [0, 1, 2, 0, 1, 2, 0, 1]
    config = EngineConfig(64, 3000, 256, 4, 4096, speculate="ngram")
    sample_markov(table, None, config, prompt, 3, temperature, top_p)


def test_a_draft_models_samples_keep_the_targets_distribution() -> None:
    """The same with a draft model that samples from its own (different) Markov chain: a
    proposal is accepted with probability min(1, p/q), a rejected one replaced by a draw from
    max(0, p − q); the target's continuation frequencies hold (chi-square)."""
    torch.manual_seed(1)
    table, other = torch.randn(3, 3) * 1.5, torch.randn(3, 3) * 1.5
    temperature, top_p = 0.9, 0.97
    config = EngineConfig(64, 3000, 256, 4, 4096, speculate="draft", speculate_tokens=3)
    sample_markov(table, MarkovRunner(other), config, [2, 0], 4, temperature, top_p)


def test_speculate_tokens_bounds_the_proposals_per_step(model: Transformer) -> None:
    """With --speculate-tokens 2 a decoding sequence runs at most 3 tokens a step (its last
    token and 2 proposals) although its repetitive prompt offers more; with the default 4, up
    to 5."""
    for k in (2, 4):
        engine = make_engine(model, 256, speculate="ngram", speculate_tokens=k)  # type: ignore[arg-type]
        seq = greedy([5, 6, 7, 8] * 6, 20)
        engine.submit([seq])
        engine.step()  # the prompt
        steps = run_all(engine)
        assert max(steps) == k + 1
        assert seq.output_ids == generate(model, [5, 6, 7, 8] * 6, 20, temperature=0)
