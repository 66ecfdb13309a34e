"""Online DPO's loss against TRL 1.16's experimental OnlineDPOTrainer, on TRL's own completions: two TRL steps (each
samples 2 completions for each of 4 prompts from a tiny random policy, scores them, and takes a DPO step against a
*different* tiny random reference), recomputed with preftune's functions from the same token ids and weights. To 1e-5:

- which sample of each prompt is chosen (`online_dpo.ranked_pairs` on the scores);
- each step's loss (`OnlineDPOObjective.loss`: sigmoid, beta 0.1) on the weights TRL computed it with, and its
  gradient with respect to every weight (after TRL's backward, before the optimizer step). The second step runs
  on weights after one update, on new samples.

Test devices, none of which changes what is compared (as in test_rloo_trl.py): the reference is passed to TRL
explicitly; every STOP_EVERY-th token id is declared an EOS so that completions end at varied lengths; the prompts
have equal token lengths (TRL left-pads prompts without position ids). The reward breaks ties by the characters'
codes: TRL has no notion of a tie (it takes the first sample as chosen), preftune leaves ties out of the loss.
Only the sigmoid loss is compared: TRL's online IPO is not length-normalised, preftune's (and TRL DPOTrainer's) is.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import trl  # noqa: F401 - a hard test dependency (the dev extra)
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.config import Config, loss_params
from preftune.forward.rollout import Sample, completion_mask, token_logps
from preftune.recipes.online import Rollout
from preftune.recipes.online_dpo import OnlineDPOObjective, pair_logps, ranked_pairs
from tests.conftest import assert_step_equals

PROMPTS = ["The movie was", "The cast was", "My verdict is", "The plot was"]  # 3 tokens each (SmolLM2 tokenizer)
BETA = 0.1
MAX_COMPLETION = 5
STOP_EVERY = 5
LEARNING_RATE = 3e-2
TOL = {"atol": 1e-5, "rtol": 0.0}


def reward(prompts, completions, **kwargs) -> list[float]:
    """A deterministic score of the completion's text; the character codes make ties unlikely."""
    return [0.1 * len(text) + 0.5 * text.count(" ") + 1e-4 * sum(map(ord, text)) for text in completions]


class Capture:
    """TRL's generations (prompt ids, completion ids, completion mask), and each training step's starting weights,
    loss and gradients."""

    def __init__(self, trainer, monkeypatch: pytest.MonkeyPatch):
        self.generations: list[tuple[torch.Tensor, ...]] = []
        self.steps: list[tuple[dict[str, torch.Tensor], float, dict[str, torch.Tensor]]] = []
        generate, training_step = trainer._generate, trainer.training_step

        def generate_spy(*args, **kwargs):
            output = generate(*args, **kwargs)
            self.generations.append(tuple(t.detach().clone() for t in output[:4]))
            return output

        def training_step_spy(model, inputs, num_items_in_batch=None):
            weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
            loss = training_step(model, inputs, num_items_in_batch)
            grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
            self.steps.append((weights, loss.item(), grads))
            return loss

        monkeypatch.setattr(trainer, "_generate", generate_spy)
        monkeypatch.setattr(trainer, "training_step", training_step_spy)


def run_trl(policy_dir, reference_dir, output_dir, monkeypatch) -> tuple[Capture, object]:
    from datasets import Dataset, disable_progress_bars
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning: the trainer is experimental in TRL 1.16
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(17, model.config.vocab_size, STOP_EVERY)]
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = OnlineDPOConfig(output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, max_steps=2,
                               per_device_train_batch_size=len(PROMPTS), gradient_accumulation_steps=1,
                               max_new_tokens=MAX_COMPLETION, beta=[BETA], loss_type="sigmoid",
                               learning_rate=LEARNING_RATE, lr_scheduler_type="constant", logging_steps=1,
                               save_strategy="no", disable_tqdm=True, seed=7)
        trainer = OnlineDPOTrainer(model=model, ref_model=reference, reward_funcs=reward, args=args,
                                   train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                                   processing_class=tokenizer)
        capture = Capture(trainer, monkeypatch)
        trainer.train()
    return capture, tokenizer


def as_rollout(generation, tokenizer, reference) -> Rollout:
    """TRL's batch (all prompts' first samples, then all second samples) as a preftune rollout, prompt by prompt."""
    prompt_ids, prompt_mask, completion_ids, trl_mask = generation
    assert prompt_mask.all(), "prompts of equal length: no left padding"
    count = len(PROMPTS)
    samples = []
    for prompt in range(count):
        for row in (prompt, prompt + count):  # rows 2i, 2i + 1: prompt i's two samples
            kept = completion_ids[row][trl_mask[row].bool()]
            samples.append(Sample(prompt, prompt_ids[row].tolist(), kept.tolist(),
                                  tokenizer.decode(kept, skip_special_tokens=True)))
    width = trl_mask.shape[1]
    mask = completion_mask(samples, width)
    assert mask.sum() == trl_mask.sum()
    with torch.no_grad():
        ref_logps = token_logps(reference, samples, tokenizer.pad_token_id, width, "cpu")
    scores = torch.tensor(reward(None, [s.text for s in samples]))
    return Rollout(samples, mask, torch.zeros_like(ref_logps), ref_logps, scores, scores.clone())


def test_online_dpo_equals_trls_online_dpo_trainer(tmp_path, monkeypatch, tiny_model_dir, tiny_ref_dir):
    capture, tokenizer = run_trl(tiny_model_dir, tiny_ref_dir, tmp_path / "trl", monkeypatch)
    assert len(capture.generations) == 2 and len(capture.steps) == 2

    config = Config()
    config.loss.beta = BETA
    objective = OnlineDPOObjective(config, loss_params(config.loss), pad_token_id=tokenizer.pad_token_id)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_ref_dir)
    losses = []
    for step, (generation, (weights, trl_loss, trl_grads)) in enumerate(zip(capture.generations, capture.steps), 1):
        rollout = as_rollout(generation, tokenizer, reference)
        lengths = rollout.mask.sum(1)
        assert lengths.min() < lengths.max() <= MAX_COMPLETION  # varied lengths: the padding takes part
        metrics = objective.score(SimpleNamespace(), rollout)
        assert metrics["objective/tie_rate"] == 0  # every pair decided, as TRL assumes
        first_is_chosen, decided = ranked_pairs(rollout.scores)
        assert decided.all() and 0 < first_is_chosen.sum() < len(PROMPTS)  # both orders occur

        loss, _ = assert_step_equals(objective, policy, weights, rollout, trl_loss, trl_grads, step)
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) > 1e-3  # the steps differ: not a comparison of constants


def test_pairs_are_ranked_by_score_and_ties_left_out():
    """Hand-derived: scores of 3 prompts' pairs (0.2, 0.5), (0.9, 0.1), (0.4, 0.4)."""
    first_is_chosen, decided = ranked_pairs(torch.tensor([0.2, 0.5, 0.9, 0.1, 0.4, 0.4]))
    assert first_is_chosen.tolist() == [False, True, True] and decided.tolist() == [True, True, False]
    logps = pair_logps(torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]), torch.tensor([1, 2, 3, 4, 5, 6]),
                       first_is_chosen)
    assert logps.chosen.tolist() == [-2.0, -3.0, -5.0] and logps.rejected.tolist() == [-1.0, -4.0, -6.0]
    assert logps.chosen_tokens.tolist() == [2, 3, 5] and logps.rejected_tokens.tolist() == [1, 4, 6]


def test_a_tied_pair_adds_nothing_to_the_loss(tiny_model_dir):
    """Two prompts, the second pair tied: the loss (and its gradient) is the first pair's alone, -log sigmoid(beta *
    ((log pi_w - log ref_w) - (log pi_l - log ref_l)))."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = tokenizer("The movie was")["input_ids"]
    completions = [[300, 301], [302], [303, 304, 305], [306]]
    samples = [Sample(i // 2, prompt, ids, "") for i, ids in enumerate(completions)]
    mask = completion_mask(samples, 3)
    ref_logps = -torch.rand(4, 3) * mask
    scores = torch.tensor([0.1, 0.7, 0.3, 0.3])
    rollout = Rollout(samples, mask, torch.zeros(4, 3), ref_logps, scores, scores.clone())
    config = Config()
    objective = OnlineDPOObjective(config, loss_params(config.loss), pad_token_id=tokenizer.pad_token_id)
    assert objective.score(SimpleNamespace(), rollout)["objective/tie_rate"] == 0.5
    loss, metrics = objective.loss(policy, rollout)
    with torch.no_grad():
        logps = (token_logps(policy, samples, tokenizer.pad_token_id, 3, "cpu") * mask).sum(1)
    ratios = logps - (ref_logps * mask).sum(1)
    expected = -torch.nn.functional.logsigmoid(config.loss.beta * (ratios[1] - ratios[0]))  # sample 1 chosen
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(config.loss.beta * (ratios[1] - ratios[0]).item(),
                                                              abs=1e-6)
