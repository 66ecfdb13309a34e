"""PPO (`preftune ppo`): RLHF with an actor-critic, as in Ziegler et al. 2019 (arXiv:1909.08593), Ouyang et al.
2022 (arXiv:2203.02155) and the DPO paper's baseline: setup -> train -> save -> cleanup.

Per rollout (the loop is `online.train`, shared with RLOO): sample completions from the policy, score them with the
reward, per-token reward r_t = -kl_coef (log pi - log pi_ref) with the score added at the last token, values from
the critic, GAE advantages (whitened) and returns; then `num_ppo_epochs` passes of `num_mini_batches` minibatches
of the clipped surrogate plus vf_coef times the clipped value loss. The math is in policy_gradient.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from preftune.config import Config
from preftune.logprobs import model_inputs, unwrapped
from preftune.models import load_reward_base
from preftune.policy_gradient import (
    clipped_policy_loss,
    clipped_value_loss,
    generalized_advantages,
    masked_mean,
    shaped_rewards,
    whiten,
)
from preftune.recipes import online
from preftune.recipes.online import OnlineRun, Rollout
from preftune.rewards import RewardFunction
from preftune.rollout import Sample, in_micro_batches, per_token, sample_rows, token_logps

PPO_METRICS = ("loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac", "policy/ratio", "val/vpred",
               "val/error", "val/clipfrac")


def token_values(critic: torch.nn.Module, samples: list[Sample], pad_token_id: int, width: int,
                 layout: str = "padded") -> torch.Tensor:
    """The critic's V(s_t) before each completion token, (B, width): its sequence-classification head applied at
    every position that predicts a completion token (the backbone once, the head only there), the samples laid
    out as `sample_rows` does."""
    device = next(critic.parameters()).device
    batch = sample_rows(samples, pad_token_id, device, layout)
    model = unwrapped(critic)  # under peft the LoRA layers are in place inside it, and `score` is the trained copy
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(**model_inputs(model, batch), use_cache=False).last_hidden_state
    values = model.score(hidden[batch.token_rows, batch.token_predictors]).squeeze(-1).float()
    return per_token(values, batch, len(samples), width)


class PolicyAndValue(torch.nn.Module):
    """The actor and the critic as one module: one optimizer, one accelerate prepare (DDP averages both), one
    checkpoint. Its forward gives both per-token outputs of a minibatch."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module, pad_token_id: int,
                 layout: str = "padded") -> None:
        super().__init__()
        self.policy, self.critic, self.pad_token_id, self.layout = policy, critic, pad_token_id, layout

    def forward(self, samples: list[Sample], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.policy.parameters()).device
        logps = token_logps(self.policy, samples, self.pad_token_id, width, device, self.layout)
        return logps, token_values(self.critic, samples, self.pad_token_id, width, self.layout)


def trained_mask(rollout: Rollout) -> torch.Tensor:
    """The completion tokens of the samples the reward judged, (B, T) bool (a None reward: a row of False)."""
    return rollout.mask & rollout.judged[:, None]


@dataclass
class PPOObjective:
    config: Config
    command: str = "ppo"
    metric_names: tuple[str, ...] = PPO_METRICS
    minibatch_unit: int = 1
    splits_minibatch: bool = True  # both losses are means over completion tokens

    @property
    def kl_coef(self) -> float:
        return self.config.rl.kl_coef

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.policy

    def score(self, run: OnlineRun, rollout: Rollout) -> dict[str, float]:
        """Values, KL-shaped rewards, GAE advantages (whitened) and returns of the rollout's judged samples (the
        rows of a sample the reward could not judge are masked out: `trained_mask`)."""
        r = self.config.rl
        critic = run.group.unwrap(run.model).critic
        mask = trained_mask(rollout)
        with torch.no_grad(), run.group.accelerator.autocast():
            values = in_micro_batches(lambda part: token_values(critic, part, run.tokenizer.pad_token_id,
                                                                rollout.width, self.config.train.batch_layout),
                                      rollout.samples, r.local_rollout_forward_batch_size) * mask
        rewards, _ = shaped_rewards(rollout.logps, rollout.ref_logps, rollout.scores, mask, run.state.kl_coef)
        if r.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = generalized_advantages(rewards, values, mask, r.gamma, r.lam)
        rollout.extras.update(values=values, advantages=whiten(advantages, mask), returns=returns)
        return {"val/returns": masked_mean(returns, mask).item()}

    def loss(self, model: torch.nn.Module, minibatch: Rollout,
             on_policy: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r, mask, extras = self.config.rl, trained_mask(minibatch), minibatch.extras
        logps, values = model(minibatch.samples, minibatch.width)
        policy = clipped_policy_loss(logps, None if on_policy else minibatch.logps, extras["advantages"], mask,
                                     r.cliprange)
        value_loss, value_clipfrac = clipped_value_loss(values, extras["values"], extras["returns"], mask,
                                                        r.cliprange_value)
        metrics = {"loss/policy": policy.loss.detach(), "loss/value": value_loss.detach(),
                   "policy/approxkl": policy.approxkl, "policy/clipfrac": policy.clipfrac, "policy/ratio": policy.ratio,
                   "val/vpred": masked_mean(values.detach(), mask),
                   "val/error": masked_mean((values.detach() - extras["returns"]) ** 2, mask),
                   "val/clipfrac": value_clipfrac}
        return policy.loss + r.vf_coef * value_loss, metrics

    def loss_count(self, minibatch: Rollout) -> float:
        return trained_mask(minibatch).sum().item()  # the losses' means are over the judged samples' tokens


def load_critic(config: Config, tokenizer) -> torch.nn.Module:
    """The critic: --value-model (a reward model from `preftune reward-model`, as Ouyang et al. start it), else the
    policy's starting weights with a new one-output head; LoRA-wrapped with --lora."""
    model_config = dataclasses.replace(config.model, model=config.rl.value_model or config.model.model)
    critic, _, _ = load_reward_base(model_config, tokenizer=tokenizer)
    return critic


def setup(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    def with_critic(policy: torch.nn.Module, tokenizer) -> PolicyAndValue:
        return PolicyAndValue(policy, load_critic(config, tokenizer), tokenizer.pad_token_id,
                              config.train.batch_layout)

    return online.setup(config, PPOObjective(config), build_model=with_critic, reward=reward)


def run(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    """setup -> train -> save, with cleanup whatever happens (`reward`: in memory, in place of --reward)."""
    return online.run(setup(config, reward))
