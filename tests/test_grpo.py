"""GRPO's math (objectives/group_relative.py) against hand-derived values and a brute-force reference written from
TRL 1.16's `_compute_loss` loop by loop, and the recipe's rollout scoring (None rewards, truncated completions,
dapo's normaliser, TRL's reward metrics), without a model. The recipe through the CLI (resume, kill -9, LoRA,
processes) is in tests/test_online.py; against TRL's GRPOTrainer itself, tests/test_grpo_trl.py."""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import pytest
import torch

from preftune.config import Config, apply_command_defaults
from preftune.forward.rollout import Sample
from preftune.objectives.group_relative import (
    GRPO_LOSSES,
    STD_EPSILON,
    SurrogateParams,
    cispo_surrogate,
    clip_ratios,
    clipped_surrogate,
    group_advantages,
    high_entropy_mask,
    importance_weights,
    k3_kl,
    nan_std,
    reduce_tokens,
    sapo_surrogate,
)
from preftune.recipes.grpo import GRPOObjective
from preftune.recipes.online import Rollout

EPS = STD_EPSILON


def grpo_config() -> Config:
    """The config `preftune grpo` starts from: TRL's defaults (loss_type dapo, beta 0)."""
    config = Config()
    apply_command_defaults(config, "grpo")
    assert (config.loss.loss_type, config.loss.beta) == ("dapo", 0.0)
    return config


def test_group_scaling_divides_by_each_groups_std_and_a_zero_std_group_gets_no_advantage():
    """Two groups of 3: (1, 2, 3) has mean 2 and std 1 (Bessel); (3, 3, 3) has std 0: its advantages are 0 (not
    0 / 1e-4 blown up) and it counts in frac_reward_zero_std."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0, 3.0])
    advantages, zero_std = group_advantages(rewards, torch.ones(6, dtype=torch.bool), 3, "group")
    expected = torch.tensor([-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected)
    assert zero_std.tolist() == [False] * 3 + [True] * 3


def test_batch_scaling_divides_every_group_by_the_whole_rollouts_std():
    rewards = torch.tensor([1.0, 3.0, 5.0, 7.0])  # groups (1, 3) and (5, 7); the batch's std is sqrt(20 / 3)
    advantages, zero_std = group_advantages(rewards, torch.ones(4, dtype=torch.bool), 2, "batch")
    std = math.sqrt(((1 - 4) ** 2 + (3 - 4) ** 2 + (5 - 4) ** 2 + (7 - 4) ** 2) / 3)
    torch.testing.assert_close(advantages, torch.tensor([-1.0, 1.0, -1.0, 1.0]) / (std + EPS))
    assert not zero_std.any()


def test_no_scaling_keeps_the_reward_less_the_group_mean_and_reports_the_groups_zero_std():
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0])
    advantages, zero_std = group_advantages(rewards, torch.ones(4, dtype=torch.bool), 2, "none")
    assert advantages.tolist() == [-1.0, 1.0, 0.0, 0.0]
    assert zero_std.tolist() == [False, False, True, True]


def test_unjudged_samples_are_left_out_of_their_groups_statistics_and_get_no_advantage():
    """None rewards (judged False; TRL: NaN): group (1, None, 3) has mean 2 and std sqrt(2) over its two judged
    samples; group (None, 4, None) has one judged sample, no std (NaN), so no advantage under group scaling (TRL's
    nan_to_num) and A = 4 - 4 = 0 without scaling; neither counts as a zero std."""
    rewards = torch.tensor([1.0, 9.0, 3.0, 9.0, 4.0, 9.0])  # the 9s are where the reward returned None
    judged = torch.tensor([True, False, True, False, True, False])
    advantages, zero_std = group_advantages(rewards, judged, 3, "group")
    a = 1 / (math.sqrt(2) + EPS)
    torch.testing.assert_close(advantages, torch.tensor([-a, 0.0, a, 0.0, 0.0, 0.0]))
    assert not zero_std.any()
    plain, _ = group_advantages(rewards, judged, 3, "none")
    assert plain.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_batch_scaling_over_two_processes_equals_one_process_holding_both_halves():
    """--scale-rewards batch over 2 processes: each holds whole groups, the std is over both (all-reduced)."""
    rewards = torch.tensor([0.5, 2.0, 1.0, 1.0, 7.0, -3.0, 4.0, 4.5])
    judged = torch.tensor([True, True, False, True, True, True, True, False])
    whole, _ = group_advantages(rewards, judged, 2, "batch")
    halves = [(rewards[:4], judged[:4]), (rewards[4:], judged[4:])]
    mean = torch.where(judged, rewards, float("nan")).nanmean()

    def total_of(rank):
        """An all-reduce sum seen from process `rank`: its tensor plus the other process's same quantity."""
        other_rewards, other_judged = halves[1 - rank]

        def total(tensor):
            if tensor.dim() == 1:  # (judged count, reward sum)
                return tensor + torch.stack([other_judged.sum().float(), other_rewards[other_judged].sum()])
            return tensor + ((other_rewards[other_judged] - mean) ** 2).sum()  # squared deviations
        return total

    parts = [group_advantages(r, j, 2, "batch", total_of(rank))[0] for rank, (r, j) in enumerate(halves)]
    torch.testing.assert_close(torch.cat(parts), whole)


def test_nan_std_is_bessels_over_the_non_nan_values():
    values = torch.tensor([[1.0, float("nan"), 3.0], [2.0, float("nan"), float("nan")]])
    std = nan_std(values, dim=1)
    assert std[0].item() == pytest.approx(math.sqrt(2)) and std[1].isnan()


def test_sequence_importance_weights_are_the_mean_log_ratio_over_the_completions_tokens():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    old = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(importance_weights(logps, old, mask, "token"), logps - old)
    torch.testing.assert_close(importance_weights(logps, old, mask, "sequence"),
                               torch.tensor([[(0.5 - 1.0) / 2], [(0.5 - 0.5 + 0.0) / 3]]))


def test_k3_is_the_kl_estimator_exp_minus_log_ratio_minus_one():
    logps, ref = torch.tensor([-1.0, -2.0, -0.3]), torch.tensor([-1.0, -1.0, -0.8])
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logps.tolist(), ref.tolist())]
    torch.testing.assert_close(k3_kl(logps, ref), torch.tensor(expected))
    assert k3_kl(logps, ref)[0] == 0 and (k3_kl(logps, ref) >= 0).all()


def test_the_clip_is_asymmetric_with_epsilon_high_and_two_sided_with_delta():
    params = SurrogateParams(epsilon_low=0.2, epsilon_high=0.28)
    weights = torch.tensor([[0.5, 1.1, 1.5, 1.5, 0.5, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]])
    # A > 0: min(w, clip(w)) -> 0.5 (below the clip the unclipped is smaller), 1.1, 1.28; A < 0: max of -w, -clip
    expected = torch.tensor([[-0.5, -1.1, -1.28, 1.5, 0.8, 3.0]])
    torch.testing.assert_close(clipped_surrogate(weights, advantages, weights.log(), params), expected)
    two_sided = SurrogateParams(epsilon_low=0.2, epsilon_high=0.28, delta=2.0)
    torch.testing.assert_close(clipped_surrogate(weights, advantages, weights.log(), two_sided),
                               torch.tensor([[-0.5, -1.1, -1.28, 1.5, 0.8, 2.0]]))  # -A * min(w, delta) for A < 0
    ratios = clip_ratios(weights, advantages, params)
    assert ratios["high"].tolist() == [[False, False, True, False, False, False]]
    assert ratios["low"].tolist() == [[False, False, False, False, True, False]]
    assert ratios["region"].tolist() == [[False, False, True, False, True, False]]


def test_cispo_takes_the_gradient_through_log_pi_only_and_caps_the_weight():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    weights = torch.exp(logps - torch.tensor([[-1.5, -1.0]]))  # w = e^0.5, e^-1
    advantages = torch.tensor([[2.0]])
    loss = cispo_surrogate(weights, advantages, logps, SurrogateParams(epsilon_high=1.5))
    torch.testing.assert_close(loss.detach(), torch.tensor([[-1.5 * 2 * -1.0, -math.exp(-1) * 2 * -2.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.5 * 2, -math.exp(-1) * 2]]))


def test_sapo_gates_the_weight_with_a_sigmoid_at_each_signs_temperature():
    weights, advantages = torch.tensor([[1.3, 0.8]]), torch.tensor([[1.0], [-2.0]])
    params = SurrogateParams(sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    loss = sapo_surrogate(weights, advantages, weights.log(), params)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [[-sig(0.3) * 4 * 1.0, -sig(-0.2) * 4 * 1.0],
                [-sig(1.05 * 0.3) * 4 / 1.05 * -2.0, -sig(1.05 * -0.2) * 4 / 1.05 * -2.0]]
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_each_normaliser_by_hand_with_a_masked_out_row():
    """Rows of 2, 1 and 0 tokens (the last a truncated completion, masked): the sums are 3, 4, 0."""
    per_token = torch.tensor([[1.0, 2.0, 5.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert reduce_tokens(per_token, mask, "sequence", 0.0).item() == pytest.approx((3 / 2 + 4 / 1 + 0) / 3)
    assert reduce_tokens(per_token, mask, "tokens", 0.0).item() == pytest.approx(7 / 3)
    assert reduce_tokens(per_token, mask, "rows", 5.0).item() == pytest.approx(7 / (3 * 5))  # Dr. GRPO, L = 5
    assert reduce_tokens(per_token, mask, "rows", 3 / 3).item() == pytest.approx(7 / 3)  # DAPO: 3 tokens, 3 rows


def test_the_high_entropy_mask_keeps_the_top_quantile_of_the_completion_tokens():
    entropies = torch.tensor([[0.1, 0.9, 0.5, 3.0], [0.7, 0.3, 2.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # masked entropies 0.1 0.9 0.5 0.7 0.3: the 0.6 quantile (top 40 %) is 0.58 -> 0.9 and 0.7
    kept = high_entropy_mask(entropies, mask, 0.4)
    assert kept.tolist() == [[False, True, False, False], [True, False, False, False]]
    assert high_entropy_mask(entropies, mask, 1.0).tolist() == mask.bool().tolist()


def brute_force_loss(logps, old, ref, advantages, mask, loss_type, level, beta, params, max_length, rollout_tokens):
    """TRL 1.16's `_compute_loss` written out one row and one token at a time (floats, math module)."""
    rows, width = len(logps), len(logps[0])
    total, tokens = 0.0, sum(sum(row) for row in mask)
    losses = []
    for i in range(rows):
        length = sum(mask[i])
        sequence_log_w = sum((logps[i][t] - old[i][t]) * mask[i][t] for t in range(width)) / max(length, 1)
        row = []
        for t in range(width):
            log_w = logps[i][t] - old[i][t] if level == "token" else sequence_log_w
            w, a = math.exp(log_w), advantages[i]
            if loss_type == "cispo":
                value = -min(w, params.epsilon_high) * a * logps[i][t]
            elif loss_type == "sapo":
                tau = params.sapo_temperature_pos if a > 0 else params.sapo_temperature_neg
                value = -(1 / (1 + math.exp(-tau * (w - 1)))) * 4 / tau * a
            else:
                clipped = min(max(w, 1 - params.epsilon_low), 1 + params.epsilon_high)
                capped = w if params.delta is None else min(w, params.delta)
                value = -min(capped * a, clipped * a)
            if beta:
                # use_bias_correction_kl (TRL's default): the k3 KL times the importance weight
                value += beta * (math.exp(ref[i][t] - logps[i][t]) - (ref[i][t] - logps[i][t]) - 1) * w
            row.append(value * mask[i][t])
        losses.append(row)
    if loss_type in ("grpo", "sapo"):
        total = sum(sum(row) / max(sum(mask[i]), 1) for i, row in enumerate(losses)) / rows
    elif loss_type == "bnpo":
        total = sum(map(sum, losses)) / max(tokens, 1)
    elif loss_type == "dr_grpo":
        total = sum(map(sum, losses)) / (rows * max_length)
    else:  # dapo, cispo: num_items_in_batch, the rollout's tokens
        total = sum(map(sum, losses)) / max(rollout_tokens, 1)
    return total


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", list(GRPO_LOSSES))
@pytest.mark.parametrize(("beta", "delta"), [(0.0, None), (0.04, 1.6)])
def test_the_objectives_loss_equals_the_brute_force_reference(loss_type, level, beta, delta):
    """`GRPOObjective.loss` with the model forward replaced by fixed log-probs, against `brute_force_loss`: every
    loss type, both importance-sampling levels, with and without the KL term and two-sided clipping; log-probs
    off-policy by up to +-0.6 nats, so that every clip takes part."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{loss_type}/{level}/{beta}".encode()))
    rows, width, k = 6, 5, 3
    logps = -torch.rand(rows, width, generator=generator) * 3
    old = logps + (torch.rand(rows, width, generator=generator) - 0.5) * 1.2
    ref = logps + (torch.rand(rows, width, generator=generator) - 0.5)
    lengths = [5, 3, 1, 4, 2, 5]
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()
    config = grpo_config()
    config.loss.loss_type, config.loss.beta = loss_type, beta
    config.rl.num_generations, config.rl.importance_sampling_level, config.rl.delta = k, level, delta
    config.rl.epsilon, config.rl.epsilon_high, config.sample.max_new_tokens = 0.2, 0.28, 7
    objective = GRPOObjective(config)
    samples = [Sample(i // k, [1], [5] * n, "") for i, n in enumerate(lengths)]
    advantages = torch.tensor([1.0, -0.5, 0.2, -1.2, 0.7, 0.0])
    rollout = Rollout(samples, mask.bool(), old, ref, torch.zeros(rows), torch.zeros(rows),
                      extras={"advantages": advantages, "loss_mask": mask.bool(),
                              "row_tokens": torch.full((rows,), 20 / rows)})  # the rollout: 20 tokens in all
    entropies = torch.rand(rows, width, generator=generator)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("preftune.recipes.grpo.token_logps_and_entropies",
                      lambda *args: (logps * mask, entropies * mask))
        loss, metrics = objective.loss(None, rollout)
    params = SurrogateParams(0.2, 0.28, delta)
    expected = brute_force_loss((logps * mask).tolist(), old.tolist(), ref.tolist(), advantages.tolist(),
                                mask.tolist(), loss_type, level, beta, params, 7, 20)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert set(metrics) == {"loss", *objective.metric_names}
    assert metrics["entropy"].item() == pytest.approx(((entropies * mask).sum() / mask.sum()).item())


def fake_run(world_size: int = 1):
    """What `score` reads of a run: its process group's all-reduce (identity in one process)."""
    accelerator = SimpleNamespace(reduce=lambda tensor, reduction: tensor)
    return SimpleNamespace(group=SimpleNamespace(accelerator=accelerator, world_size=world_size))


def rollout_of(completions: list[list[int]], scores: list[float], judged: list[bool], k: int) -> Rollout:
    width = max(map(len, completions))
    samples = [Sample(i // k, [1], ids, "") for i, ids in enumerate(completions)]
    mask = torch.arange(width)[None] < torch.tensor([len(ids) for ids in completions])[:, None]
    zeros = torch.zeros(len(completions), width)
    return Rollout(samples, mask, zeros, zeros, torch.tensor(scores), torch.tensor(scores), torch.tensor(judged))


def test_score_masks_truncated_completions_out_of_the_loss_and_of_dapos_normaliser():
    """EOS is 2: completions 1 and 3 were cut off. With --mask-truncated-completions their tokens leave the loss
    mask and dapo's token count (5 of 10 tokens over 4 rows); they keep their rewards in the advantages."""
    config = grpo_config()
    config.rl.num_generations, config.rl.mask_truncated_completions = 2, True
    objective = GRPOObjective(config, pad_token_id=0, eos_token_id=2)
    rollout = rollout_of([[5, 2], [5, 6, 7], [2], [5, 6, 7, 8]], [1.0, 0.0, 3.0, 1.0], [True] * 4, 2)
    metrics = objective.score(fake_run(), rollout)
    assert rollout.extras["loss_mask"].sum(1).tolist() == [2, 0, 1, 0]
    assert rollout.extras["row_tokens"][0].item() == pytest.approx(3 / 4)
    assert rollout.extras["advantages"][1] < 0 < rollout.extras["advantages"][0]  # the cut-off one still scored
    assert metrics["completions/clipped_ratio"] == 0.5
    config.rl.mask_truncated_completions = False
    objective.score(fake_run(), rollout)
    assert rollout.extras["loss_mask"].sum().item() == 10 and rollout.extras["row_tokens"][0].item() == 10 / 4


def test_score_logs_trls_reward_metrics_over_the_judged_samples():
    """reward and reward_std over the judged samples only (TRL's nanmean, nanstd); frac_reward_zero_std the share
    of samples in a group of std 0."""
    config = grpo_config()
    config.rl.num_generations = 2
    objective = GRPOObjective(config, eos_token_id=2)
    rollout = rollout_of([[2]] * 6, [1.0, 3.0, 2.0, 2.0, 5.0, 0.0], [True, True, True, True, True, False], 2)
    metrics = objective.score(fake_run(), rollout)
    judged = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0])
    assert metrics["reward"] == pytest.approx(judged.mean().item())
    assert metrics["reward_std"] == pytest.approx(judged.std().item())
    assert metrics["frac_reward_zero_std"] == pytest.approx(2 / 6)  # group (2, 2); the last group has no std
