"""policy_gradient.py (the math of PPO and RLOO) against hand-derived numbers (as torchtune's DPO loss tests and
test_losses.py) and, where a closed form is clumsy, against brute-force references written out in plain Python.

GAE: Schulman et al. 2016 (arXiv:1506.02438, eq. 16); PPO's clipped surrogate: Schulman et al. 2017
(arXiv:1707.06347, eq. 7); RLOO: Ahmadian et al. 2024 (arXiv:2402.14740, eq. 6); KL shaping and the adaptive KL
coefficient: Ziegler et al. 2019 (arXiv:1909.08593, eq. 2 and sec. 2.2). Everything in float64 so tolerances can be
tight.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.policy_gradient import (
    adaptive_kl_coef,
    clipped_policy_loss,
    clipped_value_loss,
    generalized_advantages,
    last_token_index,
    leave_one_out_advantages,
    masked_mean,
    normalized,
    shaped_rewards,
    whiten,
)

F64 = torch.float64


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def right_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


# ---- masked_mean, last_token_index -------------------------------------------------------------------------------


def test_masked_mean_hand_and_empty():
    values = tensor([[1.0, 2.0, 100.0], [4.0, -50.0, -50.0]])
    mask = right_padded_mask([2, 1], 3)
    # (1 + 2 + 4) / 3
    assert masked_mean(values, mask).item() == pytest.approx(7.0 / 3.0, rel=1e-15)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_last_token_index_rows_of_different_lengths():
    mask = right_padded_mask([3, 1, 4, 0], 4)
    assert last_token_index(mask).tolist() == [2, 0, 3, 0]
    assert last_token_index(mask).dtype == torch.long


# ---- KL reward shaping ---------------------------------------------------------------------------------------------


def test_shaped_rewards_hand_derived():
    # rows of 3, 1 and 4 real tokens out of 4; the padded logps are garbage and must not leak into the rewards
    logps = tensor([[-1.0, -2.0, -0.5, -9.0], [-3.0, -7.0, -7.0, -7.0], [-0.25, -1.0, -2.0, -4.0]])
    ref_logps = tensor([[-1.5, -1.0, -0.5, -1.0], [-2.0, -1.0, -1.0, -1.0], [-0.5, -1.0, -1.0, -3.0]])
    scores = tensor([2.0, -1.0, 0.5])
    mask = right_padded_mask([3, 1, 4], 4)
    rewards, penalty = shaped_rewards(logps, ref_logps, scores, mask, kl_coef=0.1)
    # penalty = -0.1 * (logp - ref_logp) on real tokens:
    #   row 0: log ratios [0.5, -1, 0]       -> [-0.05, 0.1, 0]
    #   row 1: log ratio [-1]                -> [0.1]
    #   row 2: log ratios [0.25, 0, -1, -1]  -> [-0.025, 0, 0.1, 0.1]
    expected_penalty = tensor([[-0.05, 0.1, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0], [-0.025, 0.0, 0.1, 0.1]])
    torch.testing.assert_close(penalty, expected_penalty, rtol=0, atol=1e-15)
    # the score lands on each row's last real token: positions 2, 0 and 3
    expected_rewards = tensor([[-0.05, 0.1, 2.0, 0.0], [0.1 - 1.0, 0.0, 0.0, 0.0], [-0.025, 0.0, 0.1, 0.1 + 0.5]])
    torch.testing.assert_close(rewards, expected_rewards, rtol=0, atol=1e-15)
    assert (rewards[~mask] == 0).all() and (penalty[~mask] == 0).all()
    # the rewards without the penalty are the scores alone, at the last tokens
    torch.testing.assert_close((rewards - penalty).sum(1), scores, rtol=0, atol=1e-15)


def test_shaped_rewards_zero_kl_coef_is_scores_only():
    logps, ref_logps = torch.randn(2, 5, dtype=F64), torch.randn(2, 5, dtype=F64)
    mask = right_padded_mask([5, 2], 5)
    rewards, penalty = shaped_rewards(logps, ref_logps, tensor([3.0, -4.0]), mask, kl_coef=0.0)
    assert (penalty == 0).all()
    expected = torch.zeros(2, 5, dtype=F64)
    expected[0, 4], expected[1, 1] = 3.0, -4.0
    torch.testing.assert_close(rewards, expected, rtol=0, atol=0)


# ---- GAE -------------------------------------------------------------------------------------------------------


def gae_brute_force(rewards, values, lengths, gamma, lam):
    """A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l} as a double sum, with V = 0 past a row's end and delta only
    inside it; plain Python lists in, lists out (zeros past each row's end)."""
    width = len(rewards[0])
    advantages = []
    for r, v, n in zip(rewards, values, lengths):
        value = [v[t] if t < n else 0.0 for t in range(width + 1)]
        delta = [r[t] + gamma * value[t + 1] - value[t] for t in range(n)]
        advantages.append([sum((gamma * lam) ** lag * delta[t + lag] for lag in range(n - t)) for t in range(n)]
                          + [0.0] * (width - n))
    return advantages


def test_gae_hand_derived_three_tokens():
    # one row of 3 real tokens and a padded 4th whose reward and value are garbage (they must be ignored)
    rewards = tensor([[0.0, 0.0, 1.0, 5.0]])
    values = tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = right_padded_mask([3], 4)
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=0.5, lam=0.5)
    # gamma lam = 0.25; V(s_3) = 0 (past the end)
    # delta_2 = 1 + 0.5 * 0   - 0.7 =  0.3
    # delta_1 = 0 + 0.5 * 0.7 - 0.6 = -0.25
    # delta_0 = 0 + 0.5 * 0.6 - 0.5 = -0.2
    # A_2 = 0.3;  A_1 = -0.25 + 0.25 * 0.3 = -0.175;  A_0 = -0.2 + 0.25 * -0.175 = -0.24375
    torch.testing.assert_close(advantages, tensor([[-0.24375, -0.175, 0.3, 0.0]]), rtol=0, atol=1e-15)
    # R_t = A_t + V(s_t)
    torch.testing.assert_close(returns, tensor([[0.25625, 0.425, 1.0, 0.0]]), rtol=0, atol=1e-15)


GAMMA_LAMBDAS = [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.0), (1.0, 0.5), (0.7, 0.3), (0.0, 0.9)]
LENGTHS = [6, 3, 1, 5, 0]


@pytest.fixture
def random_rollout():
    generator = torch.Generator().manual_seed(1234)
    rewards = torch.randn(len(LENGTHS), 6, generator=generator, dtype=F64)
    values = torch.randn(len(LENGTHS), 6, generator=generator, dtype=F64)
    # garbage past the ends (the function must treat V as 0 there and ignore those rewards)
    return rewards, values, right_padded_mask(LENGTHS, 6)


@pytest.mark.parametrize(("gamma", "lam"), GAMMA_LAMBDAS)
def test_gae_matches_brute_force_double_sum(random_rollout, gamma: float, lam: float):
    rewards, values, mask = random_rollout
    advantages, returns = generalized_advantages(rewards, values, mask, gamma, lam)
    expected = tensor(gae_brute_force(rewards.tolist(), values.tolist(), LENGTHS, gamma, lam))
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, (expected + values) * mask, rtol=0, atol=1e-12)
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()
    assert (advantages[4] == 0).all()  # the empty row


def test_gae_gamma_lambda_one_is_return_to_go_minus_value(random_rollout):
    rewards, values, mask = random_rollout
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    for row, n in enumerate(LENGTHS):
        r, v = rewards[row].tolist(), values[row].tolist()
        for t in range(n):
            # the deltas telescope: A_t = sum_{s >= t} r_s - V(s_t), and R_t = the undiscounted return-to-go
            assert advantages[row, t].item() == pytest.approx(sum(r[t:n]) - v[t], abs=1e-12)
            assert returns[row, t].item() == pytest.approx(sum(r[t:n]), abs=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
def test_gae_lambda_zero_is_one_step_td_error(random_rollout, gamma: float):
    rewards, values, mask = random_rollout
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=gamma, lam=0.0)
    for row, n in enumerate(LENGTHS):
        r, v = rewards[row].tolist(), values[row].tolist()
        for t in range(n):
            next_value = v[t + 1] if t + 1 < n else 0.0
            assert advantages[row, t].item() == pytest.approx(r[t] + gamma * next_value - v[t], abs=1e-12)
            assert returns[row, t].item() == pytest.approx(r[t] + gamma * next_value, abs=1e-12)


def test_gae_ignores_values_and_rewards_past_the_end(random_rollout):
    rewards, values, mask = random_rollout
    advantages, returns = generalized_advantages(rewards, values, mask, 0.95, 0.9)
    other_rewards = torch.where(mask, rewards, tensor(123.0))
    other_values = torch.where(mask, values, tensor(-77.0))
    other_advantages, other_returns = generalized_advantages(other_rewards, other_values, mask, 0.95, 0.9)
    torch.testing.assert_close(other_advantages, advantages, rtol=0, atol=0)
    torch.testing.assert_close(other_returns, returns, rtol=0, atol=0)


# ---- PPO's clipped surrogate ---------------------------------------------------------------------------------------

EPS = 0.2


@pytest.mark.parametrize(
    ("advantage", "ratio", "term", "clipped", "grad"),
    [
        # A > 0, rho > 1 + eps: clipped at 1.2 -> loss -A * 1.2, no gradient
        (1.0, 1.5, -1.2, True, 0.0),
        # A < 0, rho < 1 - eps: clipped at 0.8 -> loss -A * 0.8 = 1.6, no gradient
        (-2.0, 0.5, 1.6, True, 0.0),
        # inside [0.8, 1.2]: loss -A * rho, d/dlogp = -A * rho
        (1.0, 1.1, -1.1, False, -1.1),
        (-1.0, 0.9, 0.9, False, 0.9),
        (3.0, 1.0, -3.0, False, -3.0),
        # outside the range on the side the clip does not bind (the pessimistic min keeps rho): unclipped
        (2.0, 0.5, -1.0, False, -1.0),  # A > 0, rho < 1 - eps
        (-1.0, 1.5, 1.5, False, 1.5),  # A < 0, rho > 1 + eps
    ],
)
def test_policy_loss_single_token(advantage: float, ratio: float, term: float, clipped: bool, grad: float):
    old_logps = tensor([[-2.0]])
    logps = (old_logps + math.log(ratio)).requires_grad_()
    out = clipped_policy_loss(logps, old_logps, tensor([[advantage]]), torch.ones(1, 1, dtype=torch.bool), EPS)
    assert out.loss.item() == pytest.approx(term, rel=1e-12)
    assert out.clipfrac.item() == (1.0 if clipped else 0.0)
    assert out.ratio.item() == pytest.approx(ratio, rel=1e-12)
    assert out.approxkl.item() == pytest.approx(0.5 * math.log(ratio) ** 2, rel=1e-12, abs=1e-30)
    out.loss.backward()
    assert logps.grad.item() == pytest.approx(grad, rel=1e-12, abs=1e-30)


def policy_batch():
    """One row of 6 real tokens covering every case above, then 2 padded positions with garbage."""
    ratios = [1.5, 0.5, 1.1, 0.9, 0.5, 1.5, math.exp(3.0), 0.1]
    advantages = tensor([[1.0, -2.0, 1.0, -1.0, 2.0, -1.0, 5.0, -5.0]])
    old_logps = tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.25, -4.0, -2.0]])
    logps = old_logps + torch.log(tensor([ratios]))
    return logps, old_logps, advantages, right_padded_mask([6], 8)


def test_policy_loss_batch_hand_derived():
    logps, old_logps, advantages, mask = policy_batch()
    logps.requires_grad_()
    out = clipped_policy_loss(logps, old_logps, advantages, mask, EPS)
    # per-token terms: [-1.2, 1.6, -1.1, 0.9, -1.0, 1.5], n = 6 real tokens -> 0.7 / 6
    assert out.loss.item() == pytest.approx(0.7 / 6, rel=1e-12)
    assert out.clipfrac.item() == pytest.approx(2 / 6, rel=1e-7)  # tokens 0 and 1
    # mean ratio (1.5 + 0.5 + 1.1 + 0.9 + 0.5 + 1.5) / 6 = 1
    assert out.ratio.item() == pytest.approx(1.0, rel=1e-12)
    # approxkl = 0.5 * mean(log_ratio^2) over the 6 real tokens only
    log_ratios = [math.log(r) for r in [1.5, 0.5, 1.1, 0.9, 0.5, 1.5]]
    assert out.approxkl.item() == pytest.approx(0.5 * sum(x * x for x in log_ratios) / 6, rel=1e-12)
    out.loss.backward()
    # d loss / d logp_t = -A_t * rho_t / n where unclipped, 0 where clipped and on padding
    expected_grad = tensor([[0.0, 0.0, -1.1 / 6, 0.9 / 6, -1.0 / 6, 1.5 / 6, 0.0, 0.0]])
    torch.testing.assert_close(logps.grad, expected_grad, rtol=0, atol=1e-15)


def test_policy_loss_padding_does_not_count():
    logps, old_logps, advantages, mask = policy_batch()
    reference = clipped_policy_loss(logps, old_logps, advantages, mask, EPS)
    changed = (torch.where(mask, logps, tensor(0.7)), torch.where(mask, old_logps, tensor(-3.0)),
               torch.where(mask, advantages, tensor(-8.0)))
    other = clipped_policy_loss(*changed, mask, EPS)
    for field in ("loss", "clipfrac", "approxkl", "ratio"):
        torch.testing.assert_close(getattr(other, field), getattr(reference, field), rtol=0, atol=0)
    # and the padded tokens alone, if they counted, would move every statistic
    unmasked = clipped_policy_loss(logps, old_logps, advantages, torch.ones_like(mask), EPS)
    for field in ("loss", "clipfrac", "approxkl", "ratio"):
        assert not torch.isclose(getattr(unmasked, field), getattr(reference, field))


def test_policy_loss_matches_brute_force_with_autograd():
    generator = torch.Generator().manual_seed(7)
    old_logps = -torch.rand(3, 5, generator=generator, dtype=F64) * 3
    logps = (old_logps + torch.randn(3, 5, generator=generator, dtype=F64) * 0.3).requires_grad_()
    advantages = torch.randn(3, 5, generator=generator, dtype=F64)
    mask = right_padded_mask([5, 2, 4], 5)
    out = clipped_policy_loss(logps, old_logps, advantages, mask, EPS)
    out.loss.backward()
    n = int(mask.sum())
    total, clipped, grad = 0.0, 0, torch.zeros(3, 5, dtype=F64)
    for b, t in mask.nonzero().tolist():
        rho, a = math.exp(logps[b, t].item() - old_logps[b, t].item()), advantages[b, t].item()
        # L^CLIP = min(rho A, clip(rho) A); as a loss, its negative
        total -= min(rho * a, min(max(rho, 1 - EPS), 1 + EPS) * a)
        binds = (a > 0 and rho > 1 + EPS) or (a < 0 and rho < 1 - EPS)
        clipped += binds
        grad[b, t] = 0.0 if binds else -a * rho / n
    assert 0 < clipped < n  # the draw exercises both branches
    assert out.loss.item() == pytest.approx(total / n, rel=1e-12)
    assert out.clipfrac.item() == pytest.approx(clipped / n, rel=1e-7)
    torch.testing.assert_close(logps.grad, grad, rtol=1e-12, atol=1e-15)


def test_policy_loss_per_sequence():
    # RLOO's use: (B,) inputs, all-True mask; rho = [e^0.5, 1], A = [1, -1]
    logps = tensor([-1.5, -3.0]).requires_grad_()
    out = clipped_policy_loss(logps, tensor([-2.0, -3.0]), tensor([1.0, -1.0]), torch.ones(2, dtype=torch.bool), EPS)
    # e^0.5 = 1.6487 > 1.2 with A > 0 -> clipped term -1.2; second term -(-1) * 1 = 1 -> mean (-1.2 + 1) / 2
    assert out.loss.item() == pytest.approx(-0.1, rel=1e-12)
    assert out.clipfrac.item() == 0.5
    assert out.approxkl.item() == pytest.approx(0.5 * 0.25 / 2, rel=1e-12)
    out.loss.backward()
    torch.testing.assert_close(logps.grad, tensor([0.0, 0.5]), rtol=0, atol=1e-15)


def test_policy_loss_on_policy_has_ratio_exactly_1_and_the_gradient_of_log_pi():
    # old_logps None (no update since sampling): log pi_old is log pi detached, whatever the rollout measured;
    # rho = 1 everywhere, nothing clipped, loss -mean A and d loss / d logp_t = -A_t / n (TRL's, one iteration)
    logps, _, advantages, mask = policy_batch()
    logps = (logps * 1.000001).requires_grad_()  # values that round anywhere
    out = clipped_policy_loss(logps, None, advantages, mask, EPS)
    assert out.ratio.item() == 1.0 and out.clipfrac.item() == 0.0 and out.approxkl.item() == 0.0
    assert out.loss.item() == pytest.approx(-advantages[mask].mean().item(), rel=1e-12)
    out.loss.backward()
    torch.testing.assert_close(logps.grad, torch.where(mask, -advantages / 6, 0.0), rtol=0, atol=1e-15)


# ---- PPO's clipped value loss ----------------------------------------------------------------------------------


def test_value_loss_hand_derived():
    # c = 0.2; four real tokens and one padded one
    #   0: V_old 0,   V 1.0,  R 1.0:  unclipped 0,    clipped (0.2 - 1)^2 = 0.64  -> clipped used
    #   1: V_old 0,   V 0.1,  R 1.0:  near the old value, both (0.1 - 1)^2 = 0.81  -> unclipped
    #   2: V_old 0,   V 1.0,  R 0.0:  unclipped 1,    clipped 0.2^2 = 0.04         -> unclipped (larger)
    #   3: V_old 0.5, V -0.5, R -0.5: unclipped 0,    clipped (0.3 + 0.5)^2 = 0.64 -> clipped used
    values = tensor([[1.0, 0.1, 1.0, -0.5, 50.0]]).requires_grad_()
    old_values = tensor([[0.0, 0.0, 0.0, 0.5, -50.0]])
    returns = tensor([[1.0, 1.0, 0.0, -0.5, 7.0]])
    mask = right_padded_mask([4], 5)
    loss, clipfrac = clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # 0.5 * (0.64 + 0.81 + 1 + 0.64) / 4 = 0.38625
    assert loss.item() == pytest.approx(0.38625, rel=1e-12)
    assert clipfrac.item() == 0.5
    loss.backward()
    # where the unclipped term is used: d/dV 0.5 (V - R)^2 / n = (V - R) / 4; the clipped term is flat in V there
    torch.testing.assert_close(values.grad, tensor([[0.0, -0.9 / 4, 1.0 / 4, 0.0, 0.0]]), rtol=0, atol=1e-15)


def test_value_loss_padding_does_not_count():
    values, old_values, returns = tensor([[0.3, 2.0, 9.0]]), tensor([[0.0, 0.0, 0.0]]), tensor([[1.0, 1.5, -9.0]])
    mask = right_padded_mask([2], 3)
    loss, clipfrac = clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.5)
    # 0: V 0.3 within 0.5 of 0 -> (0.3 - 1)^2 = 0.49;  1: V 2 -> clipped 0.5: max(0.25, 1) = 1, clipped used
    assert loss.item() == pytest.approx(0.5 * (0.49 + 1.0) / 2, rel=1e-12)
    assert clipfrac.item() == 0.5


# ---- whitening -------------------------------------------------------------------------------------------------


def test_whiten_hand_derived():
    values = tensor([[1.0, 3.0, 100.0], [5.0, -7.0, 42.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # masked entries 1, 3, 5: mean 3, Bessel variance (4 + 0 + 4) / 2 = 4 -> (x - 3) / sqrt(4 + 1e-8)
    scale = 1.0 / math.sqrt(4.0 + 1e-8)
    torch.testing.assert_close(whiten(values, mask), tensor([[-2 * scale, 0.0, 0.0], [2 * scale, 0.0, 0.0]]),
                               rtol=0, atol=1e-15)
    # shift_mean=False adds the mean 3 back
    torch.testing.assert_close(whiten(values, mask, shift_mean=False),
                               tensor([[3 - 2 * scale, 3.0, 0.0], [3 + 2 * scale, 0.0, 0.0]]), rtol=0, atol=1e-15)


@pytest.fixture
def masked_values():
    generator = torch.Generator().manual_seed(99)
    values = torch.randn(3, 7, generator=generator, dtype=F64) * 3 + 2
    return values, right_padded_mask([7, 2, 5], 7)


def test_whiten_moments_over_masked_entries_only(masked_values):
    values, mask = masked_values
    out = whiten(values, mask)
    kept = out[mask]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert kept.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-8)
    assert (out[~mask] == 0).all()
    x = values[mask]
    torch.testing.assert_close(kept, (x - x.mean()) / x.std(unbiased=True), rtol=1e-8, atol=1e-10)


def test_whiten_without_shift_keeps_the_mean(masked_values):
    values, mask = masked_values
    out = whiten(values, mask, shift_mean=False)
    x = values[mask]
    assert out[mask].mean().item() == pytest.approx(x.mean().item(), rel=1e-12)
    assert out[mask].var(unbiased=True).item() == pytest.approx(1.0, rel=1e-8)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_ignores_masked_out_values(masked_values, shift_mean: bool):
    values, mask = masked_values
    changed = torch.where(mask, values, tensor(1e6))
    torch.testing.assert_close(whiten(changed, mask, shift_mean), whiten(values, mask, shift_mean), rtol=0, atol=0)


# ---- RLOO --------------------------------------------------------------------------------------------------------


def test_leave_one_out_hand_derived_two_prompts():
    # prompt 1: rewards [1, 2, 6] -> baselines [(2+6)/2, (1+6)/2, (1+2)/2] = [4, 3.5, 1.5] -> [-3, -1.5, 4.5]
    # prompt 2: rewards [0, 0, 3] -> baselines [1.5, 1.5, 0]                               -> [-1.5, -1.5, 3]
    out = leave_one_out_advantages(tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), k=3)
    torch.testing.assert_close(out, tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]), rtol=0, atol=1e-15)


def test_leave_one_out_two_samples():
    # k = 2: each sample's baseline is the other one
    out = leave_one_out_advantages(tensor([0.25, 1.0, -2.0, 3.0]), k=2)
    torch.testing.assert_close(out, tensor([-0.75, 0.75, -5.0, 5.0]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", [2, 4, 5])
def test_leave_one_out_sums_to_zero_per_prompt_and_matches_brute_force(k: int):
    rewards = torch.randn(3 * k, generator=torch.Generator().manual_seed(k), dtype=F64)
    out = leave_one_out_advantages(rewards, k)
    torch.testing.assert_close(out.view(3, k).sum(1), torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)
    r = rewards.tolist()
    expected = []
    for p in range(3):
        group = r[p * k:(p + 1) * k]
        expected += [group[i] - sum(group[j] for j in range(k) if j != i) / (k - 1) for i in range(k)]
    torch.testing.assert_close(out, tensor(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [0, 1])
def test_leave_one_out_needs_two_samples(k: int):
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(tensor([1.0, 2.0]), k)


# ---- normalized ------------------------------------------------------------------------------------------------


def test_normalized_hand_derived():
    # [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], unbiased variance (4 + 1 + 0 + 9) / 3 = 14 / 3
    std = math.sqrt(14.0 / 3.0)
    out = normalized(tensor([1.0, 2.0, 3.0, 6.0]))
    torch.testing.assert_close(out, tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-4), rtol=0, atol=1e-15)


def test_normalized_moments():
    values = torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=F64) * 4 - 7
    out = normalized(values)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-12)
    std = values.std(unbiased=True).item()
    # unit std up to the 1e-4 epsilon: std / (std + 1e-4)
    assert out.std(unbiased=True).item() == pytest.approx(std / (std + 1e-4), rel=1e-12)
    assert out.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("split", [1, 3, 7])
def test_normalized_over_processes_equals_normalized_over_all_their_values(split: int):
    # two processes holding 1/9, 3/7 or 7/3 of the values: with `total` adding over both (all-reduce), each
    # normalises its own by the mean and std of all ten, as TRL's normalize_advantages after gathering them
    values = torch.randn(10, generator=torch.Generator().manual_seed(5), dtype=F64) * 3 + 2
    whole = normalized(values)
    halves = (values[:split], values[split:])
    for mine, theirs in (halves, halves[::-1]):
        mean = values.mean()
        # what the other process adds to each all-reduce, in order: (count, sum), then its squared deviations
        added = [torch.stack([theirs.new_tensor(theirs.numel()), theirs.sum()]), ((theirs - mean) ** 2).sum()]
        out = normalized(mine, lambda tensor, added=added: tensor + added.pop(0))
        expected = whole[:split] if mine is halves[0] else whole[split:]
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(normalized(halves[1]), whole[split:])  # each process's own statistics differ


def test_normalized_single_value_is_zero():
    assert normalized(tensor([5.0])).tolist() == [0.0]


# ---- adaptive KL coefficient ---------------------------------------------------------------------------------------


def test_adaptive_kl_above_target_is_clipped_at_plus_0_2():
    # 12 / 6 - 1 = 1 -> clipped to 0.2; 0.1 * (1 + 0.2 * 64 / 10000) = 0.1 * 1.00128
    assert adaptive_kl_coef(0.1, 12.0, 6.0, horizon=10000, num_samples=64) == pytest.approx(0.100128, rel=1e-12)
    # 6.6 / 6 - 1 = 0.1 (inside the clip): 0.1 * (1 + 0.1 * 0.0064) = 0.1 * 1.00064
    assert adaptive_kl_coef(0.1, 6.6, 6.0, horizon=10000, num_samples=64) == pytest.approx(0.100064, rel=1e-12)
    # a whole horizon of samples at the clip multiplies by 1.2
    assert adaptive_kl_coef(0.05, 100.0, 1.0, horizon=256, num_samples=256) == pytest.approx(0.06, rel=1e-12)


def test_adaptive_kl_below_target_is_clipped_at_minus_0_2():
    # 3 / 6 - 1 = -0.5 -> clipped to -0.2; 0.1 * (1 - 0.2 * 0.0064) = 0.1 * 0.99872
    assert adaptive_kl_coef(0.1, 3.0, 6.0, horizon=10000, num_samples=64) == pytest.approx(0.099872, rel=1e-12)
    # 5.7 / 6 - 1 = -0.05: 0.1 * (1 - 0.05 * 0.0064) = 0.1 * 0.99968
    assert adaptive_kl_coef(0.1, 5.7, 6.0, horizon=10000, num_samples=64) == pytest.approx(0.099968, rel=1e-12)
    # a zero KL is as far below as the clip allows
    assert adaptive_kl_coef(0.05, 0.0, 1.0, horizon=256, num_samples=256) == pytest.approx(0.04, rel=1e-12)


def test_adaptive_kl_at_target_is_unchanged():
    assert adaptive_kl_coef(0.123, 6.0, 6.0, horizon=10000, num_samples=512) == 0.123


def test_adaptive_kl_refuses_a_rollout_that_could_make_the_coefficient_0_or_negative():
    # 0.2 * 16 / 3 > 1: far below the target the factor 1 - 1.07 would turn the penalty into a reward for drift
    with pytest.raises(ValueError, match="more than a fifth of the rollout's 16 samples"):
        adaptive_kl_coef(0.1, 0.0, 1.0, horizon=3, num_samples=16)
    # 0.2 * 10 / 2 = 1: exactly 0, and 0 for ever after
    with pytest.raises(ValueError, match="more than a fifth"):
        adaptive_kl_coef(0.1, 100.0, 1.0, horizon=2, num_samples=10)  # above the target too: refused whatever the KL
    # just inside: 0.1 * (1 - 0.2 * 10 / 3)
    assert adaptive_kl_coef(0.1, 0.0, 1.0, horizon=3, num_samples=10) == pytest.approx(0.1 / 3, rel=1e-12)


@pytest.mark.parametrize("kl_coef", [0.0, -0.1])
def test_adaptive_kl_refuses_a_coefficient_it_cannot_adapt(kl_coef):
    # a multiplicative controller leaves 0 at 0 whatever the KL (and a negative one rewards drift)
    with pytest.raises(ValueError, match="kl_coef must be > 0"):
        adaptive_kl_coef(kl_coef, 12.0, 6.0, horizon=10000, num_samples=64)
