"""RLOO (`preftune rloo`): REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv:2402.14740), TRL's
current RLHF loop: setup -> train -> save -> cleanup.

Per rollout (the loop is `online.train`, shared with PPO): k = num_generations samples per prompt; each sample's
reward is its score less kl_coef * sum_t (log pi - log pi_ref) (the KL as a sequence-level penalty, first-order
estimate, as TRL 1.16's RLOOTrainer); its advantage is that reward less the mean reward of the other k - 1 samples
of its prompt (optionally normalised over the whole rollout, every process's samples), a sample the reward could
not judge (None) left out; the loss is PPO's clipped surrogate on sequence log-probs. No critic. The math is in
objectives/policy_gradient.py; per-step losses equal TRL 1.16's (tests/test_rloo_trl.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from preftune.config import Config
from preftune.forward.rewards import RewardFunction
from preftune.forward.rollout import token_logps
from preftune.objectives.policy_gradient import clipped_policy_loss, normalized
from preftune.recipes import online
from preftune.recipes.online import OnlineRun, Rollout

RLOO_METRICS = ("loss/policy", "policy/approxkl", "policy/clipfrac", "policy/ratio")


def sequence_rewards(rollout: Rollout, kl_coef: float) -> torch.Tensor:
    """score - kl_coef * sum_t (log pi_old(y_t) - log pi_ref(y_t)) of each sample, (B,)."""
    return rollout.scores - kl_coef * ((rollout.logps - rollout.ref_logps) * rollout.mask).sum(1)


def judged_leave_one_out(rewards: torch.Tensor, judged: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO's advantages (Ahmadian et al. 2024, arXiv:2402.14740, eq. 6) over the samples the reward judged: each
    judged sample of a prompt is baselined by the mean reward of the prompt's other judged ones,
    A_i = r_i - (sum_{j judged} r_j - r_i) / (n - 1), n = the prompt's judged samples (with all k judged,
    `policy_gradient.leave_one_out_advantages`). A prompt with fewer than 2 judged samples has no baseline and
    trains on none. (P * k,) rewards and judged (bool), prompt by prompt -> (advantages (P * k,), 0 where not
    trained; trained (P * k,) bool)."""
    if k < 2:
        raise ValueError("leave-one-out needs at least 2 samples per prompt")
    grouped, mask = torch.where(judged, rewards, 0.0).view(-1, k), judged.view(-1, k)
    count = mask.sum(1, keepdim=True)
    trained = mask & (count >= 2)
    baselines = (grouped.sum(1, keepdim=True) - grouped) / (count - 1).clamp(min=1)
    return torch.where(trained, grouped - baselines, 0.0).view(-1), trained.view(-1)


@dataclass
class RLOOObjective:
    config: Config
    pad_token_id: int = 0  # the tokenizer's: `setup` builds the objective once it is loaded, and never changes it
    command: str = "rloo"
    metric_names: tuple[str, ...] = RLOO_METRICS
    minibatch_unit: int = 1
    splits_minibatch: bool = True  # the loss is a mean over samples

    @property
    def kl_coef(self) -> float:
        return self.config.rl.kl_coef

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def score(self, run: OnlineRun, rollout: Rollout) -> dict[str, float]:
        rewards = sequence_rewards(rollout, run.state.kl_coef)
        advantages, trained = judged_leave_one_out(rewards, rollout.judged, self.config.rl.num_generations)
        if self.config.rl.normalize_advantages:  # over every process's advantages, as TRL (after gathering them)
            total = lambda tensor: run.group.accelerator.reduce(tensor, reduction="sum")  # noqa: E731
            advantages = torch.zeros_like(advantages).masked_scatter(trained, normalized(advantages[trained], total))
        rollout.extras.update(advantages=advantages, trained=trained,
                              old_sequence_logps=(rollout.logps * rollout.mask).sum(1))
        used = advantages[trained]
        return {"objective/advantage_std": used.std().item() if len(used) > 1 else 0.0}

    def loss(self, model: torch.nn.Module, minibatch: Rollout,
             on_policy: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = minibatch.mask.device
        logps = (token_logps(model, minibatch.samples, self.pad_token_id, minibatch.width, device,
                             self.config.train.batch_layout) * minibatch.mask).sum(1)
        old_logps = None if on_policy else minibatch.extras["old_sequence_logps"]
        policy = clipped_policy_loss(logps, old_logps, minibatch.extras["advantages"], minibatch.extras["trained"],
                                     self.config.rl.cliprange)
        return policy.loss, {"loss/policy": policy.loss.detach(), "policy/approxkl": policy.approxkl,
                             "policy/clipfrac": policy.clipfrac, "policy/ratio": policy.ratio}

    def loss_terms(self, model: torch.nn.Module, minibatch: Rollout,
                   on_policy: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        yield self.loss(model, minibatch, on_policy)  # one forward: one term

    def loss_count(self, minibatch: Rollout) -> float:
        return minibatch.extras["trained"].sum().item()  # the loss's mean is over the samples it trains on


def setup(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    """The run, its objective built once the tokenizer is loaded (the pad id its loss's forward needs)."""
    return online.setup(config, "rloo", lambda tokenizer: RLOOObjective(config, tokenizer.pad_token_id),
                        reward=reward)


def run(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    """setup -> train -> save, with cleanup whatever happens (`reward`: in memory, in place of --reward)."""
    return online.run(setup(config, reward))
