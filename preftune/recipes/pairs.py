"""The loop every offline recipe on preference pairs shares (DPO and its losses, the reward model).

A recipe plugs an `Objective` into it: what one micro-batch of pairs costs (`step`: the loss to back-propagate and
the per-pair metric sums to log) and what the held-out pairs score (`evaluate`). Everything else is here, once:
opening the run (data, process group, run folder, resume checks), the optimizer and schedule, the micro-batch
stream that resumes mid-epoch, gradient accumulation, clipping, skipping non-finite steps, logging, evaluation
cadence, checkpoints and stopping on signals.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from preftune.config import Config
from preftune.data.batching import LAYOUTS, Batch, process_batches
from preftune.data.read import LoadResult, load_and_report
from preftune.data.tokenize import TokenizedPair, tokenize_for
from preftune.errors import UserError
from preftune.objectives.metrics import MetricTotals
from preftune.runtime.accelerator import weights_held
from preftune.runtime.checkpoint import restore_run_checkpoint, write_run_checkpoint
from preftune.runtime.logging import MetricLogger, tracker_names
from preftune.runtime.processes import ProcessGroup, full_value
from preftune.runtime.run_folder import CONFIG_FILE
from preftune.runtime.session import Session, evaluation_interval, open_session
from preftune.runtime.session import prepare_training as prepare
from preftune.runtime.signals import interruption, stop_on_signals


class Objective(Protocol):
    """What a recipe contributes to the loop."""

    metric_names: tuple[str, ...]  # the order of the logged training metrics
    command: str  # the CLI command that runs the recipe (for the resume hint)
    layout: str  # the batch layout of its training micro-batches (batching.LAYOUTS)

    def step(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(mean loss over the micro-batch's pairs, with gradients; per-pair sums of every metric, "loss" first)."""

    def evaluate(self, run: PairRun) -> dict[str, float]:
        """Held-out metrics (pair-weighted means over every process's share, and num_pairs)."""


@dataclass
class Hooks:
    """Called by the loop: after each evaluation (with its results), and after the run is saved."""

    on_evaluate: Callable[[Any, dict[str, float]], None] | None = None
    on_save: Callable[[Any], None] | None = None


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
class Opened:
    """A run before its models: the data (checked first: a bad file stops before minutes of loading), the process
    group, the run folder and the checkpoint to resume from."""

    config: Config
    group: ProcessGroup
    folder: Path
    resume_from: Path | None
    train_data: LoadResult
    eval_data: LoadResult | None
    session: Session


def open_run(config: Config, train_data: Any = None, eval_data: Any = None) -> Opened:
    """Load the pairs (`train_data` / `eval_data`: in-memory records, else the config's files), then open the run
    (runtime.session: process group, run folder, resume checks, the resolved config saved)."""
    c = config
    tracker_names(c.train.report_to)  # an unknown or missing tracker stops before the data is read
    train = load_and_report(train_data if train_data is not None else c.data.data, split=c.data.split,
                            skip_invalid=c.data.skip_invalid, name="train_data")
    eval_source = eval_data if eval_data is not None else c.data.eval_data
    held_out = (load_and_report(eval_source, split=c.data.eval_split, skip_invalid=c.data.skip_invalid,
                                name="eval_data") if eval_source is not None else None)
    session = open_session(c)
    return Opened(c, session.group, session.folder, session.resume_from, train, held_out, session)


def tokenize_data(opened: Opened, tokenizer: PreTrainedTokenizerBase) -> tuple[list[TokenizedPair],
                                                                               list[TokenizedPair]]:
    d = opened.config.data
    train = tokenize_for(opened.train_data.pairs, tokenizer, d.max_length or None, d.truncation_mode, "training")
    held_out = (tokenize_for(opened.eval_data.pairs, tokenizer, d.max_length or None, d.truncation_mode,
                             "evaluation") if opened.eval_data else [])
    return train, held_out


@dataclass
class PairRun:
    """Everything one run on pairs holds, complete once its recipe's setup returns it."""

    config: Config
    group: ProcessGroup
    folder: Path
    tokenizer: PreTrainedTokenizerBase
    model_source: str  # where the trained model came from, for messages
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped or FSDP-sharded)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    # the optimizer's parameters: FSDP2 swaps in sharded ones at prepare, and a forward without backward (the
    # precomputed reference) leaves its root's parameters unsharded, so model.parameters() is then the wrong list
    trainable: list[torch.nn.Parameter]
    objective: Any  # the recipe's Objective, with whatever else the recipe holds (models, reference, ...)
    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    train_locations: list[str]  # "source location" of each training pair, for messages
    batches_per_epoch: int
    total_steps: int
    eval_every: int  # optimizer steps between evaluations; 0: only at the end
    logger: MetricLogger
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


def steps_of(opened: Opened, num_pairs: int) -> tuple[int, int]:
    """(micro-batches per epoch for this process, optimizer steps of the run)."""
    c = opened.config
    batches_per_epoch = len(process_batches(num_pairs, c.train.batch_size, opened.group.world_size, opened.group.rank,
                                            c.train.shuffle, c.train.seed, 0))
    if batches_per_epoch == 0:
        raise UserError(f"{num_pairs} training pairs cannot give each of {opened.group.world_size} processes a pair")
    return batches_per_epoch, count_steps(batches_per_epoch, c.train.grad_accum, c.train.num_epochs,
                                          c.train.max_steps)


def prepare_training(opened: Opened, model: torch.nn.Module, total_steps: int) -> tuple[torch.nn.Module, Any, Any]:
    return prepare(opened.session, model, total_steps)


def start(opened: Opened, *, tokenizer: PreTrainedTokenizerBase, model_source: str, model: torch.nn.Module,
          optimizer: torch.optim.Optimizer, scheduler: Any, objective: Any, train_pairs: list[TokenizedPair],
          eval_pairs: list[TokenizedPair], batches_per_epoch: int, total_steps: int) -> PairRun:
    """The run, restored from its checkpoint when resuming (after everything that reads the starting weights)."""
    c, group = opened.config, opened.group
    state = LoopState(world_size=group.world_size, sharded=group.sharded)
    if opened.resume_from is not None:
        state = LoopState(**restore_run_checkpoint(group, opened.resume_from, opened.folder, model, optimizer,
                                                   scheduler))
    run = PairRun(
        config=c, group=group, folder=opened.folder, tokenizer=tokenizer, model_source=model_source, model=model,
        optimizer=optimizer, scheduler=scheduler,
        trainable=[p for param_group in optimizer.param_groups for p in param_group["params"]],
        objective=objective, train_pairs=train_pairs, eval_pairs=eval_pairs,
        train_locations=[f"{p.source} {p.location}" for p in opened.train_data.pairs],
        batches_per_epoch=batches_per_epoch, total_steps=total_steps,
        eval_every=evaluation_interval(c.train.eval_steps, total_steps),
        logger=opened.session.logger(state.step),
        state=state,
    )
    announce(run)
    return run


def announce(run: PairRun) -> None:
    c, group = run.config.train, run.group
    if group.sharded:
        held, total = weights_held(run.model)  # after a precomputing forward that left the root's weights gathered
        group.print(f"FSDP: each process holds a slice of the weights ({held:,} of {total:,} on the main one), and "
                    "of their gradients and optimizer state")
    processes = f" in each of {group.world_size} processes" if group.world_size > 1 else ""
    group.print(f"training {run.model_source} on {len(run.train_pairs)} pairs for {run.total_steps} steps "
                f"({c.batch_size} pairs x {c.grad_accum} micro-batches per step{processes}); run folder {run.folder}")


# ---- the loop ----------------------------------------------------------------------------------------------------
def micro_batches(run: PairRun) -> Iterator[Batch]:
    """Micro-batches forever, epoch after epoch, reshuffled per epoch; resumes at `micro_batches_seen`."""
    collate = LAYOUTS[run.objective.layout]
    while True:
        epoch, offset = divmod(run.state.micro_batches_seen, run.batches_per_epoch)
        for positions in run.epoch_batches(epoch)[offset:]:
            run.state.micro_batches_seen += 1
            yield collate([run.train_pairs[i] for i in positions], run.tokenizer.pad_token_id).to(run.group.device)


def train(run: PairRun, hooks: Hooks | None = None, after_step: Callable[[PairRun], None] | None = None) -> None:
    """Optimizer steps until `total_steps`, then a final evaluation (kept in `run.final_eval`). `after_step`: a
    recipe's own work after each optimizer step (TR-DPO's reference update)."""
    c, state = run.config.train, run.state
    accelerator, model, objective = run.group.accelerator, run.model, run.objective
    stream = micro_batches(run)
    interval = MetricTotals.from_dict(state.interval)
    progress = tqdm(total=run.total_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not run.group.is_main)
    model.train()
    with stop_on_signals() as signal_received:
        while state.step < run.total_steps:
            step_totals, bad_pairs = MetricTotals(), []
            for micro in range(c.grad_accum):
                batch = next(stream)
                # gradients are averaged across processes once per step, on the last micro-batch
                syncing = micro == c.grad_accum - 1
                with contextlib.nullcontext() if syncing else accelerator.no_sync(model), accelerator.autocast():
                    loss, sums = objective.step(model, batch)
                    # divided by grad_accum in accelerator.backward: the gradient is the mean over micro-batches
                    accelerator.backward(loss)
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
            if after_step is not None:
                after_step(run)

            if state.step % c.logging_steps == 0 or state.step == run.total_steps:
                logged = run.group.reduce(interval)
                if logged.num_pairs:  # none when every step since the last log was skipped
                    means = logged.means(objective.metric_names)
                    run.log({**means, "learning_rate": learning_rate, "grad_norm": grad_norm})
                    progress.set_postfix(loss=f"{means['loss']:.4f}")
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
                raise interruption(state.step, run.total_steps, path, objective.command, run.folder / CONFIG_FILE,
                                   signal_received())
    progress.close()
    if run.eval_pairs:
        # the periodic evaluation may just have run at the last step: reuse it rather than log it twice
        just_evaluated = run.eval_every and state.step % run.eval_every == 0
        run.final_eval = run.last_eval if just_evaluated else evaluate(run, hooks)


def pairs_of_step(run: PairRun) -> list[int]:
    """Indices of this process's pairs in the micro-batches of the step just run (for messages)."""
    indices = []
    seen = run.state.micro_batches_seen
    for position in range(seen - run.config.train.grad_accum, seen):
        epoch, offset = divmod(position, run.batches_per_epoch)
        indices += run.epoch_batches(epoch)[offset]
    return [run.train_pairs[i].index for i in indices]


def skip_step(run: PairRun, pair_indices: list[int], what: str) -> None:
    """Leave the weights as they are for this step, and say which pairs were involved."""
    run.state.bad_steps_in_row += 1
    indices = sorted(set(pair_indices))
    places = ", ".join(run.train_locations[i] for i in indices)
    warnings.warn(f"step {run.state.step + 1}: non-finite {what}; step skipped (pairs: {places})", RuntimeWarning,
                  stacklevel=2)
    run.log({"skipped": f"non-finite {what}", "pair_indices": indices}, step=run.state.step + 1)


def evaluate(run: PairRun, hooks: Hooks | None = None) -> dict[str, float]:
    """The objective's held-out metrics, logged as eval_*."""
    results = run.objective.evaluate(run)
    run.log({f"eval_{name}": value for name, value in results.items()})
    run.last_eval = results
    if hooks is not None and hooks.on_evaluate is not None:
        hooks.on_evaluate(run, results)
    return results


def evaluation_share(run: PairRun) -> tuple[list[TokenizedPair], tuple[int, TokenizedPair] | None]:
    """This process's share of the held-out pairs, and under FSDP (every forward a collective) the lockstep
    (batches every process runs, a filler pair) of `evaluation.evaluate_totals`."""
    group, batch_size = run.group, run.config.train.eval_batch_size
    largest_share = math.ceil(len(run.eval_pairs) / group.world_size)
    lockstep = (math.ceil(largest_share / batch_size), run.eval_pairs[0]) if group.sharded else None
    return run.eval_pairs[group.rank :: group.world_size], lockstep


def save_checkpoint(run: PairRun) -> Path:
    config_yaml = yaml.safe_dump(run.config.to_dict(), sort_keys=False)
    return write_run_checkpoint(run.group, run.folder, run.state.step, run.model, run.optimizer, run.scheduler,
                                asdict(run.state), config_yaml, keep=run.config.train.save_total_limit or None)


def gathered_state_dict(run: PairRun) -> dict[str, torch.Tensor] | None:
    """Under FSDP the whole weights, gathered onto the main process (every process takes part); else None."""
    return run.group.accelerator.get_state_dict(run.model) if run.group.sharded else None


def cleanup(run: PairRun) -> None:
    run.logger.close()
