"""What the online loop is made of: the rollout, the objective a recipe plugs in (its Protocol), the state a
checkpoint keeps, and the run every part of the loop takes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from preftune.config import Config
from preftune.data.prompts import Prompt
from preftune.evaluation.measure import ModelPair
from preftune.forward.rewards import RewardFunction, Rewards
from preftune.forward.rollout import Sample
from preftune.runtime.logging import MetricLogger
from preftune.runtime.processes import ProcessGroup


@dataclass
class Rollout:
    """One rollout batch of this process: `k` samples per prompt, prompt by prompt, and what was measured of them.
    Per-token tensors are (B, T), T = the longest completion; `mask` marks each completion's own tokens."""

    samples: list[Sample]
    mask: torch.Tensor
    logps: torch.Tensor  # log pi_old(y_t), the policy's at sampling time (no gradient)
    ref_logps: torch.Tensor | None  # None: the objective reads no reference (grpo with beta 0), none was run
    scores: torch.Tensor  # (B,) the reward (less the missing-EOS penalty)
    raw_scores: torch.Tensor  # (B,) the reward as the reward function gave it (0 where it could not judge)
    judged: torch.Tensor | None = None  # (B,) bool: the reward judged the sample (unset: all); a sample it could
    # not judge (None) contributes no loss and no reward statistics
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's: values, advantages, returns
    # (B,) each reward function's values by its label (rewards/<label>/*), NaN where it returned None (as TRL's
    # rewards_per_func); `scores` holds their weighted sum
    rewards_per_func: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.judged is None:
            self.judged = torch.ones_like(self.scores, dtype=torch.bool)

    def rows(self, index: torch.Tensor) -> Rollout:
        picked = [self.samples[i] for i in index.tolist()]
        ref_logps = None if self.ref_logps is None else self.ref_logps[index]
        return Rollout(picked, self.mask[index], self.logps[index], ref_logps, self.scores[index],
                       self.raw_scores[index], self.judged[index], {k: v[index] for k, v in self.extras.items()},
                       {k: v[index] for k, v in self.rewards_per_func.items()})

    @property
    def width(self) -> int:
        return self.mask.shape[1]


class OnlineObjective(Protocol):
    """What an online recipe plugs into the loop: all the loop reads of it (the objectives are dataclasses built
    complete at construction, the pad id included: `loop.setup` builds one once the tokenizer is loaded)."""

    @property
    def command(self) -> str:
        """The CLI command (logs, checkpoints' resume hint, the report, the model card)."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The per-minibatch metrics `loss` returns, averaged per step (the model card reads them back)."""

    @property
    def minibatch_unit(self) -> int:
        """Consecutive rollout rows a minibatch keeps together (online DPO's pairs: 2)."""

    @property
    def splits_minibatch(self) -> bool:
        """Whether a minibatch's loss is the weighted mean of its micro-batches' (False: the loss couples its rows,
        as a loss that sorts the batch: the minibatch runs as one forward/backward)."""

    @property
    def kl_coef(self) -> float:
        """The KL weight the run starts from (`OnlineState.kl_coef`): PPO's and RLOO's --kl-coef, which their reward
        subtracts; online DPO's beta, the KL weight of the objective DPO solves (its loss reads beta from its own
        params, not from the state; the rollout metrics use it as TRL's online DPO logs them)."""

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        """The policy inside the trained module (which may hold a critic beside it)."""

    # An objective may also set `uses_reference = False` (grpo with beta 0): the rollouts then compute no reference
    # log-probs (`Rollout.ref_logps` None) and the run holds no reference model until a held-out measurement
    # needs one. Unset: True.

    def score(self, run: OnlineRun, rollout: Rollout) -> dict[str, float]:
        """Add what the loss needs to `rollout.extras` (advantages, ...); returns rollout metrics to log."""

    def loss(self, model: torch.nn.Module, minibatch: Rollout,
             on_policy: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a minibatch (with gradients), and its metrics (detached scalars). `on_policy`: no optimizer
        step since the rollout was sampled, so log pi_old is the current log-prob, detached (the ratio exactly 1)."""

    def loss_terms(self, model: torch.nn.Module, minibatch: Rollout,
                   on_policy: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """`loss` as terms that add up to it (loss, metrics each), computed one at a time: the loop takes a term's
        backward before it asks for the next, so the terms' activations are never held together (PPO: the policy's
        forward, then the critic's). One term, `loss` whole, where the loss is one forward (and under DDP, whose
        wrapped forward takes one backward)."""

    def loss_count(self, minibatch: Rollout) -> float:
        """What the loss and its metrics are means over, counted in `minibatch` (RLOO: samples; PPO: completion
        tokens; online DPO: decided pairs): a micro-batch weighs count / the minibatch's count."""


@dataclass
class OnlineState:
    """What the loop advances, and all a checkpoint needs to continue it exactly (rollouts are seeded by step)."""

    step: int = 0
    # the KL weight of the rollout metrics (objective/non_score_reward, objective/rlhf_reward, logged as
    # objective/kl_coef) and of PPO's and RLOO's reward: the adaptive controller's value (fixed: the configured
    # --kl-coef). For online DPO it is its beta (the KL weight of the objective DPO solves, as TRL logs it), which
    # its loss takes from its own params; the name stays, as checkpoints store the state by field name
    kl_coef: float = 0.0
    bad_steps_in_row: int = 0  # optimizer steps in a row with a non-finite loss or gradient
    world_size: int = 1
    sharded: bool = False


@dataclass
class OnlineRun:
    config: Config
    group: ProcessGroup
    folder: Path
    tokenizer: PreTrainedTokenizerBase
    model_source: str
    model: torch.nn.Module  # prepared by accelerate: the policy, or the policy with its critic
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    objective: OnlineObjective
    models: ModelPair  # the unwrapped policy and its reference (rollouts, measurement, report)
    reward: Rewards  # what the policy is trained to maximise: the --reward functions and their weights
    reward_name: str
    eval_reward: RewardFunction  # what the held-out measurement reports (the ground truth)
    eval_reward_name: str
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    batches_per_epoch: int
    total_steps: int
    eval_every: int
    logger: MetricLogger
    state: OnlineState
    last_eval: dict[str, float] | None = None
    final_eval: dict[str, float] | None = None

    def log(self, values: dict, step: int | None = None) -> None:
        self.logger.log(values, self.state.step if step is None else step, self.state.step / self.batches_per_epoch)
