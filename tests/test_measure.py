"""The reference as a model in every case a run has, one measurement against brute-force recomputation, and the
held-out statistics: standard errors clustered by prompt, the gain paired by prompt (by hand and by brute force)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.config import ModelConfig
from preftune.measure import (
    ModelPair,
    kl_from_samples,
    measure,
    paired_gain,
    prompt_means,
    reference_pair,
    summarize,
)
from preftune.models import add_lora, frozen
from preftune.rollout import sample, sequence_logps_of_samples


def load(folder) -> torch.nn.Module:
    return frozen(AutoModelForCausalLM.from_pretrained(folder))


@pytest.fixture
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer("The movie was").input_ids, tokenizer("Honestly, this film").input_ids]


def test_reference_pair_covers_every_case(tiny_model_dir, tiny_ref_dir):
    policy, held = load(tiny_model_dir), load(tiny_ref_dir)
    with reference_pair(policy, held, ModelConfig(), lambda m: m).reference_model() as reference:
        assert reference is held  # a frozen copy or --ref-model, kept by the run

    lora = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ModelConfig(lora=True))
    pair = reference_pair(lora, None, ModelConfig(model=str(tiny_model_dir), lora=True), lambda m: m)
    with pair.reference_model() as reference:
        assert reference is lora  # the same weights, its adapter switched off (test_lora_reference_is_...)

    loads = []

    def place(model: torch.nn.Module) -> torch.nn.Module:
        loads.append(model)
        return model

    # no reference held (--reference-free, --precompute-ref-log-probs), no adapter: the starting model, loaded once
    pair = reference_pair(policy, None, ModelConfig(model=str(tiny_model_dir), ref_model=str(tiny_ref_dir)), place)
    for _ in range(2):
        with pair.reference_model() as reference:
            expected = load(tiny_ref_dir)
            assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), expected.parameters()))
    assert len(loads) == 1


def test_lora_reference_is_the_base_model(tiny_model_dir, tokenizer, prompt_ids):
    base = load(tiny_model_dir)
    lora = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ModelConfig(lora=True))
    with torch.no_grad():  # move the adapter off zero, so that "adapter off" is a real difference
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.05)
    samples = sample(base, tokenizer, prompt_ids, max_new_tokens=6, seed=1)
    pair = reference_pair(lora, None, ModelConfig(lora=True), lambda m: m)
    with pair.reference_model() as reference:
        off = sequence_logps_of_samples(reference, samples, tokenizer.pad_token_id)
    on = sequence_logps_of_samples(lora, samples, tokenizer.pad_token_id)
    assert torch.allclose(off, sequence_logps_of_samples(base, samples, tokenizer.pad_token_id), atol=1e-6)
    assert not torch.allclose(on, off, atol=1e-3)


def test_measure_equals_recomputing_each_part(tiny_model_dir, tiny_ref_dir, tokenizer, prompt_ids):
    policy, reference = load(tiny_model_dir), load(tiny_ref_dir)
    reward_calls = []

    def reward(prompts, completions):
        reward_calls.append(list(prompts))
        return [float(len(c)) for c in completions]

    measured = measure(ModelPair(policy, reference), tokenizer, prompt_ids, num_samples=2, max_new_tokens=5, seed=3,
                       reward=reward, prompts=["a", "b"], beta=0.5)
    pad = tokenizer.pad_token_id
    policy_samples = sample(policy, tokenizer, prompt_ids, num_samples=2, max_new_tokens=5, seed=3)
    reference_samples = sample(reference, tokenizer, prompt_ids, num_samples=2, max_new_tokens=5, seed=3)
    assert [s.completion_ids for s in measured.policy_samples] == [s.completion_ids for s in policy_samples]
    assert [s.completion_ids for s in measured.reference_samples] == [s.completion_ids for s in reference_samples]
    ours = sequence_logps_of_samples(policy, policy_samples, pad)
    theirs = sequence_logps_of_samples(reference, policy_samples, pad)
    assert measured.kl == kl_from_samples(ours, theirs, 2)
    # prompt-major, 2 per prompt, and sample i of either model is of the same prompt: what pairing by prompt needs
    assert [s.prompt_index for s in measured.policy_samples] == [0, 0, 1, 1]
    assert [s.prompt_index for s in measured.reference_samples] == [0, 0, 1, 1]
    assert measured.policy_implicit == pytest.approx((0.5 * (ours - theirs)).tolist(), abs=1e-6)
    on_reference = (sequence_logps_of_samples(policy, reference_samples, pad)
                    - sequence_logps_of_samples(reference, reference_samples, pad))
    assert measured.reference_implicit == pytest.approx((0.5 * on_reference).tolist(), abs=1e-6)
    assert measured.policy_rewards == [float(len(s.text)) for s in policy_samples]
    assert reward_calls[0] == ["a", "a", "b", "b"]  # each sample scored with its own prompt's text

    alone = measure(ModelPair(policy, reference), tokenizer, prompt_ids, max_new_tokens=5, seed=3,
                    sample_reference=False)
    assert alone.reference_samples is None and alone.policy_rewards is None and alone.policy_implicit is None



def test_clustered_and_paired_standard_errors_by_hand():
    """3 prompts x 2 samples. Policy per-prompt means m = (2, 3, 1): mean 2, sd 1, stderr 1/sqrt(3). Reference
    means (0, 1, 1): d = (2, 2, 0), gain 4/3, sd(d) = sqrt(((2/3)^2 + (2/3)^2 + (4/3)^2) / 2) = 2/sqrt(3), stderr
    2/sqrt(3)/sqrt(3) = 2/3. Counting every sample as independent gave hypot(sd(1, 3, 2, 4, 0, 2) / sqrt(6),
    sd(0, 0, 1, 1, 1, 1) / sqrt(6)) = hypot(1/sqrt(3), 2/sqrt(90)) = 0.615 instead."""
    policy, reference = [1.0, 3.0, 2.0, 4.0, 0.0, 2.0], [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert prompt_means(policy, 2) == [2.0, 3.0, 1.0] and prompt_means(reference, 2) == [0.0, 1.0, 1.0]
    summary = summarize(policy, 2)
    assert summary["mean"] == 2.0 and summary["stderr"] == pytest.approx(1 / math.sqrt(3))
    assert summary["std"] == pytest.approx(math.sqrt(2))  # the spread of single samples, unclustered
    gain = paired_gain(policy, reference, 2)
    assert gain["mean"] == pytest.approx(4 / 3) and gain["stderr"] == pytest.approx(2 / 3)
    assert gain["num_prompts"] == 3
    # one prompt's samples share the prompt: if they are equal, the prompt counts once, not k times
    assert summarize([1.0, 1.0, 3.0, 3.0], 2)["stderr"] == pytest.approx(1.0)  # sd(1, 3) / sqrt(2)
    assert summarize([1.0, 1.0, 3.0, 3.0], 1)["stderr"] == pytest.approx(statistics.stdev([1, 1, 3, 3]) / 2)
    with pytest.raises(ValueError, match="whole prompts"):
        prompt_means([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError):
        paired_gain([1.0, 2.0], [1.0, 2.0, 3.0, 4.0], 2)


def test_paired_standard_errors_equal_the_explicit_formula():
    """Brute force: rewards with a prompt effect shared by both models (n prompts x k samples). The functions equal
    the explicit formulas on the (n, k) table, and the paired stderr is far below the independent-samples one
    (the prompt effect cancels in d_i)."""
    generator = torch.Generator().manual_seed(0)
    n, k = 40, 3
    prompt_effect = torch.randn(n, 1, generator=generator, dtype=torch.float64) * 2.0
    policy = prompt_effect + 0.3 + 0.5 * torch.randn(n, k, generator=generator, dtype=torch.float64)
    reference = prompt_effect + 0.5 * torch.randn(n, k, generator=generator, dtype=torch.float64)
    differences = policy.mean(dim=1) - reference.mean(dim=1)
    gain = paired_gain(policy.flatten().tolist(), reference.flatten().tolist(), k)
    assert gain["mean"] == pytest.approx((policy.mean() - reference.mean()).item())
    assert gain["stderr"] == pytest.approx((differences.std(unbiased=True) / math.sqrt(n)).item())
    clustered = summarize(policy.flatten().tolist(), k)["stderr"]
    assert clustered == pytest.approx((policy.mean(dim=1).std(unbiased=True) / math.sqrt(n)).item())
    independent = math.hypot(policy.flatten().std().item(), reference.flatten().std().item()) / math.sqrt(n * k)
    assert gain["stderr"] < independent / 3
    # k = 1: the paired stderr is the stderr of the per-sample differences
    one = paired_gain(policy[:, 0].tolist(), reference[:, 0].tolist(), 1)
    assert one["stderr"] == pytest.approx(statistics.stdev((policy[:, 0] - reference[:, 0]).tolist()) / math.sqrt(n))


def test_kl_stderr_is_clustered_by_prompt():
    """KL's mean is over all samples; its stderr is sd of the per-prompt mean log-ratios / sqrt(n_prompts)."""
    generator = torch.Generator().manual_seed(1)
    n, k = 6, 4
    policy_logps = -10 * torch.rand(n * k, generator=generator)
    reference_logps = policy_logps - torch.rand(n, 1, generator=generator).repeat(1, k).flatten() * 3
    ratios = (policy_logps - reference_logps).double().view(n, k)
    estimate = kl_from_samples(policy_logps, reference_logps, k)
    assert estimate.mean == pytest.approx(ratios.mean().item()) and estimate.num_samples == n * k
    assert estimate.stderr == pytest.approx((ratios.mean(dim=1).std(unbiased=True) / math.sqrt(n)).item())
    # each prompt's samples have equal log-ratios here: counted as n * k independent samples, the stderr shrinks by
    # sqrt((n - 1) / (n k - 1)) (about 1 / sqrt(k))
    independent = kl_from_samples(policy_logps, reference_logps).stderr
    assert independent == pytest.approx(estimate.stderr * math.sqrt((n - 1) / (n * k - 1)), rel=1e-4)
    assert math.isnan(kl_from_samples(policy_logps[:k], reference_logps[:k], k).stderr)  # one prompt


def length_reward(prompts, completions):  # varies on a random model's text (VADER scores it 0 almost always)
    return [len(c) + 1e-3 * sum(map(ord, c)) for c in completions]


def test_the_default_jobs_report_pairs_its_gain_by_prompt(tiny_model_dir, tiny_ref_dir, tokenizer, monkeypatch):
    """sentiment_report.json: the same paired gain as rl_report.json, from the per-sample rewards it keeps."""
    from preftune.config import Config
    from preftune.sentiment import sentiment_report

    monkeypatch.setattr("preftune.sentiment.sentiment_reward", lambda: length_reward)
    config = Config()
    config.default_job.num_eval_prompts, config.default_job.samples_per_eval_prompt = 4, 3
    config.sample.max_new_tokens = 6
    report = sentiment_report(ModelPair(load(tiny_model_dir), load(tiny_ref_dir)), tokenizer, config, None)
    n, k = 4, 3
    policy, reference = (torch.tensor(report["rewards"][m], dtype=torch.float64).view(n, k)
                         for m in ("policy", "reference"))
    differences = policy.mean(dim=1) - reference.mean(dim=1)
    assert report["reward_gain"] == pytest.approx(differences.mean().item())
    assert report["reward_gain_stderr"] == pytest.approx((differences.std() / math.sqrt(n)).item())
    assert report["policy_reward"]["stderr"] == pytest.approx((policy.mean(dim=1).std() / math.sqrt(n)).item())
    assert report["reference_reward"]["stderr"] == pytest.approx((reference.mean(dim=1).std() / math.sqrt(n)).item())
