"""One rollout: the policy's samples of this step's prompts, their log-probs under the policy and the reference,
their reward (and which samples it could judge), the missing-EOS penalty, and the metrics TRL logs of them."""

from __future__ import annotations

import torch

from preftune.data.prompts import columns_of
from preftune.forward.rewards import Columns, RewardError
from preftune.forward.rollout import Sample, completion_mask, in_micro_batches, sample, sampled_token_logps, token_logps
from preftune.objectives.policy_gradient import masked_mean
from preftune.recipes.online.schedule import sample_seeds
from preftune.recipes.online.state import OnlineRun, Rollout
from preftune.runtime.checkpoint import latest_checkpoint
from preftune.runtime.run_folder import CONFIG_FILE


def collect(run: OnlineRun, positions: list[int]) -> Rollout:
    """Sample `num_generations` completions of each prompt (by position in `run.train_prompts`) from the policy
    (batched, KV-cached, each sample from its own seed), their per-token log-probs under the policy and the
    reference, and their reward. Every forward holds at most --local-rollout-forward-batch-size samples (each
    sample's tokens and log-probs are its own whatever shares its micro-batch)."""
    r, models, pad = run.config.rl, run.models, run.tokenizer.pad_token_id
    prompts = [run.train_prompts[i] for i in positions]
    layout, device, size = run.config.train.batch_layout, run.group.device, r.local_rollout_forward_batch_size
    # In fp32 the sampling forward's own logits give log pi_old (equal to a separate forward's to ~1e-6), which
    # saves a forward pass per rollout; under bf16/fp16 the cached and the full forward round differently, so
    # log pi_old comes from a full forward as the loss's (the minibatches after an update use it; the one before,
    # on-policy, uses its own log-probs: `optimisation.optimise`).
    from_sampling = run.group.accelerator.mixed_precision == "no"
    with run.group.accelerator.autocast():
        samples = sample(models.policy, run.tokenizer, [p.ids for p in prompts], num_samples=r.num_generations,
                         max_new_tokens=run.config.sample.max_new_tokens, batch_size=size,
                         with_logps=from_sampling, row_seeds=sample_seeds(run, positions))
        width = max(len(s.completion_ids) for s in samples)
        with torch.no_grad():
            if from_sampling:
                logps = sampled_token_logps(samples, width, device)
            else:
                logps = in_micro_batches(lambda part: token_logps(models.policy, part, pad, width, device, layout),
                                         samples, size)
            with models.reference_model() as reference:
                ref_logps = in_micro_batches(lambda part: token_logps(reference, part, pad, width, device, layout),
                                             samples, size)
    indices = [s.prompt_index for s in samples]
    per_func = reward_values(run, [prompts[i].given for i in indices], [s.text for s in samples],
                             [s.completion_ids for s in samples], columns_of(prompts, indices))
    raw, judged = combined_rewards(per_func, run.reward.weights)
    scores = missing_eos_penalized(raw, samples, run.tokenizer.eos_token_id, r.missing_eos_penalty)
    mask = completion_mask(samples, width).to(device)
    return Rollout(samples, mask, logps.float(), ref_logps.float(), scores, raw, judged,
                   rewards_per_func=dict(zip(run.reward.labels, per_func.unbind(1))))


def judged_rewards(run: OnlineRun, prompts: list, completions: list[str], completion_ids: list[list[int]] | None = None,
                   columns: Columns | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward of each completion (the weighted sum of the reward functions that judged it; 0 where none did,
    cannot judge) and which it judged, (B,) each (`reward_values`, `combined_rewards`)."""
    per_func = reward_values(run, prompts, completions, completion_ids, columns)
    return combined_rewards(per_func, run.reward.weights)


def combined_rewards(per_func: torch.Tensor, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's combination of reward functions: r = nansum_i(w_i r_i) over each completion's (B, F) values, NaN
    where function i returned None; judged where at least one function did (TRL's unscorable rows are the
    others). Returns (r with 0 where not judged, judged), (B,) each."""
    judged = ~torch.isnan(per_func).all(1)
    weighted = (per_func * torch.tensor(weights, dtype=per_func.dtype, device=per_func.device)).nansum(1)
    return torch.where(judged, weighted, 0.0), judged


def reward_values(run: OnlineRun, prompts: list, completions: list[str], completion_ids: list[list[int]] | None = None,
                  columns: Columns | None = None) -> torch.Tensor:
    """Every reward function's value of each completion, (B, F), NaN where one returned None (TRL's
    rewards_per_func). `columns`: the prompts' other columns, one value per completion. A failing reward
    (`rewards.RewardError`) stops the run before this step's update, naming the last checkpoint to resume from."""
    try:
        values = run.reward.each(prompts, completions, completion_ids, columns)
    except RewardError as error:
        path = latest_checkpoint(run.folder, warn=False)
        resume = ("No checkpoint was written yet: a new run starts from the beginning." if path is None else
                  f"The last checkpoint is {path}; once the reward is fixed, resume with:\n  preftune "
                  f"{run.objective.command} --config {run.folder / CONFIG_FILE} --resume")
        raise RewardError(f"stopped at step {run.state.step} of {run.total_steps}, in step {run.state.step + 1}'s "
                          f"rollout: {error}\n\n{resume}") from None
    nan = float("nan")
    return torch.tensor([[nan if v is None else v for v in function_values] for function_values in values],
                        dtype=torch.float32, device=run.group.device).reshape(len(values), len(completions)).T


def missing_eos_penalized(scores: torch.Tensor, samples: list[Sample], eos_token_id: int | None,
                          penalty: float | None) -> torch.Tensor:
    """The scores (B,) less `penalty` for each sample whose completion does not end on the EOS token (cut off at
    --max-new-tokens), as TRL's --missing-eos-penalty; a new tensor, `scores` unchanged. Unset: the scores as
    they are (a copy)."""
    if penalty is None:
        return scores.clone()
    ended = torch.tensor([s.completion_ids[-1] == eos_token_id for s in samples], device=scores.device)
    return torch.where(ended, scores, scores - penalty)


def rollout_metrics(rollout: Rollout, kl_coef: float) -> dict[str, float]:
    """The names TRL's PPO logs (and each reward function's rewards/<function>/mean and /std, as TRL's GRPO):
    objective/kl (sum over tokens of log pi - log pi_ref, mean over completions),
    objective/entropy (sum of -log pi of the sampled tokens), objective/non_score_reward, objective/rlhf_reward,
    objective/scores (the reward less the missing-EOS penalty, as in objective/rlhf_reward); and the completions'
    mean length. The reward's two are means over the samples it judged (0 if none), objective/unjudged_fraction
    the share it returned None for; the KL, entropy and length are over all samples. `kl_coef`: the run's
    (`OnlineState.kl_coef`), for online DPO its beta, as TRL's online DPO logs these two."""
    kl = ((rollout.logps - rollout.ref_logps) * rollout.mask).sum(1)
    lengths = rollout.mask.sum(1).float()
    judged = rollout.judged.float()  # the reward's statistics leave out the samples it could not judge
    return {
        "objective/kl": kl.mean().item(),
        "objective/entropy": (-(rollout.logps * rollout.mask).sum(1)).mean().item(),
        "objective/non_score_reward": (-kl_coef * kl).mean().item(),
        "objective/rlhf_reward": masked_mean(rollout.scores - kl_coef * kl, judged).item(),
        "objective/scores": masked_mean(rollout.scores, judged).item(),
        "objective/unjudged_fraction": 1.0 - judged.mean().item(),
        "completions/mean_length": lengths.mean().item(),
        **reward_function_metrics(rollout.rewards_per_func),
    }


def reward_function_metrics(rewards_per_func: dict[str, torch.Tensor]) -> dict[str, float]:
    """rewards/<function>/mean and rewards/<function>/std of each reward function's values (B,) over the samples
    it judged (TRL's nanmean and nanstd, n - 1); 0 where it judged none (std: fewer than two)."""
    metrics = {}
    for label, values in rewards_per_func.items():
        judged = values[~torch.isnan(values)]
        metrics[f"rewards/{label}/mean"] = judged.mean().item() if judged.numel() else 0.0
        metrics[f"rewards/{label}/std"] = judged.std().item() if judged.numel() > 1 else 0.0
    return metrics
