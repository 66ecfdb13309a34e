"""GRPO (`preftune grpo`): group-relative policy optimisation (Shao et al. 2024, arXiv:2402.03300; DeepSeek-R1) as
TRL 1.16's GRPOTrainer runs it: setup -> train -> save -> cleanup, on the shared online loop (`online.train`).

Per rollout: G = --num-generations samples per prompt, each scored by --reward; each sample's advantage is its
reward less its group's mean, scaled by the group's reward std (--scale-rewards group), the whole rollout's (batch,
every process's) or not at all (none), + 1e-4; a sample the reward could not judge (None) has advantage 0 and is
left out of its group's statistics, as TRL. The loss per token is --loss-type's surrogate of the importance weight
(per token, or per sequence with --importance-sampling-level sequence, GSPO) and the advantage, plus --beta times
the k3 KL to the reference (no reference is run or held when beta is 0), reduced by the loss type's normaliser.
No critic, no reward shaping. The math is objectives/group_relative.py; per-token log-probs, advantages, losses and
gradients equal TRL 1.16's (tests/test_grpo_trl.py).

Several processes: each process samples whole groups, so the group statistics are its own; --scale-rewards batch
and dapo's and cispo's token normaliser are over every process's rollout (all-reduced), so 2 processes x b prompts
take the step 1 process x 2b takes, as do grpo, dr_grpo and sapo (means over completions). bnpo's is the mean over
each process's own minibatch tokens (TRL: each device's batch), which 2 x b and 1 x 2b do not share.
--top-entropy-quantile's threshold is over each micro-batch's tokens (all processes'), as TRL's is over each
per_device_train_batch_size batch: --local-rollout-forward-batch-size changes it when it splits the minibatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from preftune.config import Config
from preftune.forward.rewards import RewardFunction
from preftune.forward.rollout import token_logps_and_entropies
from preftune.objectives.group_relative import (
    GRPO_LOSSES,
    GRPOLossSpec,
    SurrogateParams,
    clip_ratios,
    global_nan_std,
    group_advantages,
    high_entropy_mask,
    importance_weights,
    k3_kl,
    masked_token_mean,
    reduce_tokens,
)
from preftune.recipes import online
from preftune.recipes.online import OnlineRun, Rollout


def surrogate_params(config: Config) -> SurrogateParams:
    r = config.rl
    return SurrogateParams(epsilon_low=r.epsilon, epsilon_high=r.epsilon if r.epsilon_high is None else r.epsilon_high,
                           delta=r.delta, sapo_temperature_pos=r.sapo_temperature_pos,
                           sapo_temperature_neg=r.sapo_temperature_neg)


def grpo_metric_names(config: Config) -> tuple[str, ...]:
    """The per-minibatch metrics of the loss, TRL's names: loss, entropy, kl (beta > 0), the clip ratios."""
    loss_type = config.loss.loss_type
    clipping = (("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
                if GRPO_LOSSES[loss_type].clipped else ("cispo_clip_ratio",) if loss_type == "cispo" else ())
    return ("loss", "entropy", *(("kl",) if config.loss.beta != 0 else ()), *clipping)


def truncated(rollout: Rollout, eos_token_id: int | None) -> torch.Tensor:
    """(B,) bool: the completions that did not end on the EOS token (cut off at --max-new-tokens)."""
    return torch.tensor([s.completion_ids[-1] != eos_token_id for s in rollout.samples], device=rollout.mask.device)


def gather_tokens(values: torch.Tensor) -> torch.Tensor:
    """Every process's 1-D `values` together (each may hold a different number): this process's alone in one."""
    from accelerate.state import PartialState
    from accelerate.utils import gather, pad_across_processes

    if PartialState().num_processes == 1:
        return values
    padded = gather(pad_across_processes(values, dim=0, pad_index=-1e9))
    return padded[padded != -1e9]  # entropies are >= 0: the padding cannot be one of them


@dataclass
class GRPOObjective:
    config: Config
    pad_token_id: int = 0  # the tokenizer's: `setup` builds the objective once it is loaded, and never changes it
    eos_token_id: int | None = None
    command: str = "grpo"
    minibatch_unit: int = 1
    splits_minibatch: bool = True  # every loss type's loss is a mean over rows, or (bnpo) over tokens
    metric_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.metric_names = grpo_metric_names(self.config)

    @property
    def spec(self) -> GRPOLossSpec:
        return GRPO_LOSSES[self.config.loss.loss_type]

    @property
    def kl_coef(self) -> float:
        return self.config.loss.beta

    @property
    def uses_reference(self) -> bool:
        return self.config.loss.beta != 0  # TRL: with beta 0 there is no reference model

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def score(self, run: OnlineRun, rollout: Rollout) -> dict[str, float]:
        """The advantages, the loss mask (less truncated completions with --mask-truncated-completions) and dapo's
        tokens per row into `rollout.extras`; TRL's reward metrics, over every process's rollout and the samples the
        reward judged (reward 0 where it judged none and reward_std 0 below two, where TRL logs NaN)."""
        r = self.config.rl
        total = lambda tensor: run.group.accelerator.reduce(tensor, reduction="sum")  # noqa: E731
        advantages, zero_std = group_advantages(rollout.scores, rollout.judged, r.num_generations, r.scale_rewards,
                                                total)
        cut = truncated(rollout, self.eos_token_id)
        loss_mask = rollout.mask & ~cut[:, None] if r.mask_truncated_completions else rollout.mask
        tokens, rows = total(torch.stack([loss_mask.sum().float(), loss_mask.new_tensor(len(cut), dtype=torch.float)]))
        rollout.extras.update(advantages=advantages, loss_mask=loss_mask,
                              row_tokens=torch.full_like(advantages, (tokens.clamp(min=1.0) / rows).item()))
        values = torch.where(rollout.judged, rollout.scores, float("nan"))
        summed, judged = total(torch.stack([values.nansum(), rollout.judged.sum().float()]))
        std = global_nan_std(values, total)  # TRL logs NaN where fewer than 2 were judged; 0 here, as preftune's
        return {"reward": (summed / judged).item() if judged > 0 else 0.0,  # objective/scores (no NaN logged)
                "reward_std": 0.0 if std.isnan() else std.item(),
                "frac_reward_zero_std": zero_std.float().mean().item(),
                "completions/clipped_ratio": cut.float().mean().item()}

    def loss(self, model: torch.nn.Module, minibatch: Rollout,
             on_policy: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """TRL 1.16's `_compute_loss` on a minibatch (or micro-batch): (loss, metrics)."""
        c, spec, params = self.config, self.spec, surrogate_params(self.config)
        logps, entropies = token_logps_and_entropies(model, minibatch.samples, self.pad_token_id, minibatch.width,
                                                     minibatch.mask.device, c.train.batch_layout)
        mask = minibatch.extras["loss_mask"].float()
        old_logps = logps.detach() if on_policy else minibatch.logps
        weights = torch.exp(importance_weights(logps, old_logps, mask, c.rl.importance_sampling_level))
        advantages = minibatch.extras["advantages"].unsqueeze(1)
        per_token = spec.surrogate(weights, advantages, logps, params)
        if c.rl.top_entropy_quantile < 1.0:
            kept = high_entropy_mask(entropies, mask, c.rl.top_entropy_quantile,
                                     gather_tokens(entropies[mask.bool()].float()))
            per_token = per_token * kept
        metrics = {"entropy": masked_token_mean(entropies, mask)}
        if c.loss.beta != 0:
            # times the importance weight: TRL 1.16's default use_bias_correction_kl (DeepSeek-V3.2), the KL's
            # gradient the unbiased reverse-KL gradient off-policy (w = 1 on-policy, yet its gradient is not 0)
            kl = k3_kl(logps, minibatch.ref_logps) * weights
            per_token = per_token + c.loss.beta * kl
            metrics["kl"] = masked_token_mean(kl.detach(), mask)
        row_tokens = (float(c.sample.max_new_tokens) if spec.denominator == "max_length"
                      else minibatch.extras["row_tokens"][0].item())
        loss = reduce_tokens(per_token, mask, spec.normaliser, row_tokens)
        with torch.no_grad():
            if spec.clipped:
                # TRL measures the clip on the weight after --delta's cap
                capped = weights if params.delta is None else weights.clamp(max=params.delta)
                for name, clipped in clip_ratios(capped, advantages, params).items():
                    metrics[f"clip_ratio/{name}_mean"] = masked_token_mean(clipped.float(), mask)
            elif c.loss.loss_type == "cispo":
                metrics["cispo_clip_ratio"] = masked_token_mean(
                    ((weights > params.epsilon_high) & (advantages > 0)).float(), mask)
        return loss, {"loss": loss.detach(), **metrics}

    def loss_terms(self, model: torch.nn.Module, minibatch: Rollout,
                   on_policy: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        yield self.loss(model, minibatch, on_policy)  # one forward: one term

    def loss_count(self, minibatch: Rollout) -> float:
        """bnpo: the minibatch's loss tokens (its loss is their mean); the others: its completions."""
        if self.spec.normaliser == "tokens":
            return minibatch.extras["loss_mask"].sum().item()
        return len(minibatch.samples)


def setup(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    """The run, its objective built once the tokenizer is loaded (pad and EOS ids); no reference is loaded with
    the policy when --beta is 0."""
    return online.setup(config, "grpo",
                        lambda tokenizer: GRPOObjective(config, tokenizer.pad_token_id, tokenizer.eos_token_id),
                        reward=reward, need_reference=config.loss.beta != 0)


def run(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    """setup -> train -> save, with cleanup whatever happens (`reward`: in memory, in place of --reward)."""
    return online.run(setup(config, reward))
