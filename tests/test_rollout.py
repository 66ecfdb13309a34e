"""rollout.py: sampling with the sampler's own log-probs, and the rollout layouts against one row per sample."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from preftune.recipes.ppo import token_values
from preftune.rollout import Sample, SeededRows, sample, sample_rows, sampled_token_logps, token_logps
from tests.conftest import PAIRS, write_jsonl

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


# Options a model's generation_config.json may ship that would change what generate samples: each must be ignored.
SHIPPED_GENERATION_OPTIONS = {"no_repeat_ngram_size": 1, "repetition_penalty": 1.5, "min_new_tokens": 2,
                              "suppress_tokens": [82], "begin_suppress_tokens": [81], "bad_words_ids": [[83]],
                              "do_sample": True, "temperature": 0.3, "top_k": 2, "top_p": 0.5, "min_p": 0.5,
                              "typical_p": 0.5, "epsilon_cutoff": 0.2}
# The tokens the fixed distribution puts its weight on: a, b, c, d (one token each in SmolLM2's vocabulary) and EOS.
SUPPORT = {81: 0.3, 82: 0.25, 83: 0.2, 84: 0.15, 2: 0.1}


@pytest.fixture(scope="module")
def shipping_model_dir(tmp_path_factory, tokenizer_dir):
    """A 1-layer Llama (128 tokens of SmolLM2's vocabulary) whose next-token logits are the same after every
    prefix: every embedding is the same vector and the attention and MLP outputs are zero, so the last hidden state is
    that vector (normed), and the head gives log SUPPORT on its tokens, -30 elsewhere. Its generation_config.json
    ships SHIPPED_GENERATION_OPTIONS."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden = 8
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    logits = torch.full((128,), -30.0)
    logits[list(SUPPORT)] = torch.tensor(list(SUPPORT.values())).log()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(logits[:, None].expand(-1, hidden) / hidden)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                               **SHIPPED_GENERATION_OPTIONS)
    folder = tmp_path_factory.mktemp("shipping")
    model.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def softmax_of(folder, temperature: float) -> torch.Tensor:
    """softmax(logits / T) of the model in `folder`, (vocabulary,), from a forward pass; the same after every prefix
    (checked)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[104, 81, 82, 83, 84, 81]])).logits[0]
    torch.testing.assert_close(logits, logits[:1].expand_as(logits), atol=1e-5, rtol=0.0)
    return torch.softmax(logits[0] / temperature, dim=-1)


def assert_softmax_frequencies(completions: list[list[int]], probs: torch.Tensor, max_new_tokens: int) -> None:
    """At every position, the completions still running there drew each of SUPPORT's tokens (and any other token,
    together) at its probability under `probs` (vocabulary,), to 4 standard errors of the frequency."""
    for t in range(max_new_tokens):
        drawn = torch.tensor([c[t] for c in completions if len(c) > t])
        others = ~torch.isin(drawn, torch.tensor(list(SUPPORT)))
        for token, p, hits in [(v, probs[v], drawn == v) for v in SUPPORT] + [
                ("other", 1 - probs[list(SUPPORT)].sum(), others)]:
            frequency, standard_error = hits.double().mean(), (p * (1 - p) / len(drawn)).sqrt()
            assert abs(frequency - p) <= 4 * standard_error + 1e-9, (t, token, frequency.item(), p.item())


@pytest.mark.parametrize("lora", [False, True])
def test_a_rollout_samples_from_the_softmax_whatever_the_model_ships(shipping_model_dir, lora):
    """Rollouts (one seed per row) draw from softmax(logits / T): none of the sampling options a model's
    generation_config ships (repetition penalty, no repeated n-grams, minimum length, suppressed tokens ...) is
    applied, since the ratio and the KL are computed from the raw logits. Also with a LoRA adapter (peft's generate
    reads the inner model's generation_config); the adapter starts at zero, so the distribution is the model's."""
    from transformers import AutoModelForCausalLM

    from preftune.config import ModelConfig
    from preftune.models import add_lora

    tokenizer = AutoTokenizer.from_pretrained(shipping_model_dir)
    model = AutoModelForCausalLM.from_pretrained(shipping_model_dir)
    shipped = model.generation_config.to_dict()
    if lora:
        model = add_lora(model, ModelConfig(lora_target_modules="q_proj,v_proj"))
    count, max_new_tokens = 2000, 3
    samples = sample(model, tokenizer, [[104]], num_samples=count, max_new_tokens=max_new_tokens, batch_size=500,
                     row_seeds=range(count), with_logps=True)
    assert model.generation_config.to_dict() == shipped  # the model's own config is left as it was
    probs = softmax_of(shipping_model_dir, 1.0)
    assert_softmax_frequencies([s.completion_ids for s in samples], probs, max_new_tokens)
    for s in samples[:50]:  # the log-probs the loss uses are the raw logits' at the tokens drawn
        torch.testing.assert_close(s.token_logps, probs[s.completion_ids].log(), atol=1e-5, rtol=0.0)


def test_generate_samples_from_the_softmax_whatever_the_model_ships(tmp_path, shipping_model_dir, capsys):
    """`preftune generate` (generate's own sampling from the seed) draws from softmax(logits / T) at --temperature,
    whatever the model's generation_config ships, and prints no warning about it."""
    from preftune.cli import main

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "x"}])
    count, max_new_tokens = 2000, 3
    assert main(["generate", "--model", str(shipping_model_dir), "--prompts", str(prompts), "--num-samples",
                 str(count), "--max-new-tokens", str(max_new_tokens), "--temperature", "0.7", "--batch-size", "500",
                 "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    texts = [json.loads(line)["completion"] for line in out.strip().splitlines()]
    assert len(texts) == count and "generation flags" not in err
    # a, b, c, d are token ids 81-84; a completion shorter than max_new_tokens ended with EOS (2), not printed
    completions = [[ord(ch) - ord("a") + 81 for ch in text] + [2] * (len(text) < max_new_tokens) for text in texts]
    assert_softmax_frequencies(completions, softmax_of(shipping_model_dir, 0.7), max_new_tokens)
