"""Summed completion log-probs of the padded batch equal a brute-force, one-sequence-at-a-time computation, both
with the output head on completion positions only and with full logits."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import preftune.forward.logprobs
from preftune.data.batching import LAYOUTS, collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.forward.logprobs import keeps_positions, sequence_logps


@pytest.fixture(params=list(LAYOUTS))
def collate(request):
    return LAYOUTS[request.param]


@pytest.fixture(params=["sdpa", "eager"])
def attention(request) -> str:
    return request.param


@pytest.fixture(params=["head-on-completions", "full-logits"])
def head_path(request, monkeypatch) -> str:
    if request.param == "full-logits":  # as for a model that cannot slice its logits
        monkeypatch.setattr(preftune.forward.logprobs, "keeps_positions", lambda model: False)
    return request.param


def brute_force(model, prompt: list[int], completion: list[int]) -> float:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(logprobs[len(prompt) + i - 1, token].item() for i, token in enumerate(completion))


def test_sequence_logps_matches_brute_force(tiny_model_dir, head_path, collate, attention):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    pairs = [
        TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12, 13], index=0),
        TokenizedPair([20], [21, 22, 23, 24, 25], [26], index=1),
        TokenizedPair([30, 31, 32, 33, 34], [35], [36, 37], index=2),
    ]
    with torch.no_grad():
        out = sequence_logps(model, collate(pairs, pad_token_id=2))
    for i, pair in enumerate(pairs):
        assert abs(out.chosen[i].item() - brute_force(model, pair.prompt_ids, pair.chosen_ids)) < 1e-4
        assert abs(out.rejected[i].item() - brute_force(model, pair.prompt_ids, pair.rejected_ids)) < 1e-4
    assert out.chosen_tokens.tolist() == [2, 5, 1]
    assert out.rejected_tokens.tolist() == [4, 1, 2]


def test_length_split_and_wpo_weights_match_brute_force(tiny_model_dir, head_path, collate):
    """LD-DPO tails (tokens past min(|y_w|, |y_l|)) and WPO weights exp(mean_t log p(y_t) - log sum_v p(v)^2)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pairs = [TokenizedPair([5, 6], [8, 9, 10, 11], [12], index=0), TokenizedPair([20, 21, 22], [23], [24, 25, 26], 1)]
    with torch.no_grad():
        plain = sequence_logps(model, collate(pairs, pad_token_id=2))
        out = sequence_logps(model, collate(pairs, pad_token_id=2), length_split=True, wpo_weights=True)
    torch.testing.assert_close(out.chosen, plain.chosen)
    assert plain.chosen_tail is None and plain.chosen_weight is None
    for i, pair in enumerate(pairs):
        shared = min(len(pair.chosen_ids), len(pair.rejected_ids))
        for completion, tail, weight in ((pair.chosen_ids, out.chosen_tail[i], out.chosen_weight[i]),
                                         (pair.rejected_ids, out.rejected_tail[i], out.rejected_weight[i])):
            ids = torch.tensor([pair.prompt_ids + completion])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            rows = [logprobs[len(pair.prompt_ids) + t - 1] for t in range(len(completion))]
            token = [row[c].item() for row, c in zip(rows, completion)]
            sum_sq = [torch.logsumexp(2 * row, dim=-1).item() for row in rows]
            assert abs(tail.item() - sum(token[shared:])) < 1e-4
            expected_weight = math.exp(sum(t - s for t, s in zip(token, sum_sq)) / len(completion))
            assert abs(weight.item() - expected_weight) < 1e-4 * expected_weight


def test_the_head_runs_on_completion_positions_only(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(preftune.forward.logprobs, "plain_output_head", lambda model: None)  # the model's own head
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pairs = [TokenizedPair([5, 6, 7, 8, 9], [10, 11], [12], 0), TokenizedPair([20], [21, 22, 23], [24, 25], 1)]
    batch = collate_padded(pairs, pad_token_id=2)
    rows_seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows_seen.append(args[0].shape))
    fast = sequence_logps(model, batch)
    fast_loss = (fast.chosen - 0.5 * fast.rejected).sum()
    fast_grads = torch.autograd.grad(fast_loss, list(model.parameters()))
    assert rows_seen == [(2 + 3 + 1 + 2, 32)]  # completion tokens only, not 2 rows x 7 positions
    assert keeps_positions(model)

    full = copy.deepcopy(model)
    preftune.forward.logprobs.keeps_positions, saved = (lambda m: False), preftune.forward.logprobs.keeps_positions
    try:
        slow = sequence_logps(full, batch)
    finally:
        preftune.forward.logprobs.keeps_positions = saved
    slow_grads = torch.autograd.grad((slow.chosen - 0.5 * slow.rejected).sum(), list(full.parameters()))
    torch.testing.assert_close(fast.chosen, slow.chosen)
    torch.testing.assert_close(fast.rejected, slow.rejected)
    difference = sum(((a - b).double() ** 2).sum() for a, b in zip(fast_grads, slow_grads, strict=True))
    assert (difference / sum((b.double() ** 2).sum() for b in slow_grads)).sqrt().item() < 1e-6


@pytest.mark.parametrize("chunk_rows", [3, 1])
@pytest.mark.parametrize("lora", [False, True])
def test_the_chunked_head_gives_the_models_values_and_gradients(tiny_model_dir, monkeypatch, chunk_rows, lora):
    """preftune's own head, a few positions at a time (ChunkedHeadLogps, with a hand-written backward): the same
    log-probs, WPO normalisers and gradients as the model's head on the kept positions. In float64, so that the
    comparison is of the math, not of float32 summation orders (which differ with the chunk's shape)."""
    from peft import LoraConfig, get_peft_model

    pairs = [TokenizedPair([5, 6, 7, 8, 9], [10, 11], [12], 0), TokenizedPair([20], [21, 22, 23], [24, 25], 1)]
    batch = LAYOUTS["packed"](pairs, pad_token_id=2)
    results = {}
    for path in ("model", "chunked"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if lora:  # the head frozen: no weight gradient is computed for it
            model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
        model.double()
        head = model.get_output_embeddings()
        with monkeypatch.context() as patch:
            if path == "model":
                patch.setattr(preftune.forward.logprobs, "plain_output_head", lambda model: None)
            else:
                assert preftune.forward.logprobs.plain_output_head(model) is head
                patch.setattr(preftune.forward.logprobs, "HEAD_CHUNK_ELEMENTS", chunk_rows * head.weight.shape[0])
            calls = []
            patch.setattr(preftune.forward.logprobs.ChunkedHeadLogps, "apply",
                          lambda *args, apply=preftune.forward.logprobs.ChunkedHeadLogps.apply, calls=calls:
                          calls.append(1) or apply(*args))
            out = sequence_logps(model, batch, wpo_weights=True)
            assert len(calls) == (path == "chunked")
        trained = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad((out.chosen - 0.5 * out.rejected).sum(), trained)
        results[path] = (out, grads, head.weight.requires_grad)
        assert type(model.get_output_embeddings()) is torch.nn.Linear  # the head is back after the forward
    (model_out, model_grads, _), (chunked_out, chunked_grads, head_trained) = results["model"], results["chunked"]
    assert head_trained != lora
    assert chunked_out.chosen.dtype == torch.float64
    for field in ("chosen", "rejected", "chosen_weight", "rejected_weight"):
        torch.testing.assert_close(getattr(chunked_out, field), getattr(model_out, field), rtol=1e-10, atol=1e-10)
    assert chunked_out.chosen_weight.grad_fn is None  # WPO weights are constants
    for a, b in zip(chunked_grads, model_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_the_chunked_head_under_bf16_autocast(tiny_model_dir, monkeypatch):
    """Under autocast the head runs in bf16 as the model's would, forward and (recomputed) backward."""
    pairs = [TokenizedPair([5, 6, 7, 8, 9], [10, 11], [12], 0), TokenizedPair([20], [21, 22, 23], [24, 25], 1)]
    batch = LAYOUTS["packed"](pairs, pad_token_id=2)
    results = {}
    for path in ("model", "chunked"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with monkeypatch.context() as patch, torch.autocast("cpu", dtype=torch.bfloat16):
            if path == "model":
                patch.setattr(preftune.forward.logprobs, "plain_output_head", lambda model: None)
            else:
                patch.setattr(preftune.forward.logprobs, "HEAD_CHUNK_ELEMENTS", 2 * model.lm_head.weight.shape[0])
            out = sequence_logps(model, batch)
        out.chosen.sum().backward()
        results[path] = (out.chosen.detach(), model.lm_head.weight.grad)
    assert results["chunked"][1].dtype == torch.float32
    torch.testing.assert_close(results["chunked"][0], results["model"][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results["chunked"][1], results["model"][1], rtol=5e-2, atol=5e-3)


def test_the_chunked_head_is_used_only_where_the_logits_are_the_heads_alone(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert preftune.forward.logprobs.plain_output_head(model) is model.lm_head
    rows_seen = []  # one chunk's worth of logits: the model's own head runs (on the kept positions only)
    model.lm_head.register_forward_hook(lambda module, args, output: rows_seen.append(args[0].shape[0]))
    sequence_logps(model, LAYOUTS["packed"]([TokenizedPair([5, 6], [7, 8], [9], 0)], pad_token_id=2))
    assert rows_seen == [2]  # the predictors of 7 (shared with 9) and 8
    monkeypatch.setattr(model.config, "model_type", "gemma2")  # soft-caps its logits after the head
    assert preftune.forward.logprobs.plain_output_head(model) is None


def test_fsdp_sharded_models_keep_their_class_facts_and_run_their_own_head(tiny_model_dir):
    """FSDP2 swaps a sharded module's class for an `FSDP<Name>` subclass (as `fully_shard` does, by assigning
    __class__): the model class is still found, and the chunked head, which reads the head's weight outside the
    forward (where FSDP has not gathered it), is off, also with peft's wrapper on the outside."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FSDPModule

    def as_fsdp(module: torch.nn.Module) -> torch.nn.Module:
        module.__class__ = type(f"FSDP{type(module).__name__}", (FSDPModule, type(module)), {})
        return module

    model = as_fsdp(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert preftune.forward.logprobs.model_class(model).__name__ == "LlamaForCausalLM"
    assert keeps_positions(model)
    assert preftune.forward.logprobs.plain_output_head(model) is None
    adapted = as_fsdp(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     LoraConfig(r=2, target_modules="all-linear")))
    assert keeps_positions(adapted)
    assert preftune.forward.logprobs.plain_output_head(adapted) is None


def test_keeps_positions_sees_through_wrappers(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert keeps_positions(get_peft_model(model, LoraConfig(r=2, target_modules="all-linear")))

    class NoSlicing(torch.nn.Module):  # a model whose forward has no logits_to_keep
        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return input_ids

    assert not keeps_positions(NoSlicing())


@pytest.mark.parametrize("layout", ["shared_prefix", "packed"])
def test_prefix_sharing_layouts_give_the_padded_layouts_values_and_gradients(tiny_model_dir, layout):
    """The prompt computed once (and, packed, several pairs in a row), exactly: the same log-probs and the same
    gradients as computing each sequence in its own padded row."""
    pairs = [TokenizedPair([5, 6, 7, 8], [10, 11], [12, 13, 14], 0), TokenizedPair([20, 21], [23], [24, 25], 1),
             TokenizedPair([30], [31, 32, 33, 34], [35], 2), TokenizedPair([40], [41], [42], 3)]
    results = {}
    for name in ("padded", layout):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        batch = LAYOUTS[name](pairs, pad_token_id=2)
        out = sequence_logps(model, batch, length_split=True)
        loss = (out.chosen - 0.7 * out.rejected + 0.3 * out.chosen_tail).sum()
        results[name] = (out, torch.autograd.grad(loss, list(model.parameters())))
    if layout == "packed":  # pairs of 9, 5, 6 and 3 tokens in one row
        assert batch.input_ids.shape == (1, 23)
    (padded, padded_grads), (shared, shared_grads) = results["padded"], results[layout]
    for field in ("chosen", "rejected", "chosen_tail", "rejected_tail"):
        torch.testing.assert_close(getattr(shared, field), getattr(padded, field), rtol=1e-5, atol=1e-5)
    assert shared.chosen_tokens.tolist() == padded.chosen_tokens.tolist() == [2, 1, 4, 1]
    # float32 reassociation: elementwise, a gradient entry that is a sum of cancelling terms can differ by 1e-3
    # of itself, so compare the whole gradient (in float64 the two agree to the float32 log-softmax's rounding)
    difference = sum(((a - b).double() ** 2).sum() for a, b in zip(shared_grads, padded_grads, strict=True))
    norm = sum((b.double() ** 2).sum() for b in padded_grads)
    assert (difference / norm).sqrt().item() < 1e-5


def test_token_entropies_are_the_same_from_the_chunked_head_and_the_models_own(tiny_model_dir, monkeypatch):
    """GRPO's per-token entropy, -sum_v p(v) log p(v) at each scored token's predicting position: by definition from
    the full logits, from the model's head on the kept positions, and from preftune's chunked head (float64)."""
    from preftune.forward.logprobs import scored_token_statistics

    pairs = [TokenizedPair([5, 6, 7, 8, 9], [10, 11], [12], 0), TokenizedPair([20], [21, 22, 23], [24, 25], 1)]
    batch = LAYOUTS["padded"](pairs, pad_token_id=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        full = torch.distributions.Categorical(logits=logits[batch.token_rows, batch.token_predictors]).entropy()
    results = {}
    for path in ("model", "chunked"):
        with monkeypatch.context() as patch:
            if path == "model":
                patch.setattr(preftune.forward.logprobs, "plain_output_head", lambda model: None)
            else:
                patch.setattr(preftune.forward.logprobs, "HEAD_CHUNK_ELEMENTS", 2 * model.config.vocab_size)
            logps, sum_sq, entropies = scored_token_statistics(model, batch, entropy=True)
        assert sum_sq is None and entropies.grad_fn is None and logps.grad_fn is not None
        results[path] = entropies
    torch.testing.assert_close(results["model"], full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results["chunked"], full, rtol=1e-10, atol=1e-10)
