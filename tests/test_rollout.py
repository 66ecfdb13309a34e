"""forward/rollout.py: sampling with the sampler's own log-probs, and the rollout layouts against one row per sample."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from preftune.forward.rollout import Sample, SeededRows, sample, sample_rows, sampled_token_logps, token_logps
from preftune.recipes.ppo import token_values
from tests.conftest import PAIRS

LAYOUTS = ("padded", "shared_prefix", "packed")


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tokenizer(pair["prompt"]).input_ids for pair in PAIRS]


def test_sampling_logps_equal_a_forward_and_leave_the_samples_unchanged(policy, prompt_ids, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = sample(policy, tokenizer, prompt_ids, num_samples=3, max_new_tokens=6, batch_size=12, seed=5)
    scored = sample(policy, tokenizer, prompt_ids, num_samples=3, max_new_tokens=6, batch_size=12, seed=5,
                    with_logps=True)
    assert [s.completion_ids for s in scored] == [s.completion_ids for s in plain]  # same tokens, same seed
    assert all(s.token_logps is None for s in plain)
    width = max(len(s.completion_ids) for s in scored)
    with torch.no_grad():
        forward = token_logps(policy, scored, tokenizer.pad_token_id, width, "cpu")
    from_sampling = sampled_token_logps(scored, width, "cpu")
    torch.testing.assert_close(from_sampling, forward, atol=1e-5, rtol=0.0)
    assert (forward != 0).sum() == sum(len(s.completion_ids) for s in scored)  # every token scored, none past


def uneven_samples(prompt_ids) -> list[Sample]:
    """Three prompts' samples, interleaved, of different lengths (one prompt with a single sample)."""
    completions = {0: [[11, 12, 13], [14], [15, 16, 17, 18, 19]], 1: [[21, 22], [23, 24, 25, 26]], 2: [[31]]}
    order = [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    return [Sample(p, prompt_ids[p], completions[p][j], "") for p, j in order]


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_shared_prompt_layouts_give_the_padded_logps_and_gradients(policy, prompt_ids, layout):
    """A prompt's samples as one segment (prompt | sample 1 | sample 2 ...): each sample's log-probs and their
    gradients equal one row per sample's."""
    samples = uneven_samples(prompt_ids)
    width = max(len(s.completion_ids) for s in samples)
    batch = sample_rows(samples, 2, "cpu", layout)
    assert batch.input_ids.shape[0] == (3 if layout == "shared_prefix" else 1)  # a row per prompt; packed: one
    results = {}
    for name in ("padded", layout):
        policy.zero_grad()
        logps = token_logps(policy, samples, 2, width, "cpu", name)
        (logps * torch.arange(1.0, width + 1)).sum().backward()
        results[name] = logps.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}
    torch.testing.assert_close(results[layout][0], results["padded"][0], atol=1e-5, rtol=0.0)
    for name, grad in results["padded"][1].items():
        torch.testing.assert_close(results[layout][1][name], grad, atol=1e-5, rtol=1e-4)
    lengths = torch.tensor([len(s.completion_ids) for s in samples])
    assert torch.equal((results[layout][0] != 0).sum(1), lengths)


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_critic_values_are_the_same_in_every_layout(prompt_ids, layout):
    torch.manual_seed(0)
    critic = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=2)).eval()
    samples = uneven_samples(prompt_ids)
    width = max(len(s.completion_ids) for s in samples)
    with torch.no_grad():
        padded = token_values(critic, samples, 2, width, "padded")
        shared = token_values(critic, samples, 2, width, layout)
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=0.0)


def test_seeded_rows_draw_from_the_softmax():
    """Gumbel-max: the argmax of the processed scores is a sample of softmax(z / T); 20,000 rows of one seed each
    land on each token with its probability, to 4 standard errors."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    for temperature in (1.0, 0.5):
        scores = (probs.log() * temperature).expand(20_000, -1)  # softmax(scores / T) = probs
        drawn = SeededRows(range(20_000), temperature)(None, scores).argmax(-1)
        frequencies = torch.bincount(drawn, minlength=4) / 20_000
        standard_errors = (probs * (1 - probs) / 20_000).sqrt()
        assert ((frequencies - probs).abs() < 4 * standard_errors).all(), (temperature, frequencies)


def test_a_seeded_row_samples_the_same_whatever_shares_its_batch(policy, prompt_ids, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    together = sample(policy, tokenizer, prompt_ids, num_samples=2, max_new_tokens=8, row_seeds=range(10, 18),
                      with_logps=True)
    alone = sample(policy, tokenizer, prompt_ids[2:3], num_samples=2, max_new_tokens=8, row_seeds=[14, 15],
                   with_logps=True, seed=99)
    assert [s.completion_ids for s in alone] == [s.completion_ids for s in together[4:6]]
    for a, b in zip(alone, together[4:6]):
        torch.testing.assert_close(a.token_logps, b.token_logps, atol=1e-5, rtol=0.0)
    assert len({tuple(s.completion_ids) for s in together}) > 4  # distinct seeds, distinct samples
