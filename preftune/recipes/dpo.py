"""DPO and its loss family on preference pairs: `setup` -> `train` -> `save` -> `cleanup`.

`setup` builds the whole run context (`DPORun`) and returns it; `train` is the loop, top to bottom: micro-batches
-> policy and reference log-probs -> loss -> backward, `grad_accum` times; clip, step, schedule; log; evaluate;
checkpoint. Everything it calls is a function of another module (log-probs, losses, metrics, the runtime), so the
loop never learns which batch layout, reference source or engine is in use. `run` does all four; `Hooks` let a
caller (the default job, the frontier) act at evaluations and after saving without reaching into the loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from preftune.batching import LAYOUTS, Batch, process_batches
from preftune.config import Config, loss_params
from preftune.data import load_and_report
from preftune.errors import RunInterrupted, UserError
from preftune.evaluation import evaluate_totals
from preftune.logprobs import sequence_logps
from preftune.losses import LossParams, compute_loss
from preftune.measure import ModelPair, reference_pair
from preftune.metrics import MetricTotals, pair_sums
from preftune.models import load_policy_and_reference, save_model
from preftune.reference import (
    ReferenceSource,
    check_syncable,
    precomputed_references,
    reference_source,
    sync_reference_model,
)
from preftune.report import example_prompts, write_run_report
from preftune.rewards import RewardFunction
from preftune.runtime.accelerator import make_accelerator, reshard
from preftune.runtime.checkpoint import find_checkpoint, restore_run_checkpoint, write_run_checkpoint
from preftune.runtime.logging import MetricLogger
from preftune.runtime.processes import ProcessGroup, full_value
from preftune.runtime.run_folder import CONFIG_FILE, check_resumable, prepare_output_dir, save_config
from preftune.runtime.signals import stop_on_signals
from preftune.tokenize import TokenizedPair, tokenize_for


@dataclass
class Inputs:
    """What the Python API hands over in memory instead of naming it in the config (None: the config's)."""

    model: torch.nn.Module | None = None  # an already loaded transformers causal LM (trained in place, as TRL)
    ref_model: torch.nn.Module | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    train_data: Any = None  # datasets.Dataset / DatasetDict, list of dicts, pandas.DataFrame
    eval_data: Any = None


@dataclass
class Hooks:
    """Called by the loop: after each evaluation (with its results), and after the model and report are saved."""

    on_evaluate: Callable[[DPORun, dict[str, float]], None] | None = None
    on_save: Callable[[DPORun], None] | None = None


@dataclass
class LoopState:
    """What the loop advances, and all a checkpoint needs to continue it exactly."""

    step: int = 0
    micro_batches_seen: int = 0
    bad_steps_in_row: int = 0
    world_size: int = 1  # processes; a checkpoint resumes only under the same number
    sharded: bool = False  # written under FSDP (optimizer state keyed by name); resumes only under FSDP
    interval: dict = field(default_factory=lambda: MetricTotals().to_dict())  # metrics since the last log line


@dataclass
class DPORun:
    """Everything one run holds, complete once `setup` returns it."""

    config: Config
    group: ProcessGroup
    folder: Path
    tokenizer: PreTrainedTokenizerBase
    model_source: str  # where the policy came from, for messages
    policy: torch.nn.Module  # as prepared by accelerate (DDP-wrapped or FSDP-sharded)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[torch.nn.Parameter]  # read after prepare: FSDP replaces the parameters with sharded ones
    models: ModelPair  # the unwrapped policy and its reference as models (for samples, reports, TR-DPO)
    reference: ReferenceSource  # reference log-probs of a training batch
    eval_reference: ReferenceSource | None
    loss_params: LossParams
    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    train_locations: list[str]  # "source location" of each training pair, for messages
    report_prompts: list[tuple[str, list[int]]]  # shown with samples in report.md
    batches_per_epoch: int
    total_steps: int
    eval_every: int  # optimizer steps between evaluations; 0: only at the end
    logger: MetricLogger
    ground_truth: RewardFunction | None = None  # shown beside the implicit reward in report.md, if any
    state: LoopState = field(default_factory=LoopState)
    last_eval: dict[str, float] | None = None
    final_eval: dict[str, float] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of one epoch, as positions in `train_pairs`."""
        t = self.config.train
        return process_batches(len(self.train_pairs), t.batch_size, self.group.world_size, self.group.rank,
                               t.shuffle, t.seed, epoch)

    def log(self, values: dict, step: int | None = None) -> None:
        self.logger.log(values, self.state.step if step is None else step,
                        self.state.micro_batches_seen / self.batches_per_epoch)


def count_steps(batches_per_epoch: int, grad_accum: int, num_epochs: float, max_steps: int) -> int:
    """Optimizer steps of the run: --max-steps, else num_epochs passes of grad_accum micro-batches each."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(num_epochs * batches_per_epoch / grad_accum))


def evaluation_interval(eval_steps: float, total_steps: int) -> int:
    """--eval-steps as optimizer steps: a whole number as it is, a fraction in (0, 1) of the run's steps (TRL)."""
    if 0 < eval_steps < 1:
        return max(1, math.ceil(round(eval_steps * total_steps, 6)))
    return int(eval_steps)


# ---- setup -------------------------------------------------------------------------------------------------------
def setup(config: Config, inputs: Inputs | None = None, ground_truth: RewardFunction | None = None) -> DPORun:
    """Check, load and build everything the loop needs; a bad file or option stops here, before the models load
    where it can."""
    c, inputs = config, inputs or Inputs()
    train_data = load_and_report(inputs.train_data if inputs.train_data is not None else c.data.data,
                                 split=c.data.split, skip_invalid=c.data.skip_invalid, name="train_data")
    eval_source = inputs.eval_data if inputs.eval_data is not None else c.data.eval_data
    eval_data = (load_and_report(eval_source, split=c.data.eval_split, skip_invalid=c.data.skip_invalid,
                                 name="eval_data") if eval_source is not None else None)
    group = ProcessGroup.of(make_accelerator(c.model.bf16, c.train.grad_accum))
    if group.sharded and c.model.load_in_4bit:  # FSDP over bitsandbytes' packed weights needs its own storage
        raise UserError("--load-in-4bit under FSDP is not supported: use QLoRA with data parallelism "
                        "(configs/accelerate/ddp.yaml), or LoRA under FSDP")
    # the main process checks and creates the run folder; the others take its path (the default name has the
    # time in it, which could differ between processes)
    folder = None
    if group.is_main:
        folder = str(prepare_output_dir(c.train.output_dir, c.train.overwrite, bool(c.train.resume)))
    folder = Path(group.broadcast(folder))
    c.train.output_dir = str(folder)
    resume_from = find_checkpoint(c.train.resume, folder) if c.train.resume else None
    if resume_from is not None:
        check_resumable(resume_from, c)
    if group.is_main:
        save_config(c, folder)
    set_seed(c.train.seed)

    params = loss_params(c.loss)
    precompute = c.train.precompute_ref_log_probs
    policy, reference, tokenizer, model_source = load_policy_and_reference(
        c.model, need_reference=not (params.reference_free or precompute), model=inputs.model,
        ref_model=inputs.ref_model, tokenizer=inputs.tokenizer,
    )
    d = c.data
    train_pairs = tokenize_for(train_data.pairs, tokenizer, d.max_length or None, d.truncation_mode, "training")
    eval_pairs = (tokenize_for(eval_data.pairs, tokenizer, d.max_length or None, d.truncation_mode, "evaluation")
                  if eval_data else [])
    batches_per_epoch = len(process_batches(len(train_pairs), c.train.batch_size, group.world_size, group.rank,
                                            c.train.shuffle, c.train.seed, 0))
    if batches_per_epoch == 0:
        raise UserError(f"{len(train_pairs)} training pairs cannot give each of {group.world_size} processes a pair")
    total_steps = count_steps(batches_per_epoch, c.train.grad_accum, c.train.num_epochs, c.train.max_steps)

    optimizer, scheduler = make_optimizer(c, policy, total_steps)
    # the scheduler stays out of accelerate's prepare: that wrapper steps it once per process, for loaders it
    # shards itself; our step count is already global
    policy, optimizer = group.accelerator.prepare(policy, optimizer)
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
    state = LoopState(world_size=group.world_size, sharded=group.sharded)
    if resume_from is not None:
        state = LoopState(**restore_run_checkpoint(group, resume_from, folder, policy, optimizer, scheduler))

    run = DPORun(
        config=c, group=group, folder=folder, tokenizer=tokenizer, model_source=model_source, policy=policy,
        optimizer=optimizer, scheduler=scheduler, trainable=[p for p in policy.parameters() if p.requires_grad],
        models=reference_pair(unwrapped, reference, c.model, group.place_frozen), reference=train_reference,
        eval_reference=eval_reference, loss_params=params, train_pairs=train_pairs, eval_pairs=eval_pairs,
        train_locations=[f"{p.source} {p.location}" for p in train_data.pairs],
        # the first distinct prompts of the held-out (else training) data
        report_prompts=example_prompts(eval_data or train_data, tokenizer),
        batches_per_epoch=batches_per_epoch, total_steps=total_steps,
        eval_every=evaluation_interval(c.train.eval_steps, total_steps),
        logger=MetricLogger(folder, state.step, group.is_main), ground_truth=ground_truth, state=state,
    )
    announce(run)
    return run


def make_optimizer(config: Config, policy: torch.nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    t = config.train
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
        # one kernel over all parameters: no whole-model temporaries (the for-each path makes several) and faster;
        # TRL's default (adamw_torch_fused) too
        fused=True,
    )
    scheduler = get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def announce(run: DPORun) -> None:
    c, group = run.config.train, run.group
    if group.sharded:
        reshard(run.policy)  # a precomputing forward may have left the root's weights gathered
        held = sum(p.to_local().numel() for p in run.policy.parameters())
        total = sum(p.numel() for p in run.policy.parameters())
        group.print(f"FSDP: each process holds a slice of the weights ({held:,} of {total:,} on the main one), and "
                    "of their gradients and optimizer state")
    processes = f" in each of {group.world_size} processes" if group.world_size > 1 else ""
    group.print(f"training {run.model_source} on {len(run.train_pairs)} pairs for {run.total_steps} steps "
                f"({c.batch_size} pairs x {c.grad_accum} micro-batches per step{processes}); run folder {run.folder}")


# ---- train -------------------------------------------------------------------------------------------------------
def micro_batches(run: DPORun) -> Iterator[Batch]:
    """Micro-batches forever, epoch after epoch, reshuffled per epoch; resumes at `micro_batches_seen`."""
    collate = LAYOUTS[run.config.train.batch_layout]
    while True:
        epoch, offset = divmod(run.state.micro_batches_seen, run.batches_per_epoch)
        for positions in run.epoch_batches(epoch)[offset:]:
            run.state.micro_batches_seen += 1
            yield collate([run.train_pairs[i] for i in positions], run.tokenizer.pad_token_id).to(run.group.device)


def train(run: DPORun, hooks: Hooks | None = None) -> None:
    """The loop: optimizer steps until `total_steps`, then a final evaluation (kept in `run.final_eval`)."""
    c, state, hooks = run.config.train, run.state, hooks or Hooks()
    accelerator, policy, params = run.group.accelerator, run.policy, run.loss_params
    stream = micro_batches(run)
    interval = MetricTotals.from_dict(state.interval)
    progress = tqdm(total=run.total_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not run.group.is_main)
    policy.train()
    with stop_on_signals() as signal_received:
        while state.step < run.total_steps:
            step_totals, bad_pairs = MetricTotals(), []
            for micro in range(c.grad_accum):
                batch = next(stream)
                # gradients are averaged across processes once per step, on the last micro-batch
                syncing = micro == c.grad_accum - 1
                with contextlib.nullcontext() if syncing else accelerator.no_sync(policy), accelerator.autocast():
                    policy_logps = sequence_logps(policy, batch, params.length_split, params.use_weighting)
                    output = compute_loss(policy_logps, run.reference(batch), params)
                    # divided by grad_accum in accelerator.backward: the gradient is the mean over micro-batches
                    accelerator.backward(output.losses.mean())
                sums = pair_sums(output, policy_logps)  # one device sync per micro-batch, for all metrics
                if not math.isfinite(sums["loss"]):
                    bad_pairs += batch.pair_indices
                step_totals.add(sums, batch.num_pairs)
            max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
            grad_norm = float(full_value(accelerator.clip_grad_norm_(run.trainable, max_norm)))
            learning_rate = run.scheduler.get_last_lr()[0]
            if bad_pairs or not math.isfinite(grad_norm):
                skip_step(run, bad_pairs or pairs_of_step(run), "loss" if bad_pairs else "gradient")
            else:
                run.optimizer.step()
                state.bad_steps_in_row = 0
                interval.merge(step_totals)
            run.scheduler.step()  # also on a skipped step, so the schedule stays aligned with the step count
            run.optimizer.zero_grad(set_to_none=True)
            state.step += 1
            progress.update(1)
            if c.sync_ref_model and state.step % c.ref_model_sync_steps == 0:  # TR-DPO, as TRL's callback
                sync_reference_model(run.models.policy, run.models.reference, c.ref_model_mixup_alpha)

            if state.step % c.logging_steps == 0 or state.step == run.total_steps:
                logged = run.group.reduce(interval)
                if logged.num_pairs:  # none when every step since the last log was skipped
                    means = logged.means()
                    run.log({**means, "learning_rate": learning_rate, "grad_norm": grad_norm})
                    progress.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['rewards/accuracies']:.2f}")
                interval = MetricTotals()
            state.interval = interval.to_dict()
            if run.eval_pairs and run.eval_every and state.step % run.eval_every == 0:
                evaluate(run, hooks)
            if c.save_steps and state.step % c.save_steps == 0:
                save_checkpoint(run)
            if state.bad_steps_in_row >= c.max_bad_steps:
                path = save_checkpoint(run)
                raise UserError(
                    f"stopped at step {state.step}: {state.bad_steps_in_row} steps in a row had a non-finite loss "
                    "or gradient (see the warnings above for the pairs). Lower --learning-rate, check those pairs, "
                    f"or try without --bf16. Checkpoint: {path}"
                )
            if run.group.any_process(signal_received() is not None):
                path = save_checkpoint(run)
                raise RunInterrupted(
                    f"stopped at step {state.step} of {run.total_steps}; checkpoint {path}. Resume with:\n"
                    f"  preftune train --config {run.folder / CONFIG_FILE} --resume",
                    signal_received() or signal.SIGTERM,
                )
    progress.close()
    if run.eval_pairs:
        # the periodic evaluation may just have run at the last step: reuse it rather than log it twice
        just_evaluated = run.eval_every and state.step % run.eval_every == 0
        run.final_eval = run.last_eval if just_evaluated else evaluate(run, hooks)


def pairs_of_step(run: DPORun) -> list[int]:
    """Indices of this process's pairs in the micro-batches of the step just run (for messages)."""
    indices = []
    seen = run.state.micro_batches_seen
    for position in range(seen - run.config.train.grad_accum, seen):
        epoch, offset = divmod(position, run.batches_per_epoch)
        indices += run.epoch_batches(epoch)[offset]
    return [run.train_pairs[i].index for i in indices]


def skip_step(run: DPORun, pair_indices: list[int], what: str) -> None:
    """Leave the weights as they are for this step, and say which pairs were involved."""
    run.state.bad_steps_in_row += 1
    indices = sorted(set(pair_indices))
    places = ", ".join(run.train_locations[i] for i in indices)
    warnings.warn(f"step {run.state.step + 1}: non-finite {what}; step skipped (pairs: {places})", RuntimeWarning,
                  stacklevel=2)
    run.log({"skipped": f"non-finite {what}", "pair_indices": indices}, step=run.state.step + 1)


def evaluate(run: DPORun, hooks: Hooks | None = None) -> dict[str, float]:
    """The preference metrics on the held-out pairs, logged as eval_*; each process scores its share with the
    unwrapped model (no DDP collective). Under FSDP every forward is a collective, so each process runs as many
    batches as the largest share needs."""
    group, batch_size = run.group, run.config.train.eval_batch_size
    largest_share = math.ceil(len(run.eval_pairs) / group.world_size)
    with group.accelerator.autocast():
        totals = evaluate_totals(
            run.models.policy, run.eval_reference, run.eval_pairs[group.rank :: group.world_size],
            batch_size=batch_size, pad_token_id=run.tokenizer.pad_token_id, params=run.loss_params,
            device=group.device, layout=run.config.train.batch_layout,
            lockstep=(math.ceil(largest_share / batch_size), run.eval_pairs[0]) if group.sharded else None,
        )
    totals = group.reduce(totals)
    results = {**totals.means(), "num_pairs": totals.num_pairs}
    run.log({f"eval_{name}": value for name, value in results.items()})
    run.last_eval = results
    if hooks is not None and hooks.on_evaluate is not None:
        hooks.on_evaluate(run, results)
    return results


def save_checkpoint(run: DPORun) -> Path:
    config_yaml = yaml.safe_dump(run.config.to_dict(), sort_keys=False)
    return write_run_checkpoint(run.group, run.folder, run.state.step, run.policy, run.optimizer, run.scheduler,
                                asdict(run.state), config_yaml, keep=run.config.train.save_total_limit or None)


# ---- save / cleanup ----------------------------------------------------------------------------------------------
def save(run: DPORun, hooks: Hooks | None = None) -> None:
    """The trained model (a plain transformers folder, or the LoRA adapter), the resolved config, the final
    evaluation and report.md."""
    group = run.group
    # FSDP: the whole weights, gathered onto the main process (every process takes part)
    state_dict = group.accelerator.get_state_dict(run.policy) if group.sharded else None
    if group.is_main:
        save_model(run.models.policy, run.tokenizer, run.folder, merge=run.config.model.merge, state_dict=state_dict)
        save_config(run.config, run.folder)
        if run.final_eval is not None:
            (run.folder / "eval_results.json").write_text(json.dumps(run.final_eval, indent=2) + "\n")
        print(f"saved the trained model to {run.folder}", flush=True)
    del state_dict
    if group.is_main or group.sharded:  # sampling from sharded models: every process generates
        write_run_report(run.folder, run.config, run.models, run.tokenizer, run.report_prompts, run.ground_truth,
                         main_process=group.is_main, autocast=group.accelerator.autocast)
    group.wait()
    if hooks is not None and hooks.on_save is not None:
        hooks.on_save(run)


def cleanup(run: DPORun) -> None:
    run.logger.close()


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
    return TrainResult(dpo_run.folder, dpo_run.final_eval, dpo_run.models.policy, dpo_run.tokenizer)
