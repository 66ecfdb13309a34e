"""DPO and its loss family on preference pairs: `setup` -> `train` -> `save` -> `cleanup`.

`setup` loads the policy and its reference and builds the run (`pairs.PairRun`, with a `DPOObjective`); the loop is
`pairs.train`, which every offline recipe shares: micro-batches -> `DPOObjective.step` (policy and reference
log-probs -> loss) -> backward, `grad_accum` times; clip, step, schedule; log; evaluate; checkpoint. The loop never
learns which batch layout, reference source or engine is in use. `run` does all four; `Hooks` let a caller (the
default job, the frontier) act at evaluations and after saving without reaching into the loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from preftune.config import Config, loss_params
from preftune.data.batching import Batch
from preftune.evaluation.measure import ModelPair, reference_pair
from preftune.evaluation.pairs import evaluate_totals
from preftune.evaluation.report import example_prompts, write_run_report
from preftune.forward.logprobs import sequence_logps
from preftune.forward.reference import (
    ReferenceSource,
    check_syncable,
    precomputed_references,
    reference_source,
    sync_reference_model,
)
from preftune.forward.rewards import RewardFunction
from preftune.models.load import load_policy_and_reference, save_model
from preftune.objectives.losses import LossParams, compute_loss
from preftune.objectives.metrics import METRIC_NAMES, pair_sums
from preftune.recipes import pairs
from preftune.recipes.model_card import write_model_cards
from preftune.recipes.pairs import Hooks, PairRun, cleanup
from preftune.runtime.run_folder import save_config


@dataclass
class Inputs:
    """What the Python API hands over in memory instead of naming it in the config (None: the config's)."""

    model: torch.nn.Module | None = None  # an already loaded transformers causal LM (trained in place, as TRL)
    ref_model: torch.nn.Module | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    train_data: Any = None  # datasets.Dataset / DatasetDict, list of dicts, pandas.DataFrame
    eval_data: Any = None


@dataclass
class DPOObjective:
    """DPO's part of a run: the loss, where reference log-probs come from, and the models for samples."""

    loss_params: LossParams
    reference: ReferenceSource  # reference log-probs of a training batch
    eval_reference: ReferenceSource | None
    models: ModelPair  # the unwrapped policy and its reference as models (samples, reports, TR-DPO)
    report_prompts: list[tuple[str, list[int]]]  # shown with samples in report.md
    ground_truth: RewardFunction | None = None  # shown beside the implicit reward in report.md, if any
    layout: str = "packed"  # --batch-layout
    metric_names: tuple[str, ...] = METRIC_NAMES
    command: str = "train"

    def step(self, policy: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        params = self.loss_params
        policy_logps = sequence_logps(policy, batch, params.length_split, params.use_weighting)
        output = compute_loss(policy_logps, self.reference(batch), params)
        return output.losses.mean(), pair_sums(output, policy_logps)  # one device sync per micro-batch

    def evaluate(self, run: PairRun) -> dict[str, float]:
        """Each process scores its share with the unwrapped model (no DDP collective)."""
        share, lockstep = pairs.evaluation_share(run)
        with run.group.accelerator.autocast():
            totals = evaluate_totals(self.models.policy, self.eval_reference, share,
                                     batch_size=run.config.train.eval_batch_size,
                                     pad_token_id=run.tokenizer.pad_token_id, params=self.loss_params,
                                     device=run.group.device, layout=run.config.train.batch_layout, lockstep=lockstep)
        totals = run.group.reduce(totals)
        return {**totals.means(), "num_pairs": totals.num_pairs}


def setup(config: Config, inputs: Inputs | None = None, ground_truth: RewardFunction | None = None) -> PairRun:
    """Check, load and build everything the loop needs; a bad file or option stops before the models load."""
    c, inputs = config, inputs or Inputs()
    opened = pairs.open_run(c, inputs.train_data, inputs.eval_data)
    group = opened.group
    if any(pair.margin is not None for pair in opened.train_data.pairs):
        group.print("note: the pairs' 'margin' field is read by `preftune reward-model`; DPO's losses do not use it")
    params = loss_params(c.loss)
    precompute = c.train.precompute_ref_log_probs
    policy, reference, tokenizer, model_source = load_policy_and_reference(
        c.model, need_reference=not (params.reference_free or precompute), model=inputs.model,
        ref_model=inputs.ref_model, tokenizer=inputs.tokenizer,
    )
    train_pairs, eval_pairs = pairs.tokenize_data(opened, tokenizer)
    batches_per_epoch, total_steps = pairs.steps_of(opened, len(train_pairs))
    policy, optimizer, scheduler = pairs.prepare_training(opened, policy, total_steps)
    unwrapped = group.unwrap(policy)
    if reference is not None:
        reference = group.place_frozen(reference)
    if c.train.sync_ref_model:
        check_syncable(unwrapped, reference)
    if precompute:  # before the checkpoint is restored: the reference is the starting policy
        train_reference, eval_reference = precomputed_references(
            group, c.model, unwrapped, [(train_pairs, "training"), (eval_pairs, "evaluation")],
            batch_size=c.train.eval_batch_size, pad_token_id=tokenizer.pad_token_id,
            length_split=params.length_split, layout=c.train.batch_layout)
    else:
        train_reference = eval_reference = reference_source(unwrapped, reference, params.length_split,
                                                            params.reference_free)
    objective = DPOObjective(
        params, train_reference, eval_reference, reference_pair(unwrapped, reference, c.model, group.place_frozen),
        # the first distinct prompts of the held-out (else training) data
        example_prompts(opened.eval_data or opened.train_data, tokenizer), ground_truth, c.train.batch_layout)
    return pairs.start(opened, tokenizer=tokenizer, model_source=model_source, model=policy, optimizer=optimizer,
                       scheduler=scheduler, objective=objective, train_pairs=train_pairs, eval_pairs=eval_pairs,
                       batches_per_epoch=batches_per_epoch, total_steps=total_steps)


def train(run: PairRun, hooks: Hooks | None = None) -> None:
    """The shared loop, with TR-DPO's reference updates (--sync-ref-model) after the steps they are due."""
    t, models = run.config.train, run.objective.models

    def sync_reference(run: PairRun) -> None:  # as TRL's SyncRefModelCallback
        if run.state.step % t.ref_model_sync_steps == 0:
            sync_reference_model(models.policy, models.reference, t.ref_model_mixup_alpha)

    pairs.train(run, hooks, after_step=sync_reference if t.sync_ref_model else None)


def save(run: PairRun, hooks: Hooks | None = None) -> None:
    """The trained model (a plain transformers folder, or the LoRA adapter), the resolved config, the final
    evaluation, the model card (README.md) and report.md."""
    group, objective = run.group, run.objective
    state_dict = pairs.gathered_state_dict(run)
    if group.is_main:
        save_model(objective.models.policy, run.tokenizer, run.folder, merge=run.config.model.merge,
                   state_dict=state_dict)
        save_config(run.config, run.folder)
        if run.final_eval is not None:
            (run.folder / "eval_results.json").write_text(json.dumps(run.final_eval, indent=2) + "\n")
        write_model_cards(run, "dpo", objective.models.policy, merge=run.config.model.merge)
        print(f"saved the trained model to {run.folder}", flush=True)
    del state_dict
    if group.is_main or group.sharded:  # sampling from sharded models: every process generates
        write_run_report(run.folder, run.config, objective.models, run.tokenizer, objective.report_prompts,
                         objective.ground_truth, main_process=group.is_main, autocast=group.accelerator.autocast)
    group.wait()
    if hooks is not None and hooks.on_save is not None:
        hooks.on_save(run)


@dataclass
class TrainResult:
    output_dir: Path
    final_eval: dict[str, float] | None  # held-out metrics at the end, when there were held-out pairs
    model: torch.nn.Module  # the trained policy (unwrapped; with LoRA, the peft model)
    tokenizer: PreTrainedTokenizerBase


def run(config: Config, inputs: Inputs | None = None, hooks: Hooks | None = None,
        ground_truth: RewardFunction | None = None) -> TrainResult:
    """setup -> train -> save, with cleanup whatever happens."""
    dpo_run = setup(config, inputs, ground_truth)
    try:
        train(dpo_run, hooks)
        save(dpo_run, hooks)
    finally:
        cleanup(dpo_run)
    return TrainResult(dpo_run.folder, dpo_run.final_eval, dpo_run.objective.models.policy, dpo_run.tokenizer)
