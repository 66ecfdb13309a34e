"""Losses against hand-derived values (as torchtune's DPO loss tests), gradients against finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.objectives.logps import SequenceLogps
from preftune.objectives.losses import LOSSES, LossParams, compute_loss, sigmoid_loss


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
    spec = LOSSES[loss_type]
    assert spec.meaning and spec.function.__doc__ and "arXiv" in spec.function.__doc__
    out = compute_loss(logps([-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0]), logps([-1.5] * 3, [-1.5] * 3),
                       LossParams(beta=0.1, loss_types=(loss_type,), label_smoothing=0.1))
    assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (3,)


# ---- every loss against its formula, written out per pair in plain floats ---------------------------------
# Three pairs; u_w = log-ratio of the chosen completion, u_l of the rejected one.
P_C, P_R = [-1.0, -4.0, -2.5], [-3.0, -2.0, -2.0]  # policy
R_C, R_R = [-2.0, -3.0, -2.0], [-2.0, -3.0, -3.5]  # reference
N_C, N_R = [2, 4, 3], [3, 1, 5]  # completion tokens
U_W = [p - r for p, r in zip(P_C, R_C)]  # [1, -1, -0.5]
U_L = [p - r for p, r in zip(P_R, R_R)]  # [-1, 1, 1.5]
BETA = 0.5


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def seqs(chosen, rejected, n_c=N_C, n_r=N_R, **extras) -> SequenceLogps:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return SequenceLogps(t(chosen), t(rejected), torch.tensor(n_c), torch.tensor(n_r),
                         **{k: None if v is None else t(v) for k, v in extras.items()})


def smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def aot_expected(deltas: list[float], eps: float = 0.0) -> list[float]:
    return [smoothed(BETA * d, eps) for d in deltas]


EPS, TAU, GAMMA = 0.2, 0.05, 0.3
SFT = -sum(P_C) / sum(N_C)
HAND_DERIVED = {
    "sigmoid": ({}, [-logsig(BETA * (w - lo)) for w, lo in zip(U_W, U_L)]),
    "hinge": ({}, [max(0.0, 1 - BETA * (w - lo)) for w, lo in zip(U_W, U_L)]),
    "ipo": ({}, [(w / nc - lo / nr - 1 / (2 * BETA)) ** 2 for w, lo, nc, nr in zip(U_W, U_L, N_C, N_R)]),
    "exo_pair": ({"label_smoothing": EPS}, [
        sig(z) * (logsig(z) - math.log(1 - EPS)) + sig(-z) * (logsig(-z) - math.log(EPS))
        for z in (BETA * (w - lo) for w, lo in zip(U_W, U_L))]),
    "nca_pair": ({}, [-logsig(BETA * w) - 0.5 * logsig(-BETA * w) - 0.5 * logsig(-BETA * lo)
                      for w, lo in zip(U_W, U_L)]),
    "robust": ({"label_smoothing": EPS}, [
        (-(1 - EPS) * logsig(BETA * (w - lo)) + EPS * logsig(-BETA * (w - lo))) / (1 - 2 * EPS)
        for w, lo in zip(U_W, U_L)]),
    "bco_pair": ({}, [-logsig(BETA * w) - logsig(-BETA * lo) for w, lo in zip(U_W, U_L)]),
    "sppo_hard": ({}, [(w - 1 / (2 * BETA)) ** 2 + (lo + 1 / (2 * BETA)) ** 2 for w, lo in zip(U_W, U_L)]),
    # policy margins [2, -2, -0.5] sorted [-2, -0.5, 2]; reference margins [0, 0, 1.5] sorted [0, 0, 1.5]
    "aot": ({}, aot_expected([-2.0, -0.5, 0.5])),
    # u_w sorted [-1, -0.5, 1]; u_l sorted [-1, 1, 1.5]
    "aot_unpaired": ({"label_smoothing": EPS}, aot_expected([0.0, -1.5, -0.5], EPS)),
    "apo_zero": ({}, [1 - sig(BETA * w) + sig(BETA * lo) for w, lo in zip(U_W, U_L)]),
    "apo_down": ({}, [sig(BETA * w) + 1 - sig(BETA * (w - lo)) for w, lo in zip(U_W, U_L)]),
    "discopop": ({"discopop_tau": TAU}, [
        -logsig(z) * (1 - sig(z / TAU)) + math.exp(-z) * sig(z / TAU)
        for z in (BETA * (w - lo) for w, lo in zip(U_W, U_L))]),
    "sft": ({}, [SFT] * 3),
    "sigmoid_norm": ({}, [-logsig(BETA * (w / nc - lo / nr)) for w, lo, nc, nr in zip(U_W, U_L, N_C, N_R)]),
    "simpo": ({"simpo_gamma": GAMMA}, [-logsig(BETA * (c / nc - r / nr) - GAMMA)
                                      for c, r, nc, nr in zip(P_C, P_R, N_C, N_R)]),
}


def test_hand_derived_table_covers_every_loss():
    assert set(HAND_DERIVED) == set(LOSSES)


@pytest.mark.parametrize("loss_type", list(HAND_DERIVED))
def test_loss_hand_derived(loss_type: str):
    options, expected = HAND_DERIVED[loss_type]
    params = LossParams(beta=BETA, loss_types=(loss_type,), **options)
    out = compute_loss(seqs(P_C, P_R), seqs(R_C, R_R), params)
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # rewards are beta * u for every loss, as TRL reports them
    torch.testing.assert_close(out.chosen_rewards, BETA * torch.tensor(U_W, dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, BETA * torch.tensor(U_L, dtype=torch.float64))


def test_sigmoid_literal_values():
    out = compute_loss(seqs(P_C, P_R), seqs(R_C, R_R), LossParams(beta=BETA))
    # beta * Delta = 1, -1, -1: log(1 + e^-1), log(1 + e), log(1 + e)
    assert out.losses.tolist() == pytest.approx([0.31326168751822286, 1.3132616875182228, 1.3132616875182228])


def test_cdpo_is_sigmoid_with_label_smoothing():
    out = compute_loss(seqs(P_C, P_R), seqs(R_C, R_R), LossParams(beta=BETA, label_smoothing=EPS))
    expected = [smoothed(BETA * (w - lo), EPS) for w, lo in zip(U_W, U_L)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("kind", "alpha", "f_prime"),
    [
        ("reverse_kl", 0.5, lambda u: u),
        ("forward_kl", 0.5, lambda u: 1 - math.exp(-u)),
        ("js_divergence", 0.5, lambda u: math.log(2 * math.exp(u) / (1 + math.exp(u)))),
        ("alpha_divergence", 0.5, lambda u: (math.exp(u) ** -0.5 - 1) / -0.5),
        ("alpha_divergence", 0.3, lambda u: (math.exp(u) ** -0.7 - 1) / -0.7),
        ("alpha_divergence", 1.0, lambda u: u),  # the limit alpha -> 1 is reverse KL
    ],
)
def test_f_divergences(kind, alpha, f_prime):
    params = LossParams(beta=BETA, f_divergence_type=kind, f_alpha_divergence_coef=alpha)
    out = compute_loss(seqs(P_C, P_R), seqs(R_C, R_R), params)
    expected = [-logsig(BETA * (f_prime(w) - f_prime(lo))) for w, lo in zip(U_W, U_L)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_ld_alpha_weights_the_tokens_past_the_shared_length():
    alpha = 0.25
    tails = {"chosen_tail": [-0.5, -1.5, 0.0], "rejected_tail": [0.0, 0.0, -1.0]}
    ref_tails = {"chosen_tail": [-0.25, -1.0, 0.0], "rejected_tail": [0.0, 0.0, -2.0]}
    policy, reference = seqs(P_C, P_R, **tails), seqs(R_C, R_R, **ref_tails)
    out = compute_loss(policy, reference, LossParams(beta=BETA, ld_alpha=alpha))
    seen = lambda total, tail: total - (1 - alpha) * tail  # noqa: E731  shared + alpha * tail
    u_w = [seen(p, t) - seen(r, rt) for p, t, r, rt in zip(P_C, tails["chosen_tail"], R_C, ref_tails["chosen_tail"])]
    u_l = [seen(p, t) - seen(r, rt)
           for p, t, r, rt in zip(P_R, tails["rejected_tail"], R_R, ref_tails["rejected_tail"])]
    assert out.losses.tolist() == pytest.approx([-logsig(BETA * (w - lo)) for w, lo in zip(u_w, u_l)], rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * w for w in u_w])
    assert out.chosen_logps.tolist() == pytest.approx([seen(p, t) for p, t in zip(P_C, tails["chosen_tail"])])
    # ld_alpha = 1 is the plain sum
    plain = compute_loss(seqs(P_C, P_R), seqs(R_C, R_R), LossParams(beta=BETA)).losses
    torch.testing.assert_close(compute_loss(policy, reference, LossParams(beta=BETA, ld_alpha=1.0)).losses, plain)


def test_ld_alpha_without_the_split_is_an_error():
    with pytest.raises(ValueError, match="length_split=True"):
        compute_loss(seqs(P_C, P_R), seqs(R_C, R_R), LossParams(ld_alpha=0.5))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sft", "simpo"])
def test_use_weighting_multiplies_each_pair_by_both_weights(loss_type: str):
    weights = {"chosen_weight": [0.5, 1.0, 0.25], "rejected_weight": [2.0, 0.1, 1.0]}
    params = LossParams(beta=BETA, loss_types=(loss_type,), simpo_gamma=GAMMA)
    plain = compute_loss(seqs(P_C, P_R, **weights), seqs(R_C, R_R), params).losses
    weighted = compute_loss(seqs(P_C, P_R, **weights), seqs(R_C, R_R), LossParams(
        beta=BETA, loss_types=(loss_type,), simpo_gamma=GAMMA, use_weighting=True)).losses
    torch.testing.assert_close(weighted, plain * torch.tensor([1.0, 0.1, 0.25], dtype=torch.float64))


def test_weighted_sum_of_losses_is_trls_mpo():
    policy, reference = seqs(P_C, P_R), seqs(R_C, R_R)
    params = LossParams(beta=BETA, loss_types=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0))
    total = compute_loss(policy, reference, params).losses.mean()
    parts = [compute_loss(policy, reference, LossParams(beta=BETA, loss_types=(n,))).losses.mean()
             for n in ("sigmoid", "bco_pair", "sft")]
    torch.testing.assert_close(total, 0.8 * parts[0] + 0.2 * parts[1] + 1.0 * parts[2])


def test_loss_params_parses_lists_and_rpo_alpha():
    from preftune.config import LossConfig, loss_params

    params = loss_params(LossConfig(loss_type="sigmoid, bco_pair", loss_weights="0.8,0.2", rpo_alpha=0.5))
    assert params.loss_types == ("sigmoid", "bco_pair", "sft") and params.loss_weights == (0.8, 0.2, 0.5)
    assert loss_params(LossConfig()) == LossParams()


def test_from_options_takes_the_config_names_as_plain_values():
    params = LossParams.from_options(loss_type="ipo,sft", loss_weights="1,0.5", beta=0.3, ld_alpha=0.5)
    assert params == LossParams(beta=0.3, loss_types=("ipo", "sft"), loss_weights=(1.0, 0.5), ld_alpha=0.5)
    assert LossParams.from_options() == LossParams()
    with pytest.raises(TypeError):
        LossParams.from_options(betta=0.3)


# ---- gradients -----------------------------------------------------------------------------------------------
GRAD_CASES = [({"loss_types": (name,), **HAND_DERIVED[name][0]}) for name in LOSSES] + [
    {"f_divergence_type": kind} for kind in ("forward_kl", "js_divergence", "alpha_divergence")
] + [{"ld_alpha": 0.3}, {"use_weighting": True}, {"reference_free": True}, {"label_smoothing": 0.1},
     {"loss_types": ("sigmoid", "bco_pair", "sft"), "loss_weights": (0.8, 0.2, 1.0)}]


@pytest.mark.parametrize("options", GRAD_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_gradcheck(options: dict):
    params = LossParams(beta=BETA, **options)
    tails = {"chosen_tail": [-0.5, -1.5, 0.0], "rejected_tail": [0.0, 0.0, -1.0]}
    weights = {"chosen_weight": [0.5, 1.0, 0.25], "rejected_weight": [2.0, 0.1, 1.0]}
    inputs = tuple(torch.tensor(v, dtype=torch.float64, requires_grad=True)
                   for v in (P_C, P_R, [-2.1, -3.2, -1.9], [-1.8, -3.1, -3.4]))

    def loss_of(pc, pr, rc, rr):
        policy = SequenceLogps(pc, pr, torch.tensor(N_C), torch.tensor(N_R),
                               *(torch.tensor(v, dtype=torch.float64) for v in (*tails.values(), *weights.values())))
        reference = SequenceLogps(rc, rr, torch.tensor(N_C), torch.tensor(N_R),
                                  *(torch.tensor(v, dtype=torch.float64) for v in tails.values()))
        return compute_loss(policy, reference, params).losses

    assert torch.autograd.gradcheck(loss_of, inputs)


# ---- properties ------------------------------------------------------------------------------------------------
logprob = st.floats(min_value=-60.0, max_value=-0.01, allow_nan=False)
triple = st.lists(logprob, min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(policy_chosen=triple, policy_rejected=triple, u=st.lists(st.floats(-20.0, 20.0), min_size=3, max_size=3),
       beta=st.floats(0.01, 5.0))
def test_sigmoid_at_zero_margin_is_ln2(policy_chosen, policy_rejected, u, beta):
    # the same log-ratio u for chosen and rejected: zero margin
    reference = seqs([p - x for p, x in zip(policy_chosen, u)], [p - x for p, x in zip(policy_rejected, u)])
    out = compute_loss(seqs(policy_chosen, policy_rejected), reference, LossParams(beta=beta))
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(loss_type=st.sampled_from(list(LOSSES)), pc=triple, pr=triple, rc=triple, rr=triple)
def test_swapping_chosen_and_rejected_flips_the_rewards(loss_type, pc, pr, rc, rr):
    params = LossParams(beta=BETA, loss_types=(loss_type,), label_smoothing=0.1)
    out = compute_loss(seqs(pc, pr), seqs(rc, rr), params)
    swapped = compute_loss(seqs(pr, pc, N_R, N_C), seqs(rr, rc, N_R, N_C), params)
    torch.testing.assert_close(swapped.chosen_rewards, out.rejected_rewards)
    torch.testing.assert_close(swapped.rejected_rewards, out.chosen_rewards)
    torch.testing.assert_close(swapped.chosen_rewards - swapped.rejected_rewards,
                               -(out.chosen_rewards - out.rejected_rewards))


@settings(max_examples=60, deadline=None)
@given(loss_type=st.sampled_from(list(LOSSES)), pc=triple, pr=triple, rc=triple, rr=triple,
       ld_alpha=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_reference_free_is_the_zero_reference(loss_type, pc, pr, rc, rr, ld_alpha):
    tails = {"chosen_tail": [x / 2 for x in pc], "rejected_tail": [x / 3 for x in pr]}
    policy = seqs(pc, pr, **tails)
    options = {"beta": BETA, "loss_types": (loss_type,), "label_smoothing": 0.1, "ld_alpha": ld_alpha}
    free = compute_loss(policy, seqs(rc, rr, **tails), LossParams(**options, reference_free=True))
    zero = compute_loss(policy, seqs([0.0] * 3, [0.0] * 3, chosen_tail=[0.0] * 3, rejected_tail=[0.0] * 3),
                        LossParams(**options))
    for a, b in ((free.losses, zero.losses), (free.chosen_rewards, zero.chosen_rewards),
                 (free.rejected_rewards, zero.rejected_rewards)):
        torch.testing.assert_close(a, b, equal_nan=True)
