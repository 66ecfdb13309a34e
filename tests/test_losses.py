"""Losses against hand-derived values (as torchtune's DPO loss tests), gradients against finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.logprobs import SequenceLogps
from preftune.losses import LOSSES, LossParams, compute_loss, sigmoid_loss


def logps(chosen: list[float], rejected: list[float], dtype=torch.float64) -> SequenceLogps:
    c, r = torch.tensor(chosen, dtype=dtype), torch.tensor(rejected, dtype=dtype)
    return SequenceLogps(c, r, torch.ones_like(c, dtype=torch.long), torch.ones_like(r, dtype=torch.long))


def test_sigmoid_hand_derived():
    # margin = (-1 - -2) - (-3 - -2) = 2; beta * margin = 1; loss = log(1 + e^-1)
    policy = logps([-1.0, -5.0], [-3.0, -5.0])
    reference = logps([-2.0, -5.0], [-2.0, -5.0])
    out = sigmoid_loss(policy, reference, LossParams(beta=0.5))
    assert out.losses[0].item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-12)
    assert out.losses[0].item() == pytest.approx(0.31326168751822286, rel=1e-12)
    assert out.chosen_rewards[0].item() == pytest.approx(0.5)
    assert out.rejected_rewards[0].item() == pytest.approx(-0.5)
    # second pair: policy equals reference -> zero rewards, loss ln 2
    assert out.losses[1].item() == pytest.approx(math.log(2.0), rel=1e-12)
    assert out.chosen_rewards[1].item() == 0.0 and out.rejected_rewards[1].item() == 0.0


def test_sigmoid_wrong_way_round_costs_more():
    reference = logps([-2.0], [-2.0])
    right = sigmoid_loss(logps([-1.0], [-3.0]), reference, LossParams(beta=0.1)).losses.item()
    wrong = sigmoid_loss(logps([-3.0], [-1.0]), reference, LossParams(beta=0.1)).losses.item()
    # beta * margin = +-0.2: log(1 + e^-0.2) and log(1 + e^0.2)
    assert right == pytest.approx(math.log1p(math.exp(-0.2)))
    assert wrong == pytest.approx(math.log1p(math.exp(0.2)))


def test_sigmoid_gradient_matches_closed_form_and_gradcheck():
    chosen = torch.tensor([-1.0, -2.5], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-3.0, -1.5], dtype=torch.float64, requires_grad=True)
    reference = logps([-2.0, -2.0], [-2.0, -2.0])
    beta = 0.3
    policy = SequenceLogps(chosen, rejected, torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    sigmoid_loss(policy, reference, LossParams(beta=beta)).losses.sum().backward()
    # d/d(chosen) -log sigmoid(beta * m) = -beta * sigmoid(-beta * m); rejected gets the opposite sign
    margin = (chosen.detach() + 2.0) - (rejected.detach() + 2.0)
    expected = -beta * torch.sigmoid(-beta * margin)
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)

    def loss_of(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        p = SequenceLogps(c, r, torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
        return sigmoid_loss(p, reference, LossParams(beta=beta)).losses

    assert torch.autograd.gradcheck(loss_of, (chosen.detach().requires_grad_(), rejected.detach().requires_grad_()))


@pytest.mark.parametrize("loss_type", list(LOSSES))
def test_every_registered_loss_has_help_and_shapes(loss_type: str):
    function, meaning = LOSSES[loss_type]
    assert meaning and function.__doc__ and "arXiv" in function.__doc__
    out = compute_loss(loss_type, logps([-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0]), logps([-1.5] * 3, [-1.5] * 3),
                       LossParams(beta=0.1))
    assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (3,)
