"""The math of GRPO (`preftune grpo`) as TRL 1.16's GRPOTrainer computes it: pure functions of tensors, torch only.

Shapes: B completions (G per prompt, prompt by prompt), T completion tokens per row (right-padded). `mask` (B, T) is
True on the tokens the loss reads (a completion's own, up to and including its EOS; none of a truncated one with
--mask-truncated-completions). Log-probs are log pi(y_t | x, y_<t) of the sampled tokens.

One step of the loss, per token: the importance weight w of the current policy over the sampling one
(`importance_weights`, per token or per sequence, GSPO), the loss type's surrogate of w and the advantage
(`GRPO_LOSSES`: PPO's clip with clip-higher and two-sided clipping, CISPO, SAPO), plus beta times the k3 KL to the
reference (`k3_kl`), masked (`--top-entropy-quantile`: `high_entropy_mask`) and reduced by the loss type's
normaliser (`reduce_tokens`). `GRPO_LOSSES` is the one table of the loss types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
STD_EPSILON = 1e-4  # TRL's: advantages are divided by std + 1e-4

Total = Callable[[torch.Tensor], torch.Tensor]  # adds a tensor over the processes (identity in one process)


def nan_std(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation with Bessel's correction over the non-NaN entries (TRL's nanstd): NaN where fewer than two
    are left. (N,) -> scalar, or (P, G) with dim=1 -> (P,)."""
    count = (~values.isnan()).sum(dim=dim)
    mean = values.nanmean(dim=dim, keepdim=dim is not None)
    variance = ((values - mean) ** 2).nanmean(dim=dim) * count / (count - 1)
    return torch.where(count > 1, variance, torch.full_like(variance, float("nan"))).sqrt()


def global_nan_std(values: torch.Tensor, total: Total) -> torch.Tensor:
    """`nan_std` of every process's values together (`total` adds over the processes), each holding some. (N,) ->
    scalar."""
    judged = ~values.isnan()
    count, summed = total(torch.stack([judged.sum().to(values.dtype), values.nansum()])).unbind()
    mean = summed / count.clamp(min=1)
    squares = total(torch.where(judged, (values - mean) ** 2, 0.0).sum())
    return (squares / (count - 1)).sqrt() if count > 1 else values.new_tensor(float("nan"))


def group_advantages(rewards: torch.Tensor, judged: torch.Tensor, k: int, scale_rewards: str,
                     total: Total | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantages (Shao et al. 2024, arXiv:2402.03300, sec. 4.1.2, outcome supervision):
    A_i = (r_i - mean_group(r)) / (std + 1e-4), std the group's (`group`), every process's rollout's (`batch`,
    PPO Lite's batch scaling, arXiv:2508.08221) or none (`none`: A_i = r_i - mean, Dr. GRPO, arXiv:2503.20783).
    Means and stds leave out the samples the reward could not judge (NaN in TRL), whose advantage is 0, as is
    every advantage of a group whose std is undefined (fewer than two judged) under `group`.
    (P * k,) rewards and judged (bool), prompt by prompt; `total` adds over processes (batch std) ->
    (advantages (P * k,), zero_std (P * k,) bool: the std used is 0, TRL's frac_reward_zero_std)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    values = torch.where(judged, rewards, float("nan"))
    grouped = values.view(-1, k)
    means = grouped.nanmean(dim=1).repeat_interleave(k)
    if scale_rewards == "batch":
        std = global_nan_std(values, total or (lambda tensor: tensor)).expand_as(values)
    else:  # under `none` the group's std is still what frac_reward_zero_std reports
        std = nan_std(grouped, dim=1).repeat_interleave(k)
    advantages = values - means
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPSILON)
    return torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def importance_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                       level: str) -> torch.Tensor:
    """log w: per token, log pi(y_t) - log pi_old(y_t), (B, T); per sequence (GSPO, Zheng et al. 2025,
    arXiv:2507.18071), the mean of those over the completion's tokens, (B, 1)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || pi_ref) per token (Shao et al. 2024, eq. 4; Schulman 2020):
    exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 >= 0. (B, T) x2 -> (B, T)."""
    difference = ref_logps - logps
    return torch.exp(difference) - difference - 1


@dataclass(frozen=True)
class SurrogateParams:
    """The surrogates' options (TRL's names): epsilon_low is --epsilon, epsilon_high --epsilon-high (unset: epsilon)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


def clipped_surrogate(weights: torch.Tensor, advantages: torch.Tensor, logps: torch.Tensor,
                      params: SurrogateParams) -> torch.Tensor:
    """PPO's clipped surrogate as a loss (Schulman et al. 2017, arXiv:1707.06347, eq. 7) with DAPO's clip-higher
    (Yu et al. 2025, arXiv:2503.14476) and INTELLECT-2's two-sided clip (arXiv:2505.07291):
    -min(min(w, delta) * A, clip(w, 1 - eps_low, 1 + eps_high) * A). (B, T) or (B, 1) weights, (B, 1) advantages."""
    clipped = torch.clamp(weights, 1 - params.epsilon_low, 1 + params.epsilon_high)
    if params.delta is not None:
        weights = torch.clamp(weights, max=params.delta)
    return -torch.min(weights * advantages, clipped * advantages)


def cispo_surrogate(weights: torch.Tensor, advantages: torch.Tensor, logps: torch.Tensor,
                    params: SurrogateParams) -> torch.Tensor:
    """CISPO (MiniMax 2025, arXiv:2506.13585): -sg(min(w, eps_high)) * A * log pi(y_t), the weight clipped
    and detached, the gradient through the log-prob. TRL's eps_high is --epsilon-high as is (ScaleRL: 5)."""
    return -torch.clamp(weights, max=params.epsilon_high).detach() * advantages * logps


def sapo_surrogate(weights: torch.Tensor, advantages: torch.Tensor, logps: torch.Tensor,
                   params: SurrogateParams) -> torch.Tensor:
    """SAPO's soft gate (arXiv:2511.20347): -(4 / tau) sigmoid(tau (w - 1)) * A, tau the
    positive-advantage temperature where A > 0, the negative one elsewhere."""
    tau = torch.where(advantages > 0, params.sapo_temperature_pos, params.sapo_temperature_neg)
    return -torch.sigmoid(tau * (weights - 1)) * 4 / tau * advantages


def reduce_tokens(per_token: torch.Tensor, mask: torch.Tensor, normaliser: str, row_tokens: float) -> torch.Tensor:
    """A loss type's reduction of the per-token loss (B, T) to a scalar, as TRL 1.16's `_compute_loss`:
    - `sequence`: mean over rows of each row's token mean (GRPO, Shao et al. 2024, eq. 3);
    - `tokens`: the mean over all the batch's tokens (BNPO);
    - `rows`: mean over rows of sum_t / `row_tokens`: Dr. GRPO's constant (max completion length,
      arXiv:2503.20783), or DAPO's token-level mean (arXiv:2503.14476) written per row, `row_tokens` the rollout's
      mean completion tokens per row over every process: mean_i sum_t / (N / B) = sum / N, N its tokens.
    A row with no token (a masked truncated completion) adds 0 and still counts as a row."""
    masked = per_token * mask
    if normaliser == "sequence":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if normaliser == "tokens":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if normaliser == "rows":
        return masked.sum(-1).mean() / row_tokens
    raise ValueError(f"unknown normaliser {normaliser!r}")


Surrogate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SurrogateParams], torch.Tensor]


@dataclass(frozen=True)
class GRPOLossSpec:
    surrogate: Surrogate
    normaliser: str  # `reduce_tokens`' (`rows`: row_tokens is `denominator`'s)
    denominator: str  # `rows` only: "max_length" (Dr. GRPO) or "mean_length" (the rollout's tokens per row)
    meaning: str
    paper: str
    clipped: bool = True  # logs TRL's clip_ratio/* metrics (else cispo_clip_ratio for cispo, none for sapo)


# TRL 1.16's loss types (luspo and vespo left out), its default dapo first
GRPO_LOSSES: dict[str, GRPOLossSpec] = {
    "dapo": GRPOLossSpec(clipped_surrogate, "rows", "mean_length",
                         "clipped surrogate, normalised by the rollout's tokens (all processes) (DAPO)",
                         "Yu et al. 2025, DAPO: An Open-Source LLM Reinforcement Learning System at Scale, "
                         "arXiv:2503.14476"),
    "grpo": GRPOLossSpec(clipped_surrogate, "sequence", "",
                         "clipped surrogate, each completion's token mean, then the mean over completions (GRPO)",
                         "Shao et al. 2024, DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open "
                         "Language Models, arXiv:2402.03300"),
    "bnpo": GRPOLossSpec(clipped_surrogate, "tokens", "",
                         "clipped surrogate, the mean over each process's minibatch tokens (BNPO)",
                         "TRL 1.16's batch-normalised GRPO loss (GRPOConfig loss_type='bnpo'; no paper)"),
    "dr_grpo": GRPOLossSpec(clipped_surrogate, "rows", "max_length",
                            "clipped surrogate, normalised by completions x --max-new-tokens (Dr. GRPO)",
                            "Liu et al. 2025, Understanding R1-Zero-Like Training: A Critical Perspective, "
                            "arXiv:2503.20783"),
    "cispo": GRPOLossSpec(cispo_surrogate, "rows", "mean_length",
                          "clipped, detached importance weight times A log pi, DAPO's normaliser (CISPO)",
                          "MiniMax 2025, MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention, "
                          "arXiv:2506.13585", clipped=False),
    "sapo": GRPOLossSpec(sapo_surrogate, "sequence", "",
                         "a soft sigmoid gate of the weight in place of the clip, GRPO's normaliser (SAPO)",
                         "Soft Adaptive Policy Optimization, arXiv:2511.20347", clipped=False),
}


def clip_ratios(weights: torch.Tensor, advantages: torch.Tensor,
                params: SurrogateParams) -> dict[str, torch.Tensor]:
    """TRL's clip indicators (bool, the weights' shape): `low` w < 1 - eps_low where A < 0, `high` w > 1 + eps_high
    where A > 0, `region` either."""
    low = (weights < 1 - params.epsilon_low) & (advantages < 0)
    high = (weights > 1 + params.epsilon_high) & (advantages > 0)
    return {"low": low, "high": high, "region": low | high}


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float,
                      gathered: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the tokens of entropy at or above the (1 - quantile) quantile of the masked tokens' entropies (Beyond the
    80/20 Rule, arXiv:2506.01939: the top `quantile` of tokens by entropy).
    `gathered`: every process's masked entropies (unset: this batch's). (B, T) x2 -> (B, T) bool."""
    population = entropies[mask.bool()].float() if gathered is None else gathered
    if population.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(population, 1 - quantile)
    return (entropies * mask >= threshold) & mask.bool()


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's metric mean: over the masked tokens of (B, T) values, or over the rows of (B, 1) ones."""
    if values.shape[1] == 1:
        return values.float().mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
