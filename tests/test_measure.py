"""The reference as a model in every case a run has, and one measurement against brute-force recomputation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.config import ModelConfig
from preftune.evaluation.measure import ModelPair, kl_from_samples, measure, reference_pair
from preftune.forward.rollout import sample, sequence_logps_of_samples
from preftune.models.load import add_lora, frozen


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
    assert measured.kl == kl_from_samples(ours, theirs)
    assert measured.policy_implicit == pytest.approx((0.5 * (ours - theirs)).tolist(), abs=1e-6)
    on_reference = (sequence_logps_of_samples(policy, reference_samples, pad)
                    - sequence_logps_of_samples(reference, reference_samples, pad))
    assert measured.reference_implicit == pytest.approx((0.5 * on_reference).tolist(), abs=1e-6)
    assert measured.policy_rewards == [float(len(s.text)) for s in policy_samples]
    assert reward_calls[0] == ["a", "a", "b", "b"]  # each sample scored with its own prompt's text

    alone = measure(ModelPair(policy, reference), tokenizer, prompt_ids, max_new_tokens=5, seed=3,
                    sample_reference=False)
    assert alone.reference_samples is None and alone.policy_rewards is None and alone.policy_implicit is None

