"""PPO's arithmetic for language models (Ouyang et al. 2022; Schulman et al. 2017): per-token
rewards (the sequence's score on its last token, a KL penalty to the reference on every
token), generalised advantage estimation, and the clipped policy and value losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def token_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """[completions, tokens]: −kl_coef·(log π − log π_ref) on each token, plus the completion's
    score on its last token."""
    rewards = torch.zeros_like(logps)
    if ref_logps is not None and kl_coef:
        rewards = -kl_coef * (logps - ref_logps)
    last = mask.long().sum(1) - 1
    rewards = rewards * mask
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor) -> float:
    """Mean per-token log π − log π_ref over the sampled tokens (the KL the penalty charges;
    0 without a reference)."""
    if ref_logps is None:
        return 0.0
    mask = mask.to(logps.dtype)
    return float(((logps - ref_logps) * mask).sum() / mask.sum().clamp(min=1.0))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns: δ_t = r_t + γ·V_{t+1} − V_t (V = 0 after the last token),
    A_t = δ_t + γλ·A_{t+1}; returns = A + V. Masked positions are 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std over the masked entries (std with Bessel's correction)."""
    picked = x[mask.bool()]
    return (x - picked.mean()) / (picked.std() + 1e-8) * mask


@dataclass
class PPOLoss:
    loss: torch.Tensor
    policy_loss: float
    value_loss: float
    clip_fraction: float
    value_clip_fraction: float


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    value_clip: float,
    value_coef: float,
) -> PPOLoss:
    """Token means of max(−A·ρ, −A·clip(ρ, 1 ± ε)) and ½·max((V − R)², (V_clipped − R)²),
    V_clipped = V_old + clip(V − V_old, ± value_clip); loss = policy + value_coef · value."""
    mask = mask.to(logps.dtype)
    tokens = mask.sum().clamp(min=1.0)
    ratio = torch.exp(logps - old_logps)
    policy = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    policy_loss = (policy * mask).sum() / tokens
    value_loss = (value * mask).sum() / tokens
    clipped = ((ratio - 1).abs() > clip).to(mask.dtype)
    value_clipped = ((values - old_values).abs() > value_clip).to(mask.dtype)
    return PPOLoss(
        policy_loss + value_coef * value_loss,
        policy_loss.item(),
        value_loss.item(),
        float((clipped * mask).sum() / tokens),
        float((value_clipped * mask).sum() / tokens),
    )
