"""A Bradley-Terry reward model on preference pairs (`preftune reward-model`): setup -> train -> save -> cleanup.

r(x, y) is one output of a sequence-classification head over the base model, read at the sequence's last token
that is not padding (transformers' AutoModelForSequenceClassification, as TRL's RewardTrainer). Each pair's loss is

    -log sigmoid(r(x, y_w) - r(x, y_l) - m) + c * (r(x, y_w) + r(x, y_l))^2

(the Bradley-Terry likelihood of the preference, Ouyang et al. 2022, arXiv:2203.02155, eq. 1; m = the pair's
optional "margin" field, Touvron et al. 2023, arXiv:2307.09288, eq. 2; c = --center-rewards-coefficient, Eisenstein
et al. 2023, arXiv:2312.09244, eq. 2), whose mean over a batch is TRL 1.16 RewardTrainer's loss. The loop is
`pairs.train`, shared with DPO. The result is a plain transformers
sequence-classification folder (a LoRA adapter is merged into it), which `--reward FOLDER` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preftune.config import Config
from preftune.data.batching import Batch
from preftune.data.read import LoadResult
from preftune.errors import UserError
from preftune.evaluation.pairs import batch_totals
from preftune.models.load import load_reward_base, save_model
from preftune.recipes import pairs
from preftune.recipes.model_card import write_model_cards
from preftune.recipes.pairs import Hooks, PairRun, cleanup
from preftune.runtime.run_folder import save_config

REWARD_METRICS = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")


def bradley_terry_losses(
    chosen: torch.Tensor, rejected: torch.Tensor, center_rewards_coefficient: float | None = None,
    margins: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss -log sigmoid(r_w - r_l - m) (+ c (r_w + r_l)^2): Ouyang et al. 2022, arXiv:2203.02155, eq. 1;
    the margin m of Touvron et al. 2023 (Llama 2, arXiv:2307.09288, eq. 2); Eisenstein et al. 2023's centering term
    (arXiv:2312.09244, eq. 2). Shapes: (B,), (B,), (B,) -> (B,)."""
    difference = chosen - rejected if margins is None else chosen - rejected - margins
    losses = -F.logsigmoid(difference)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def sequence_rewards(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y_w), r(x, y_l) of a padded batch (chosen rows first), each (B,), as float32."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    chosen, rejected = logits.squeeze(-1).float().chunk(2)
    return chosen, rejected


def reward_sums(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Per-pair sums of REWARD_METRICS (one device sync)."""
    stacked = torch.stack([losses.detach().sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum(),
                           chosen.sum(), rejected.sum()]).detach()
    return dict(zip(REWARD_METRICS, stacked.tolist()))


def margins_of(data: LoadResult | None) -> list[float] | None:
    """Each loaded pair's "margin" field, indexed as the loaded pairs; None when no pair has one. Some pairs with
    a margin and some without is an error (TRL needs the column on every pair too)."""
    if data is None or all(pair.margin is None for pair in data.pairs):
        return None
    missing = [pair for pair in data.pairs if pair.margin is None]
    if missing:
        raise UserError(f"{missing[0].source} {missing[0].location}: no 'margin', while other pairs have one; give "
                        f"every pair a margin (0 for none) or none ({len(missing)} of {len(data.pairs)} lack it)")
    return [pair.margin for pair in data.pairs]


@dataclass
class RewardObjective:
    center_rewards_coefficient: float | None
    train_margins: list[float] | None = None  # per loaded training pair, from the data's "margin" field
    eval_margins: list[float] | None = None
    metric_names: tuple[str, ...] = REWARD_METRICS
    command: str = "reward-model"
    layout: str = "padded"  # the head reads each row's last token: one sequence per row

    def losses(self, model: torch.nn.Module, batch: Batch, margins: list[float] | None) -> tuple[torch.Tensor, ...]:
        """(per-pair losses, r(x, y_w), r(x, y_l)) of a batch."""
        chosen, rejected = sequence_rewards(model, batch)
        batch_margins = None if margins is None else chosen.new_tensor([margins[i] for i in batch.pair_indices])
        return bradley_terry_losses(chosen, rejected, self.center_rewards_coefficient, batch_margins), chosen, rejected

    def step(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        losses, chosen, rejected = self.losses(model, batch, self.train_margins)
        return losses.mean(), reward_sums(losses, chosen, rejected)

    def evaluate(self, run: PairRun) -> dict[str, float]:
        """Held-out loss, accuracy (with its standard error) and rewards, over every process's share."""
        share, lockstep = pairs.evaluation_share(run)
        model = run.group.unwrap(run.model)

        def score(batch: Batch) -> dict[str, float]:
            return reward_sums(*self.losses(model, batch, self.eval_margins))

        with run.group.accelerator.autocast():
            totals = batch_totals(model, share, score, batch_size=run.config.train.eval_batch_size,
                                  pad_token_id=run.tokenizer.pad_token_id, device=run.group.device, lockstep=lockstep)
        totals = run.group.reduce(totals)
        results = {**totals.means(REWARD_METRICS), "num_pairs": totals.num_pairs}
        accuracy, n = results["accuracy"], max(totals.num_pairs, 1)
        results["accuracy_stderr"] = math.sqrt(accuracy * (1 - accuracy) / n)  # a binomial proportion's
        return results


def setup(config: Config, train_data=None, eval_data=None, model=None, tokenizer=None) -> PairRun:
    """Check, load and build the run; a bad file or option stops before the model loads."""
    c = config
    opened = pairs.open_run(c, train_data, eval_data)
    objective = RewardObjective(c.reward_model.center_rewards_coefficient, margins_of(opened.train_data),
                                margins_of(opened.eval_data))
    if opened.group.sharded and c.model.lora:  # saving merges the adapter into whole weights read back from disk
        raise UserError("preftune reward-model: --lora under FSDP is not supported; use data parallelism")
    reward_model, tokenizer, source = load_reward_base(c.model, model, tokenizer)
    train_pairs, eval_pairs = pairs.tokenize_data(opened, tokenizer)
    batches_per_epoch, total_steps = pairs.steps_of(opened, len(train_pairs))
    prepared, optimizer, scheduler = pairs.prepare_training(opened, reward_model, total_steps)
    return pairs.start(opened, tokenizer=tokenizer, model_source=source, model=prepared, optimizer=optimizer,
                       scheduler=scheduler, objective=objective,
                       train_pairs=train_pairs, eval_pairs=eval_pairs, batches_per_epoch=batches_per_epoch,
                       total_steps=total_steps)


def save(run: PairRun, hooks: Hooks | None = None) -> None:
    """The reward model as a plain sequence-classification folder (LoRA: merged, the adapter in adapter/), the
    resolved config, the final evaluation and the model card (README.md)."""
    group = run.group
    state_dict = pairs.gathered_state_dict(run)
    if group.is_main:
        save_model(group.unwrap(run.model), run.tokenizer, run.folder, merge=True, state_dict=state_dict)
        save_config(run.config, run.folder)
        if run.final_eval is not None:
            (run.folder / "eval_results.json").write_text(json.dumps(run.final_eval, indent=2) + "\n")
        write_model_cards(run, "reward-model", group.unwrap(run.model), merge=True)
        print(f"saved the reward model to {run.folder}", flush=True)
    group.wait()
    if hooks is not None and hooks.on_save is not None:
        hooks.on_save(run)


def run(config: Config, hooks: Hooks | None = None, **inputs) -> PairRun:
    """setup -> train -> save, with cleanup whatever happens. Returns the finished run."""
    reward_run = setup(config, **inputs)
    try:
        pairs.train(reward_run, hooks)
        save(reward_run, hooks)
    finally:
        cleanup(reward_run)
    return reward_run
