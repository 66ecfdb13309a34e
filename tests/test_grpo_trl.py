"""GRPO's math against TRL 1.16's GRPOTrainer, on TRL's own completions: one TRL rollout (3 prompts x 4 samples from
a tiny random policy, a *different* tiny random reference) and two optimizer steps on it (num_iterations=2),
recomputed with preftune's functions from the same token ids and the same weights, for every loss type preftune
offers and both importance-sampling levels. To 1e-5:

- per-token log-probs of the completions under the policy (TRL's `old_per_token_logps`) and the reference;
- the group advantages (`GRPOObjective.score`), with --scale-rewards group (the default) and batch;
- the loss of each of the two steps (`GRPOObjective.loss`) and its gradient with respect to every weight (TRL's,
  after its backward, before clipping and the optimizer step). The first step runs on the sampling weights (the
  weights are 1); the second on the weights after one update, where they move past the clip range, so the clip
  (with clip-higher, epsilon_high 0.28) takes part;
- TRL's logged entropy, kl and clip ratios of each step.

As tests/test_rloo_trl.py: TRL's reference is loaded from `model.config._name_or_path`, pointed at the reference
folder; every STOP_EVERY-th token id is declared an EOS too, so completions end at varied lengths; prompts of equal
token length (TRL left-pads them). fp32, bf16=False, gradient_checkpointing=False, temperature 1 (TRL's default,
the only one preftune's online loop samples at: TRL scales the logits by 1 / temperature before the log-softmax).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import trl  # noqa: F401 - a hard test dependency (the dev extra): without it these oracle tests fail, not skip
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.config import Config, apply_command_defaults
from preftune.forward.rollout import Sample, completion_mask, token_logps
from preftune.objectives.group_relative import GRPO_LOSSES
from preftune.recipes.grpo import GRPOObjective
from preftune.recipes.online import Rollout
from tests.conftest import assert_step_equals

PROMPTS = ["The movie was", "The cast was", "My verdict is"]  # 3 tokens each with the SmolLM2 tokenizer
K = 4  # num_generations
BETA = 0.04
MAX_COMPLETION = 5
STOP_EVERY = 5
LEARNING_RATE = 3e-2
TOL = {"atol": 1e-5, "rtol": 0.0}


def reward(prompts, completions, **kwargs) -> list[float]:
    """A deterministic score of the completion's text: its length in characters and its spaces."""
    return [0.1 * len(text) + 0.5 * text.count(" ") for text in completions]


class Capture:
    """What TRL computes, recorded as it runs: the generation batch, the per-token log-probs computed while
    generating (policy, then reference), each loss with the weights it was computed on, each step's gradients."""

    def __init__(self, trainer, monkeypatch: pytest.MonkeyPatch):
        self.generations: list[dict] = []
        self.token_logps: list[tuple[bool, torch.Tensor]] = []
        self.losses: list[tuple[dict[str, torch.Tensor], dict, float]] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss
        training_step, per_token = trainer.training_step, trainer._get_per_token_logps_and_entropies
        generating = [False]

        def generate_spy(inputs):
            generating[0] = True
            try:
                output = generate(inputs)
            finally:
                generating[0] = False
            self.generations.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in output.items()})
            return output

        def per_token_spy(model, *args, **kwargs):
            result = per_token(model, *args, **kwargs)
            if generating[0]:
                self.token_logps.append((model is trainer.ref_model, result[0].detach().clone()))
            return result

        def compute_loss_spy(model, inputs):
            weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
            loss = compute_loss(model, inputs)
            self.losses.append((weights, {k: v.detach().clone() if torch.is_tensor(v) else v
                                          for k, v in inputs.items()}, loss.item()))
            return loss

        def training_step_spy(model, inputs, num_items_in_batch=None):
            output = training_step(model, inputs, num_items_in_batch)
            self.grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()
                               if p.grad is not None})
            return output

        monkeypatch.setattr(trainer, "_generate_and_score_completions", generate_spy)
        monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", per_token_spy)
        monkeypatch.setattr(trainer, "_compute_loss", compute_loss_spy)
        monkeypatch.setattr(trainer, "training_step", training_step_spy)


def run_trl(policy_dir, reference_dir, output_dir, options: dict, monkeypatch) -> tuple[Capture, object, object]:
    from datasets import Dataset, disable_progress_bars
    from trl import GRPOConfig, GRPOTrainer

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(17, model.config.vocab_size, STOP_EVERY)]
    model.config._name_or_path = str(reference_dir)  # where TRL loads its reference from
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GRPOConfig(output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, max_steps=2,
                          per_device_train_batch_size=len(PROMPTS) * K, gradient_accumulation_steps=1,
                          steps_per_generation=1, num_iterations=2, num_generations=K,
                          max_completion_length=MAX_COMPLETION, epsilon=0.2, epsilon_high=0.28,
                          learning_rate=LEARNING_RATE, lr_scheduler_type="constant", logging_steps=1,
                          save_strategy="no", disable_tqdm=True, seed=7, gradient_checkpointing=False,
                          temperature=1.0, **options)
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                              processing_class=tokenizer)
        if options.get("beta", 0.0) != 0.0:
            reference = AutoModelForCausalLM.from_pretrained(reference_dir)
            assert torch.equal(trainer.ref_model.get_input_embeddings().weight,
                               reference.get_input_embeddings().weight)
        else:
            assert trainer.ref_model is None  # TRL holds no reference with beta 0
        capture = Capture(trainer, monkeypatch)
        trainer.train()
    return capture, tokenizer, trainer


CASES = [
    *[(loss_type, level, {}) for loss_type in GRPO_LOSSES for level in ("token", "sequence")],
    ("dapo", "token", {"beta": BETA}),
    ("grpo", "sequence", {"beta": BETA, "scale_rewards": "batch"}),
    ("bnpo", "token", {"scale_rewards": "none", "delta": 1.2}),
    ("dapo", "token", {"top_entropy_quantile": 0.5}),
]


@pytest.mark.parametrize(("loss_type", "level", "options"), CASES,
                         ids=[f"{t}-{lv}" + "".join(f"-{k}={v}" for k, v in o.items()) for t, lv, o in CASES])
def test_grpo_equals_trls_grpo_trainer(tmp_path, monkeypatch, tiny_model_dir, tiny_ref_dir, loss_type, level,
                                       options):
    trl_options = {"loss_type": loss_type, "importance_sampling_level": level, "beta": 0.0, **options}
    capture, tokenizer, trainer = run_trl(tiny_model_dir, tiny_ref_dir, tmp_path / "trl", trl_options, monkeypatch)
    beta = trl_options["beta"]
    assert len(capture.generations) == 1 and len(capture.losses) == 2 and len(capture.grads) == 2
    assert [is_ref for is_ref, _ in capture.token_logps] == [False, *([True] if beta else [])]
    generation = capture.generations[0]
    assert generation["prompt_mask"].all(), "prompts of equal length: no left padding"

    # TRL's completions as preftune samples, grouped by prompt (K consecutive), padding trimmed by TRL's mask
    trl_mask = generation["completion_mask"].bool()
    samples = [Sample(row // K, prompt.tolist(), completion[keep].tolist(),
                      tokenizer.decode(completion[keep], skip_special_tokens=True))
               for row, (prompt, completion, keep) in enumerate(zip(generation["prompt_ids"],
                                                                    generation["completion_ids"], trl_mask))]
    assert all(samples[row].prompt_ids == samples[row - row % K].prompt_ids for row in range(len(samples)))
    width = trl_mask.shape[1]
    mask = completion_mask(samples, width)
    assert torch.equal(mask, trl_mask)
    lengths = mask.sum(1)
    assert lengths.min() < lengths.max() <= MAX_COMPLETION  # varied lengths: the padding and normalisers take part

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        logps = token_logps(policy, samples, pad, width, "cpu")
        ref_logps = None
        if beta:
            ref_logps = token_logps(AutoModelForCausalLM.from_pretrained(tiny_ref_dir), samples, pad, width, "cpu")
    torch.testing.assert_close(logps[mask], capture.token_logps[0][1][mask], **TOL)
    torch.testing.assert_close(logps[mask], generation["old_per_token_logps"][mask], **TOL)
    if beta:
        torch.testing.assert_close(ref_logps[mask], capture.token_logps[1][1][mask], **TOL)
        assert ((logps - ref_logps) * mask).abs().max() > 1e-2  # the KL term is not of zeros

    config = Config()
    apply_command_defaults(config, "grpo")
    config.loss.loss_type, config.loss.beta = loss_type, beta
    r = config.rl
    r.num_generations, r.importance_sampling_level, r.epsilon, r.epsilon_high = K, level, 0.2, 0.28
    r.scale_rewards, r.delta = options.get("scale_rewards", "group"), options.get("delta")
    r.top_entropy_quantile, config.sample.max_new_tokens = options.get("top_entropy_quantile", 1.0), MAX_COMPLETION
    objective = GRPOObjective(config, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    scores = torch.tensor(reward(None, [s.text for s in samples]))
    rollout = Rollout(samples, mask, logps, ref_logps, scores, scores.clone())
    one_process = SimpleNamespace(accelerator=SimpleNamespace(reduce=lambda tensor, reduction: tensor))
    objective.score(SimpleNamespace(group=one_process), rollout)
    torch.testing.assert_close(rollout.extras["advantages"], generation["advantages"], **TOL)
    tokens = rollout.extras["row_tokens"][0].item() * len(samples)  # dapo's normaliser: TRL's num_items_in_batch
    assert tokens == pytest.approx(generation["num_items_in_batch"].item())

    def rows(batch):
        return sorted((p.tolist(), c[m.bool()].tolist()) for p, c, m in zip(
            batch["prompt_ids"], batch["completion_ids"], batch["completion_mask"]))

    logged = [entry for entry in trainer.state.log_history if "entropy" in entry]  # each step's, as TRL logged it
    assert len(logged) == 2
    for step, ((weights, inputs, trl_loss), trl_grads) in enumerate(zip(capture.losses, capture.grads), start=1):
        assert rows(inputs) == rows(generation)  # the whole rollout, in TRL's shuffled order: the loss is a mean
        _, metrics = assert_step_equals(objective, policy, weights, rollout, trl_loss, trl_grads, step)
        for name in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                     "cispo_clip_ratio"):
            if name in metrics:
                assert metrics[name].item() == pytest.approx(logged[step - 1][name], abs=1e-5), (step, name)
    assert abs(capture.losses[1][2] - capture.losses[0][2]) > 1e-4  # the steps differ: not constants compared
    if GRPO_LOSSES[loss_type].clipped:  # the second step's weights pass the clip range
        assert logged[1]["clip_ratio/region_mean"] > 0
