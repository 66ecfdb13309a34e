"""RLOO (`preftune rloo`): REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv:2402.14740), TRL's
current RLHF loop: setup -> train -> save -> cleanup.

Per rollout (the loop is `online.train`, shared with PPO): k = num_generations samples per prompt; each sample's
reward is its score less kl_coef * sum_t (log pi - log pi_ref) (the KL as a sequence-level penalty, first-order
estimate, as TRL 1.16's RLOOTrainer); its advantage is that reward less the mean reward of the other k - 1 samples
of its prompt (optionally normalised over the whole rollout, every process's samples); the loss is PPO's clipped
surrogate on sequence log-probs. No critic. The math is in policy_gradient.py; per-step losses equal TRL 1.16's
(tests/test_rloo_trl.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.config import Config
from preftune.policy_gradient import clipped_policy_loss, leave_one_out_advantages, normalized
from preftune.recipes import online
from preftune.recipes.online import OnlineRun, Rollout
from preftune.rewards import RewardFunction
from preftune.rollout import token_logps

RLOO_METRICS = ("loss/policy", "policy/approxkl", "policy/clipfrac", "policy/ratio")


def sequence_rewards(rollout: Rollout, kl_coef: float) -> torch.Tensor:
    """score - kl_coef * sum_t (log pi_old(y_t) - log pi_ref(y_t)) of each sample, (B,)."""
    return rollout.scores - kl_coef * ((rollout.logps - rollout.ref_logps) * rollout.mask).sum(1)


@dataclass
class RLOOObjective:
    config: Config
    pad_token_id: int = 0
    command: str = "rloo"
    metric_names: tuple[str, ...] = RLOO_METRICS
    minibatch_unit: int = 1

    @property
    def kl_coef(self) -> float:
        return self.config.rl.kl_coef

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def score(self, run: OnlineRun, rollout: Rollout) -> dict[str, float]:
        rewards = sequence_rewards(rollout, run.state.kl_coef)
        advantages = leave_one_out_advantages(rewards, self.config.rl.num_generations)
        if self.config.rl.normalize_advantages:  # over every process's advantages, as TRL (after gathering them)
            advantages = normalized(advantages, lambda tensor: run.group.accelerator.reduce(tensor, reduction="sum"))
        rollout.extras.update(advantages=advantages, old_sequence_logps=(rollout.logps * rollout.mask).sum(1))
        return {"objective/advantage_std": advantages.std().item() if len(advantages) > 1 else 0.0}

    def loss(self, model: torch.nn.Module, minibatch: Rollout,
             on_policy: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = minibatch.mask.device
        logps = (token_logps(model, minibatch.samples, self.pad_token_id, minibatch.width, device,
                             self.config.train.batch_layout) * minibatch.mask).sum(1)
        every = torch.ones_like(logps, dtype=torch.bool)
        old_logps = None if on_policy else minibatch.extras["old_sequence_logps"]
        policy = clipped_policy_loss(logps, old_logps, minibatch.extras["advantages"], every, self.config.rl.cliprange)
        return policy.loss, {"loss/policy": policy.loss.detach(), "policy/approxkl": policy.approxkl,
                             "policy/clipfrac": policy.clipfrac, "policy/ratio": policy.ratio}


def setup(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    objective = RLOOObjective(config)
    run = online.setup(config, objective, reward=reward)
    objective.pad_token_id = run.tokenizer.pad_token_id
    return run


def run(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    """setup -> train -> save, with cleanup whatever happens (`reward`: in memory, in place of --reward)."""
    return online.run(setup(config, reward))
