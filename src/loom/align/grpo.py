"""GRPO's arithmetic (Shao et al. 2024, DeepSeekMath; the variants TRL names): advantages
relative to each prompt's group, the clipped policy-ratio loss with a KL penalty, and how the
per-token loss is averaged."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """[prompts × group_size] rewards (each prompt's samples together) -> advantages: reward
    minus its group's mean, divided by the group's (or the batch's) standard deviation + 1e-4
    unless `scale` is "none" (Dr. GRPO)."""
    groups = rewards.view(-1, group_size)
    centred = (groups - groups.mean(1, keepdim=True)).flatten()
    if scale == "none":
        return centred
    if scale == "group":
        std = groups.std(1, keepdim=True).expand_as(groups).flatten()
    else:
        std = rewards.std().expand_as(rewards)
    return centred / (std + 1e-4)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities of `tokens` under `logits` / temperature (the distribution sampled)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class GRPOLoss:
    """The loss of one batch of completions and what the metrics show of it."""

    loss: torch.Tensor
    kl: float  # mean per-token KL to the reference (0 without one)
    clip_fraction: float  # share of tokens whose ratio was clipped


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    clip: float,
    loss: str,
    max_new_tokens: int,
) -> GRPOLoss:
    """[completions, tokens] log-probabilities under the policy (with grad), the sampling
    policy and the reference; [completions] advantages; mask: the completions' tokens.

    Per token: −min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A) + β·ρ·KL, with ρ = π/π_old and the KL
    estimated as exp(ref − logp) − (ref − logp) − 1 (Schulman's k3), importance-weighted by ρ
    as the samples come from π_old (TRL's use_bias_correction_kl)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logps)
    if ref_logps is not None and beta:
        delta = ref_logps - logps
        kl = (torch.exp(delta) - delta - 1) * ratio  # (weighted to the policy's own samples)
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    tokens = mask.sum().clamp(min=1.0)
    if loss == "grpo":
        value = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    elif loss == "dr_grpo":
        value = (per_token * mask).sum() / (per_token.shape[0] * max_new_tokens)
    else:  # dapo: every token of the batch weighs the same
        value = (per_token * mask).sum() / tokens
    low = (ratio < 1 - clip) & (adv < 0)
    high = (ratio > 1 + clip) & (adv > 0)
    clip_fraction = float(((low | high) * mask).sum() / tokens)
    return GRPOLoss(value, float((kl.detach() * mask).sum() / tokens), clip_fraction)
