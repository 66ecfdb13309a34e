"""Memory independent of the rollout's size (issue 23, item 11): every forward of a rollout (sampling, the policy's
and the reference's log-probs, PPO's critic) holds at most --local-rollout-forward-batch-size samples, the samples
and their log-probs do not depend on it, and a minibatch's loss runs in micro-batches whose accumulated gradient is
the whole minibatch's."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from preftune.cli import build_config, build_parser
from preftune.config import Config, loss_params
from preftune.forward.logprobs import unwrapped
from preftune.forward.rollout import Sample, completion_mask, token_logps
from preftune.recipes import online, ppo, rloo
from preftune.recipes.online import Rollout, accumulate_gradients, micro_batches
from preftune.recipes.online_dpo import OnlineDPOObjective
from preftune.runtime.memory import glibc
from tests.conftest import PAIRS, write_jsonl


def largest_batches(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, int], list]:
    """Forward pre-hooks recording the most rows any forward of each module was given: (record, handles)."""
    record = {name: 0 for name in modules}

    def hook(name):
        def pre(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs["inputs_embeds"]
            record[name] = max(record[name], ids.shape[0])
        return pre

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in modules.items()]
    return record, handles


def rollout_of(command, tiny_model_dir, tmp_path, size: int, *extra: str):
    """One rollout (collect and score) of 4 prompts x 2 samples on the tiny model, with `size` samples per
    forward; the largest forward of each model it ran (padded layout: a row per sample)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    argv = [command, "--model", str(tiny_model_dir), "--prompts", str(prompts), "--output-dir",
            str(tmp_path / f"{command}-{size}"), "--rollout-batch-size", "4", "--max-new-tokens", "6",
            "--max-steps", "1", "--report-to", "none", "--reward", "sentiment", "--no-bf16",
            "--local-rollout-forward-batch-size", str(size), "--batch-layout", "padded", *extra]
    run = (ppo if command == "ppo" else rloo).setup(build_config(build_parser().parse_args(argv)))
    with run.models.reference_model() as reference:  # loaded on first use
        modules = {"policy": run.models.policy, "reference": reference}
    if command == "ppo":  # the critic's values run its backbone, then its head at the completion positions
        critic = unwrapped(run.group.unwrap(run.model).critic)
        modules["critic"] = getattr(critic, critic.base_model_prefix)
    record, handles = largest_batches(modules)
    try:
        rollout = online.collect(run, online.step_positions(run))
        run.objective.score(run, rollout)
    finally:
        for handle in handles:
            handle.remove()
        online.cleanup(run)
    return rollout, record


@pytest.mark.parametrize(("command", "extra"), [("rloo", ()), ("ppo", ()), ("rloo", ("--bf16",))])
def test_every_rollout_forward_holds_at_most_the_micro_batch_and_the_rollout_is_unchanged(
        tiny_model_dir, tmp_path, command, extra):
    """8 samples per rollout in forwards of 3 (the policy samples, its log-probs from a forward under bf16, the
    reference, the critic): no forward sees more than 3 samples, and the rollout equals the one of a single
    micro-batch: the same samples (each from its own seed), the same log-probs, values and advantages."""
    whole, whole_batches = rollout_of(command, tiny_model_dir, tmp_path, 64, *extra)
    split, split_batches = rollout_of(command, tiny_model_dir, tmp_path, 3, *extra)
    assert max(whole_batches.values()) == 8
    assert split_batches == {name: 3 for name in whole_batches}
    assert [s.completion_ids for s in split.samples] == [s.completion_ids for s in whole.samples]
    atol = 1e-2 if extra else 1e-5  # bf16: another batch shape rounds differently
    for name in ("logps", "ref_logps", "scores"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), atol=atol, rtol=0.0)
    assert split.extras.keys() == whole.extras.keys()
    for name, values in whole.extras.items():
        torch.testing.assert_close(split.extras[name], values, atol=atol * 10, rtol=0.0, msg=name)


# ---- the loss in micro-batches --------------------------------------------------------------------------------
def synthetic_rollout(lengths: list[int], generator: torch.Generator) -> Rollout:
    """A rollout of two samples per prompt, completions of the given lengths (prompts of 3 to 5 tokens, random
    ids), with random rollout log-probs."""
    prompts = [torch.randint(3, 200, (3 + i % 3,), generator=generator).tolist() for i in range(len(lengths) // 2)]
    samples = [Sample(i // 2, prompts[i // 2], torch.randint(3, 200, (length,), generator=generator).tolist(), "")
               for i, length in enumerate(lengths)]
    width = max(lengths)
    mask = completion_mask(samples, width)
    logps = -torch.rand(len(samples), width, generator=generator) * 3 * mask
    ref_logps = -torch.rand(len(samples), width, generator=generator) * 3 * mask
    scores = torch.randn(len(samples), generator=generator)
    return Rollout(samples, mask, logps, ref_logps, scores, scores.clone())


class OneProcess:
    """What accelerate does in one fp32 process (the test's own: accelerate's state is shared by the process)."""

    autocast = staticmethod(contextlib.nullcontext)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, _model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def gradients_of(objective, model, minibatch: Rollout, size: int) -> tuple[float, dict, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, metrics = accumulate_gradients(objective, model, minibatch, size, OneProcess())
    return loss, metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(objective, model, minibatch: Rollout, size: int) -> None:
    """The loss, metrics and gradients of the minibatch in micro-batches of `size` equal those of one forward
    (1e-5), and it did run in more than one micro-batch."""
    assert len(micro_batches(objective, minibatch, size)) > 1
    whole_loss, whole_metrics, whole = gradients_of(objective, model, minibatch, len(minibatch.samples))
    loss, metrics, split = gradients_of(objective, model, minibatch, size)
    assert abs(loss - whole_loss) <= 1e-5
    assert metrics.keys() == whole_metrics.keys()
    for name, value in whole_metrics.items():
        assert abs(metrics[name] - value) <= 1e-5, (name, metrics[name], value)
    assert split.keys() == whole.keys()
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, atol=1e-5, rtol=0.0, msg=name)
    assert max(g.abs().max() for g in whole.values()) > 1e-3  # gradients well above the tolerance


LENGTHS = [3, 1, 6, 2, 5, 5, 4, 2]  # uneven: a micro-batch's share of the tokens is not its share of the samples


@pytest.fixture
def policy(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()


def test_rloo_loss_in_micro_batches_has_the_whole_minibatchs_gradient(policy):
    generator = torch.Generator().manual_seed(0)
    minibatch = synthetic_rollout(LENGTHS, generator)
    objective = rloo.RLOOObjective(Config(), pad_token_id=2)
    with torch.no_grad():
        current = (token_logps(policy, minibatch.samples, 2, minibatch.width, "cpu") * minibatch.mask).sum(1)
    # old log-probs near the current ones, some ratios past the clip range
    # one sample the reward could not judge (None): the loss's mean, and each micro-batch's weight, leave it out
    minibatch.extras.update(advantages=torch.randn(8, generator=generator),
                            old_sequence_logps=current + 0.3 * torch.randn(8, generator=generator),
                            trained=torch.arange(8) != 5)
    assert_same_step(objective, policy, minibatch, 3)


def test_ppo_loss_in_micro_batches_has_the_whole_minibatchs_gradient(policy):
    """PPO's losses are means over the minibatch's tokens: micro-batches of uneven token counts weigh their share."""
    model, minibatch = ppo_model_and_minibatch(policy)
    assert_same_step(ppo.PPOObjective(Config()), model, minibatch, 3)


def ppo_model_and_minibatch(policy) -> tuple[ppo.PolicyAndValue, Rollout]:
    """`policy` with a tiny critic, and a minibatch of `LENGTHS` with log pi_old, values, advantages and returns
    around the model's own."""
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    critic = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=policy.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=2))
    model = ppo.PolicyAndValue(policy, critic, 2).train()
    minibatch = synthetic_rollout(LENGTHS, generator)
    mask = minibatch.mask
    with torch.no_grad():
        current, values = model(minibatch.samples, minibatch.width)
    minibatch.logps = (current + 0.2 * torch.randn(mask.shape, generator=generator)) * mask
    minibatch.extras.update(values=(values + 0.3 * torch.randn(mask.shape, generator=generator)) * mask,
                            advantages=torch.randn(mask.shape, generator=generator) * mask,
                            returns=torch.randn(mask.shape, generator=generator) * mask)
    minibatch.judged = torch.arange(8) != 2  # a sample the reward could not judge: its tokens are in no mean
    return model, minibatch


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo,hinge"])
def test_online_dpo_loss_in_micro_batches_has_the_whole_minibatchs_gradient(policy, loss_type):
    """A mean over the decided pairs (a tie counts in neither); micro-batches keep whole pairs."""
    generator = torch.Generator().manual_seed(2)
    config = Config()
    config.loss.loss_type = loss_type
    if "," in loss_type:  # a weighted sum of two losses; beta 1: IPO's target margin 1 / (2 beta) = 0.5
        config.loss.loss_weights, config.loss.beta = "1.0,0.5", 1.0
    objective = OnlineDPOObjective(config, loss_params(config.loss), pad_token_id=2)
    minibatch = synthetic_rollout(LENGTHS, generator)
    minibatch.scores = torch.tensor([1.0, 0.0, 0.5, 0.5, -1.0, 2.0, 0.3, 0.1])  # the second pair is a tie
    objective.score(None, minibatch)
    assert [len(part.samples) for part in micro_batches(objective, minibatch, 3)] == [2, 2, 2, 2]  # whole pairs
    assert_same_step(objective, policy, minibatch, 4)


@pytest.mark.parametrize("loss_type", ["aot", "sigmoid,sft"])
def test_a_loss_that_couples_the_pairs_runs_the_minibatch_whole(loss_type):
    """AOT sorts the batch's margins; sft averages the NLL over all the batch's chosen tokens."""
    config = Config()
    config.loss.loss_type = loss_type
    objective = OnlineDPOObjective(config, loss_params(config.loss))
    minibatch = synthetic_rollout(LENGTHS, torch.Generator().manual_seed(3))
    assert [len(part.samples) for part in micro_batches(objective, minibatch, 2)] == [8]


def test_local_rollout_forward_batch_size_below_1_exits_2_before_loading(tmp_path, capsys):
    from preftune.cli import main

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    code = main(["rloo", "--model", str(tmp_path / "absent"), "--prompts", str(prompts), "--output-dir",
                 str(tmp_path / "out"), "--local-rollout-forward-batch-size", "0"])
    assert code == 2
    assert "--local-rollout-forward-batch-size must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()



FREED_MEMORY_PROBE = """
import sys, torch
from preftune.runtime.memory import release_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

large = torch.ones(4 << 20)  # 16 MiB: its own mmap; freed, glibc's threshold rises to its size (at most 32 MiB)
del large
blocks = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MiB from the heap
kept = torch.ones(1 << 10)  # above them in the heap: they are not at its top, which glibc trims by itself
before = rss_mb()
del blocks
freed = rss_mb()
if sys.argv[1] == "release":
    assert release_freed_memory()
print(before - freed, before - rss_mb())
"""


@pytest.mark.skipif(glibc() is None, reason="glibc's allocator only")
def test_release_freed_memory_gives_the_heaps_free_blocks_back(monkeypatch):
    """256 MiB of tensors freed inside glibc's heap stay resident; `release_freed_memory` gives them back. (In a
    process of its own: the heap is the process's.)"""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    result = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE, "release"],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    on_free, after = (float(n) for n in result.stdout.split())
    assert on_free < 32  # freeing alone gives (almost) nothing back
    assert after > 200


def test_each_loss_term_starts_after_the_freed_memory_is_released(policy, monkeypatch):
    """`accumulate_gradients` releases the C heap's free blocks before each loss term's forward (PPO: two terms per
    micro-batch)."""
    from preftune.recipes.online import optimisation

    calls = []
    monkeypatch.setattr(optimisation, "release_freed_memory", lambda: calls.append("released"))
    model, minibatch = ppo_model_and_minibatch(policy)
    objective = ppo.PPOObjective(Config())
    accumulate_gradients(objective, model, minibatch, 3, OneProcess())
    # each micro-batch: before the policy's term, before the critic's, and after its backward
    assert len(calls) == 3 * len(micro_batches(objective, minibatch, 3)) > 3
