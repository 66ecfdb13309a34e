"""RLOO's math against TRL 1.16's RLOOTrainer, on TRL's own completions: one TRL rollout (3 prompts x 4 samples from
a tiny random policy, a *different* tiny random reference, beta = 0.05) and two optimizer steps on it
(num_iterations=2), recomputed with preftune's functions from the same token ids and the same weights. To 1e-5:

- per-token log-probs of the completions under the policy (TRL's `old_logps`) and under the reference;
- the rewards after the KL penalty, score - beta * sum_t (log pi_old - log pi_ref) (`rloo.sequence_rewards`);
- the leave-one-out advantages, with and without `normalize_advantages` (`RLOOObjective.score`);
- the loss of each of the two steps (`RLOOObjective.loss`, PPO's clipped surrogate on sequence log-probs) and its
  gradient with respect to every weight (TRL's, after its backward and before clipping and the optimizer step).
  The first step runs on the sampling weights: the ratios are 1 and the loss is -mean A, which is 0 by
  construction (the leave-one-out advantages of a prompt sum to 0), so there the gradient carries the comparison.
  The second runs on the weights after one update, where the ratios move past the clip range: the clipping is
  compared too.

Test devices, none of which changes what is compared:
- The reference. TRL builds its reference from `model.config._name_or_path`; pointing that at the reference folder
  makes TRL load it from there (else the reference would be the starting policy, and every KL term 0).
- Stop tokens. A random policy over 49k tokens would sample the EOS almost never, so every completion would fill
  max_completion_length. Declaring every STOP_EVERY-th token id an EOS as well (the model's generation config may
  list several) ends completions at varied lengths, so TRL's padding and completion mask take part.
- Prompts of equal token length: TRL left-pads prompts without position ids, preftune right-pads whole rows; with
  no prompt padding both score the same positions.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import trl  # noqa: F401 - a hard test dependency (the dev extra): without it these oracle tests fail, not skip
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.config import Config
from preftune.recipes.online import Rollout
from preftune.recipes.rloo import RLOOObjective, sequence_rewards
from preftune.rollout import Sample, completion_mask, token_logps
from tests.conftest import assert_step_equals

PROMPTS = ["The movie was", "The cast was", "My verdict is"]  # 3 tokens each with the SmolLM2 tokenizer
K = 4  # num_generations
BETA = 0.05
MAX_COMPLETION = 5  # summed log-probs stay under 64 nats (5 x ~10.8), where float32's spacing is 3.8e-6
STOP_EVERY = 5
LEARNING_RATE = 3e-2
TOL = {"atol": 1e-5, "rtol": 0.0}


def reward(prompts, completions, **kwargs) -> list[float]:
    """A deterministic score of the completion's text: its length in characters and its spaces."""
    return [0.1 * len(text) + 0.5 * text.count(" ") for text in completions]


class Capture:
    """What TRL computes on the trainer instance, recorded as it runs: the generation batch, the per-token log-probs
    computed while generating (policy, then reference), the rewards after the KL penalty, each loss with the
    weights it was computed on, and each step's gradients."""

    def __init__(self, trainer, monkeypatch: pytest.MonkeyPatch):
        from trl.trainer import rloo_trainer

        self.generations: list[dict] = []
        self.token_logps: list[tuple[bool, torch.Tensor]] = []  # (is the reference, per-token log-probs)
        self.rewards: list[torch.Tensor] = []
        self.losses: list[tuple[dict[str, torch.Tensor], dict, float]] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss
        training_step = trainer.training_step
        per_token = trainer._get_per_token_logps_and_entropies
        generating = [False]

        def generate_spy(inputs):
            generating[0] = True
            try:
                output = generate(inputs)
            finally:
                generating[0] = False
            self.generations.append({k: v.detach().clone() for k, v in output.items()})
            return output

        def per_token_spy(model, *args, **kwargs):
            result = per_token(model, *args, **kwargs)
            if generating[0]:
                self.token_logps.append((model is trainer.ref_model, result[0].detach().clone()))
            return result

        def compute_loss_spy(model, inputs):
            weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
            loss = compute_loss(model, inputs)
            self.losses.append((weights, {k: v.detach().clone() for k, v in inputs.items()}, loss.item()))
            return loss

        def training_step_spy(model, inputs, num_items_in_batch=None):
            # the step's forward and backward: the gradients before clipping and the optimizer step
            output = training_step(model, inputs, num_items_in_batch)
            self.grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()
                               if p.grad is not None})
            return output

        original_nanstd = rloo_trainer.nanstd

        def nanstd_spy(tensor, *args, **kwargs):
            # the one call with dim=1 is std_rewards = nanstd(grouped_rewards, dim=1): the rewards after the penalty
            if kwargs.get("dim") == 1:
                self.rewards.append(tensor.detach().clone().view(-1))
            return original_nanstd(tensor, *args, **kwargs)

        monkeypatch.setattr(trainer, "_generate_and_score_completions", generate_spy)
        monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", per_token_spy)
        monkeypatch.setattr(trainer, "_compute_loss", compute_loss_spy)
        monkeypatch.setattr(trainer, "training_step", training_step_spy)
        monkeypatch.setattr(rloo_trainer, "nanstd", nanstd_spy)


def run_trl(policy_dir, reference_dir, output_dir, normalize: bool, monkeypatch) -> tuple[Capture, object]:
    from datasets import Dataset, disable_progress_bars
    from trl import RLOOConfig, RLOOTrainer

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(17, model.config.vocab_size, STOP_EVERY)]
    model.config._name_or_path = str(reference_dir)  # where TRL loads its reference from
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = RLOOConfig(output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, max_steps=2,
                          per_device_train_batch_size=len(PROMPTS) * K, gradient_accumulation_steps=1,
                          steps_per_generation=1, num_iterations=2, num_generations=K,
                          max_completion_length=MAX_COMPLETION, beta=BETA, epsilon=0.2,
                          normalize_advantages=normalize, learning_rate=LEARNING_RATE,
                          lr_scheduler_type="constant", logging_steps=1, save_strategy="no", disable_tqdm=True,
                          seed=7)
        trainer = RLOOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                              processing_class=tokenizer)
        reference = AutoModelForCausalLM.from_pretrained(reference_dir)
        assert torch.equal(trainer.ref_model.get_input_embeddings().weight, reference.get_input_embeddings().weight)
        capture = Capture(trainer, monkeypatch)
        trainer.train()
    return capture, tokenizer


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_rloo_equals_trls_rloo_trainer(tmp_path, monkeypatch, tiny_model_dir, tiny_ref_dir, normalize):
    capture, tokenizer = run_trl(tiny_model_dir, tiny_ref_dir, tmp_path / "trl", normalize, monkeypatch)
    assert len(capture.generations) == 1 and len(capture.losses) == 2 and len(capture.rewards) == 1
    assert [is_ref for is_ref, _ in capture.token_logps] == [False, True]
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
    assert lengths.min() < lengths.max() <= MAX_COMPLETION  # varied lengths: the padding takes part

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_ref_dir)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        logps = token_logps(policy, samples, pad, width, "cpu")
        ref_logps = token_logps(reference, samples, pad, width, "cpu")
    trl_logps, trl_ref_logps = capture.token_logps[0][1], capture.token_logps[1][1]
    torch.testing.assert_close(logps[mask], trl_logps[mask], **TOL)
    torch.testing.assert_close(ref_logps[mask], trl_ref_logps[mask], **TOL)
    torch.testing.assert_close((logps * mask).sum(1), generation["old_logps"], **TOL)

    scores = torch.tensor(reward(None, [s.text for s in samples]))
    rollout = Rollout(samples, mask, logps, ref_logps, scores, scores.clone())
    rewards = sequence_rewards(rollout, BETA)
    torch.testing.assert_close(rewards, capture.rewards[0], **TOL)
    kl = ((logps - ref_logps) * mask).sum(1)
    assert kl.abs().min() > 1e-3  # the penalty is not of zeros: the reference differs from the policy

    config = Config()
    config.rl.num_generations, config.rl.kl_coef, config.rl.cliprange = K, BETA, 0.2
    config.rl.normalize_advantages = normalize
    objective = RLOOObjective(config, pad_token_id=pad)
    one_process = SimpleNamespace(accelerator=SimpleNamespace(reduce=lambda tensor, reduction: tensor))
    objective.score(SimpleNamespace(state=SimpleNamespace(kl_coef=BETA), group=one_process), rollout)
    advantages = rollout.extras["advantages"]
    torch.testing.assert_close(advantages, generation["advantages"], **TOL)
    if normalize:
        assert advantages.mean().abs() < 1e-5 and advantages.std() == pytest.approx(1.0, abs=1e-3)

    # each step's loss, on the weights TRL computed it with; the batch is the whole rollout (TRL shuffles its rows,
    # and the loss is their mean)
    def rows(batch):
        return sorted((p.tolist(), c[m.bool()].tolist()) for p, c, m in zip(
            batch["prompt_ids"], batch["completion_ids"], batch["completion_mask"]))

    assert len(capture.grads) == 2
    clipfracs = []
    for step, ((weights, inputs, trl_loss), trl_grads) in enumerate(zip(capture.losses, capture.grads), start=1):
        assert rows(inputs) == rows(generation)
        _, metrics = assert_step_equals(objective, policy, weights, rollout, trl_loss, trl_grads, step)
        clipfracs.append(metrics["policy/clipfrac"].item())
    assert clipfracs[0] == 0 and 0 < clipfracs[1] < 1  # the second step's ratios are partly clipped
    assert abs(capture.losses[1][2] - capture.losses[0][2]) > 1e-3  # the steps differ: not a comparison of constants
