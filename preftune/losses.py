"""Preference losses: pure functions of per-sequence log-probabilities, registered by name in `LOSSES`.

Each loss takes the policy's and the reference's `SequenceLogps` (shapes (B,)) and `LossParams`, and returns
per-pair losses and implicit rewards; the trainer takes the mean. `LOSSES` is the one list of loss names:
the CLI help, config errors and the tests read it. This module imports only torch at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from preftune.logprobs import SequenceLogps


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1


@dataclass
class LossOutput:
    """Per-pair tensors, each of shape (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (log pi(y_w|x) - log pi_ref(y_w|x)), detached
    rejected_rewards: torch.Tensor  # beta * (log pi(y_l|x) - log pi_ref(y_l|x)), detached


def implicit_rewards(
    policy: SequenceLogps, reference: SequenceLogps, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) for chosen and rejected; (B,), (B,), detached."""
    chosen = beta * (policy.chosen - reference.chosen).detach()
    rejected = beta * (policy.rejected - reference.rejected).detach()
    return chosen, rejected


def sigmoid_loss(policy: SequenceLogps, reference: SequenceLogps, params: LossParams) -> LossOutput:
    """DPO: -log sigmoid(beta * ((log pi_w - log ref_w) - (log pi_l - log ref_l))).

    Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7.
    Shapes: every input (B,); output losses and rewards (B,).
    """
    logits = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    losses = -F.logsigmoid(params.beta * logits)
    return LossOutput(losses, *implicit_rewards(policy, reference, params.beta))


LossFunction = Callable[["SequenceLogps", "SequenceLogps", LossParams], LossOutput]

# name -> (function, one-line meaning for --help)
LOSSES: dict[str, tuple[LossFunction, str]] = {
    "sigmoid": (sigmoid_loss, "DPO's logistic loss on the reward margin (Rafailov et al. 2023, eq. 7)"),
}


def compute_loss(
    loss_type: str, policy: SequenceLogps, reference: SequenceLogps, params: LossParams
) -> LossOutput:
    function, _ = LOSSES[loss_type]
    return function(policy, reference, params)
