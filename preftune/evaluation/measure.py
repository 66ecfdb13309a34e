"""Measuring a policy against its reference: the one place judge, the frontier, the default job and report.md ask.

- `ModelPair`: the policy and its reference *as models*, in every case a run has (a frozen copy or --ref-model;
  LoRA without --ref-model: the policy with its adapter switched off; no reference held, as with
  --reference-free or --precompute-ref-log-probs: the starting model, loaded on first use).
- `measure`: sample from the policy (and the reference), log-probs of the policy's samples under both, KL with
  its standard error, ground-truth rewards of every sample, and implicit rewards beta * log(pi / pi_ref).
- `summarize`, `paired_gain`: a reward's mean and the policy's gain over the reference, with standard errors that
  take each prompt's samples as one cluster and pair the two models by prompt.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from preftune.config import ModelConfig
from preftune.data.read import Text
from preftune.forward.rewards import RewardFunction, all_judged, checked
from preftune.forward.rollout import Sample, sample, sequence_logps_of_samples


@dataclass
class KLEstimate:
    mean: float  # estimated KL(policy || reference) per sequence, in nats
    stderr: float  # clustered by prompt: the standard error of the mean of per-prompt means
    num_samples: int


def kl_from_samples(policy_logps: torch.Tensor, reference_logps: torch.Tensor,
                    samples_per_prompt: int = 1) -> KLEstimate:
    """Monte-Carlo KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)], from samples of the policy, shapes
    (n * k,) prompt-major (k = `samples_per_prompt` per prompt). The mean is over all samples; its standard error
    takes each prompt's k samples as one cluster (they share x, so they are not independent): sd_i(m_i) / sqrt(n)
    with m_i the mean log-ratio of prompt i (NaN for a single prompt)."""
    ratios = (policy_logps - reference_logps).double()
    n = ratios.numel()
    means = prompt_means(ratios.tolist(), samples_per_prompt)
    stderr = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float("nan")
    return KLEstimate(ratios.mean().item(), stderr, n)


def stderr(values: Sequence[float]) -> float:
    """Standard error of the mean of independent values: sample standard deviation / sqrt(n) (0 for a single
    value)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def prompt_means(values: Sequence[float], samples_per_prompt: int) -> list[float]:
    """m_i = (1/k) sum_j values[i * k + j]: each prompt's mean, from values in sample order (prompt-major, k =
    `samples_per_prompt` per prompt, as `rollout.sample` and `measure` give them), (n * k,) -> (n,)."""
    k = samples_per_prompt
    if k < 1 or len(values) % k:
        raise ValueError(f"{len(values)} values are not whole prompts of {k} samples each")
    return [statistics.fmean(values[i : i + k]) for i in range(0, len(values), k)]


def summarize(rewards: Sequence[float], samples_per_prompt: int = 1) -> dict[str, float]:
    """Mean, spread, standard error and the share above +0.05 of rewards in sample order (prompt-major,
    `samples_per_prompt` each). `std` is the spread of single samples; `stderr` is the mean's standard error with
    each prompt's samples as one cluster: the stderr of the mean of per-prompt means, sd_i(m_i) / sqrt(n_prompts),
    whose mean equals the mean of all samples since every prompt has the same count. Samples of one prompt are not
    independent (they share the prompt), so sd / sqrt(n_samples) would understate it."""
    return {
        "mean": statistics.fmean(rewards),
        "std": statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
        "stderr": stderr(prompt_means(rewards, samples_per_prompt)),
        "positive_fraction": sum(r > 0.05 for r in rewards) / len(rewards),
    }


def paired_gain(policy: Sequence[float], reference: Sequence[float], samples_per_prompt: int) -> dict[str, float]:
    """The policy's gain over the reference on the same prompts, paired by prompt: d_i = m_i(policy) - m_i(reference)
    (each prompt's mean over its samples, `prompt_means`), gain = mean_i d_i, stderr = sd_i(d_i) / sqrt(n_prompts).
    Both lists in sample order, prompt-major, `samples_per_prompt` each, prompt i the same prompt in both. Pairing
    removes what the prompt contributes to both rewards, and clustering counts a prompt's samples once; treating
    all 2 * n * k samples as independent (hypot of the two stderrs) is wrong both ways."""
    if len(policy) != len(reference):
        raise ValueError(f"paired_gain: {len(policy)} policy rewards against {len(reference)} reference rewards")
    differences = [p - r for p, r in zip(prompt_means(policy, samples_per_prompt),
                                         prompt_means(reference, samples_per_prompt), strict=True)]
    return {"mean": statistics.fmean(differences), "stderr": stderr(differences), "num_prompts": len(differences)}


def implicit_reward(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> list[float]:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) of each sequence, from its summed log-probs, shapes (N,)."""
    return [beta * ratio for ratio in (policy_logps - reference_logps).tolist()]


@dataclass
class ModelPair:
    """The policy and its reference as models. Build it with `reference_pair` (training runs) or directly."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None = None  # a separate frozen reference, held or loaded on first use
    load_reference: Callable[[], torch.nn.Module] | None = None  # when none is held and there is no adapter
    adapter_off: bool = False  # LoRA without --ref-model: the reference is the policy with its adapter switched off

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[torch.nn.Module]:
        if self.adapter_off:
            from preftune.models.load import adapters_off

            with adapters_off(self.policy) as reference:
                yield reference
            return
        if self.reference is None:
            if self.load_reference is None:
                raise ValueError("a ModelPair needs a reference, a way to load one, or an adapter to switch off")
            self.reference = self.load_reference()  # kept: a later measurement reuses it
        yield self.reference


def reference_pair(
    policy: torch.nn.Module, held: torch.nn.Module | None, model: ModelConfig,
    place: Callable[[torch.nn.Module], torch.nn.Module],
) -> ModelPair:
    """The pair of a training run: `held` is the frozen reference the run keeps (None when it keeps none);
    `place` readies a loaded model for the run (device, or FSDP sharding)."""
    from preftune.models.load import load_reference_model

    if held is not None:
        return ModelPair(policy, held)
    if model.ref_model is None and hasattr(policy, "disable_adapter"):
        return ModelPair(policy, adapter_off=True)
    return ModelPair(policy, load_reference=lambda: place(load_reference_model(model)))


@dataclass
class Measurement:
    """Per-sample results, in sample order (prompt by prompt, `num_samples` each)."""

    policy_samples: list[Sample]
    reference_samples: list[Sample] | None  # None unless asked for
    kl: KLEstimate  # KL(policy || reference) from the policy's samples
    policy_rewards: list[float] | None = None  # ground truth, when a reward was given
    reference_rewards: list[float] | None = None
    policy_implicit: list[float] | None = None  # beta * log(pi / pi_ref) of each policy sample, when beta was given
    reference_implicit: list[float] | None = None  # the same of each reference sample


def sample_columns(columns: Sequence[Mapping[str, Any]] | None, samples: Sequence[Sample]) -> dict[str, list]:
    """Each prompt's columns (one mapping per prompt) as a reward function's keywords: one value per sample."""
    names = dict.fromkeys(name for c in (columns or []) for name in c)
    return {name: [columns[s.prompt_index].get(name) for s in samples] for name in names}


def measure(
    pair: ModelPair,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 32,
    sample_reference: bool = True,
    reward: RewardFunction | None = None,
    prompts: Sequence[Text] | None = None,
    beta: float | None = None,
    columns: Sequence[Mapping[str, Any]] | None = None,
) -> Measurement:
    """Sample `num_samples` completions per prompt from the policy (and, with `sample_reference`, from the
    reference, same seed), score them, and estimate KL(policy || reference) from the policy's samples.

    Samples follow the models' own distributions (temperature 1, no truncation), as the KL estimate needs. Both
    models' samples are in prompt-major order, `num_samples` per prompt (sample i of each is of the same prompt), so
    `summarize` and `paired_gain` cluster and pair them by prompt; the KL's standard error is clustered by prompt.
    `reward(prompts, completions)` is the ground truth (`prompts`: one per prompt id list, as given, strings or chat
    messages; unset: the decoded prompt ids), given each completion's token ids and its prompt's `columns` (one
    mapping per prompt: a reward function's keywords, as TRL gives them). With `beta`, also the implicit reward of
    each sample.
    """
    settings = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    pad = tokenizer.pad_token_id
    policy = pair.policy
    policy_samples = sample(policy, tokenizer, prompt_ids, **settings)
    policy_logps = sequence_logps_of_samples(policy, policy_samples, pad)
    reference_samples = reference_implicit = None
    with pair.reference_model() as reference:
        reference_logps = sequence_logps_of_samples(reference, policy_samples, pad)
        if sample_reference:
            reference_samples = sample(reference, tokenizer, prompt_ids, **settings)
            if beta is not None:
                own = sequence_logps_of_samples(reference, reference_samples, pad)
    if reference_samples is not None and beta is not None:
        under_policy = sequence_logps_of_samples(policy, reference_samples, pad)
        reference_implicit = implicit_reward(under_policy, own, beta)
    kl = kl_from_samples(policy_logps, reference_logps, num_samples)
    result = Measurement(policy_samples, reference_samples, kl)
    if beta is not None:
        result.policy_implicit = implicit_reward(policy_logps, reference_logps, beta)
        result.reference_implicit = reference_implicit
    if reward is not None:
        given = list(prompts) if prompts is not None else [
            tokenizer.decode(ids, skip_special_tokens=True) for ids in prompt_ids]

        checked_reward = checked(reward, getattr(reward, "name", "given"))

        def score(samples: list[Sample]) -> list[float]:
            prompts, completions = [given[s.prompt_index] for s in samples], [s.text for s in samples]
            values = checked_reward(prompts, completions, [s.completion_ids for s in samples],
                                    sample_columns(columns, samples))
            return all_judged(values, checked_reward, prompts, completions)

        result.policy_rewards = score(policy_samples)
        if reference_samples is not None:
            result.reference_rewards = score(reference_samples)
    return result
