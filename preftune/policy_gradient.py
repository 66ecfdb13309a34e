"""The math of the online RL loops (PPO, RLOO): pure functions of tensors, torch only.

Shapes: B completions, T completion tokens per row (right-padded). `mask` (B, T) bool is True on a completion's own
tokens (up to and including its EOS). Position t of a row is the t-th sampled token: its log-prob is the policy's
log pi(y_t | x, y_<t), and its value V(s_t) is the critic's estimate before that token is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True (0 when nothing is): any shape -> scalar."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked entries, var with Bessel's correction; 0 where masked out.
    shift_mean=False adds the mean back (whitening the scale only, as for rewards). (B, T) -> (B, T)."""
    mean = masked_mean(values, mask)
    count = mask.sum().clamp(min=2)
    variance = (((values - mean) ** 2) * mask).sum() / (count - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last completion token, (B, T) -> (B,) long (0 for an empty row)."""
    return (mask.long().sum(1) - 1).clamp(min=0)


def shaped_rewards(
    logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF with a KL penalty (Ziegler et al. 2019, arXiv:1909.08593, eq. 2; Ouyang et al.
    2022, arXiv:2203.02155, eq. 2): r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)), plus the sequence's score at
    its last token. (B, T), (B, T), (B,), (B, T) -> (rewards (B, T), the KL penalty part alone (B, T))."""
    penalty = -kl_coef * (logps - ref_logps) * mask
    rewards = penalty.clone()
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, penalty


def generalized_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016, arXiv:1506.02438, eq. 16): delta_t = r_t + gamma V(s_{t+1}) - V(s_t),
    A_t = sum_l (gamma lam)^l delta_{t+l}, with V = 0 past a row's last token; returns R_t = A_t + V(s_t).
    (B, T) x3 -> (advantages (B, T), returns (B, T)), both 0 where masked out."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar, with gradients
    clipfrac: torch.Tensor  # share of tokens (or sequences) where the clipped term was the larger loss
    approxkl: torch.Tensor  # 0.5 * mean (log ratio)^2, an estimate of KL(old || new)
    ratio: torch.Tensor  # mean probability ratio new / old


def clipped_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
    cliprange: float,
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), as a loss to minimise:
    mean over masked entries of max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)), rho = exp(log pi - log pi_old).
    Per token ((B, T) inputs, PPO) or per sequence ((B,) inputs with an all-True mask, RLOO). `old_logps` None:
    on-policy (no update since the samples were drawn), log pi_old is log pi detached, so rho is exactly 1 with
    the gradient of log pi (TRL's, with one iteration per rollout)."""
    log_ratio = logps - (logps.detach() if old_logps is None else old_logps)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        mean_ratio = masked_mean(ratio, mask)
    return PolicyLoss(loss, clipfrac, approxkl, mean_ratio)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (Schulman et al. 2017's baselines implementation; Ziegler et al. 2019):
    0.5 * mean max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2). (B, T) x3 -> (loss, clipfrac)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clipfrac


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740, eq. 6; Kool et al. 2019): each of the k samples of a prompt
    is baselined by the mean reward of the other k - 1: A_i = r_i - (sum_j r_j - r_i) / (k - 1).
    (P * k,) rewards, prompt by prompt (k consecutive samples each) -> (P * k,)."""
    if k < 2:
        raise ValueError("leave-one-out needs at least 2 samples per prompt")
    grouped = rewards.view(-1, k)
    baselines = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baselines).view(-1)


def normalized(values: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(values - mean) / (std + 1e-4) over the whole batch, std with Bessel's correction (TRL's
    normalize_advantages, over every process's values). `total` adds a tensor over the processes (each holding
    some of the values, not necessarily as many); unset: these are all the values. (N,) -> (N,)."""
    total = total or (lambda tensor: tensor)
    count, summed = total(torch.stack([values.new_tensor(values.numel()), values.sum()])).unbind()
    mean = summed / count
    squares = total(((values - mean) ** 2).sum())
    std = (squares / (count - 1)).sqrt() if count > 1 else values.new_tensor(0.0)
    return (values - mean) / (std + 1e-4)


def adaptive_kl_coef(kl_coef: float, current_kl: float, target: float, horizon: int, num_samples: int) -> float:
    """The KL coefficient that tracks a target KL (Ziegler et al. 2019, arXiv:1909.08593, sec. 2.2), after a
    rollout of `num_samples` completions whose mean KL was `current_kl`:
    kl_coef * (1 + clip(current_kl / target - 1, -0.2, 0.2) * num_samples / horizon).
    Refuses (ValueError, never clamps) a kl_coef <= 0, which a multiplicative controller cannot move (or which rewards
    drift), and a horizon of at most num_samples / 5, where the factor can reach 0 or below; config.validate refuses
    both before a run, this catches a launch with more processes than --num-processes counts."""
    if kl_coef <= 0:
        raise ValueError(f"the adaptive KL controller's kl_coef must be > 0, got {kl_coef}")
    if 5 * horizon <= num_samples:
        raise ValueError(f"the adaptive KL controller's horizon ({horizon}) must be more than a fifth of the "
                         f"rollout's {num_samples} samples: 1 - 0.2 * {num_samples} / {horizon} <= 0 would make "
                         "kl_coef 0 or negative (--kl-horizon)")
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * num_samples / horizon)
