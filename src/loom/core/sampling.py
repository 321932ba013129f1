"""Next-token sampling (temperature, top-k, top-p), shared by generation and the serving engine,
and the acceptance rule of speculative decoding that keeps the target's distribution."""

from __future__ import annotations

import torch


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """The distribution [batch, vocab] that `sample_next` draws from (temperature > 0)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first is kept).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def verify_draft(
    logits: torch.Tensor,
    draft: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    draft_probs: torch.Tensor | None = None,
) -> tuple[bool, int]:
    """Speculative decoding's test of one proposed token against the target's logits [vocab]:
    (accepted, token). `draft_probs` [vocab] is the distribution the draft sampled it from
    (None: proposed with certainty, as prompt lookup does).

    Greedy: accepted when it is the argmax. Sampled (Leviathan et al., 2023): accepted with
    probability min(1, p(draft) / q(draft)); when rejected, the token is drawn from
    max(0, p − q) renormalised — so tokens are distributed exactly as p."""
    if temperature <= 0:
        best = int(logits.argmax())
        return best == draft, best
    probs = sampling_probs(logits[None], temperature, 0, top_p)[0]
    q = (
        draft_probs
        if draft_probs is not None
        else torch.zeros_like(probs).index_fill_(0, torch.tensor([draft]), 1.0)
    )
    if torch.rand((), generator=generator) * q[draft] < probs[draft]:
        return True, draft
    residual = (probs - q).clamp_(min=0.0)
    return False, int(torch.multinomial(residual, 1, generator=generator))
