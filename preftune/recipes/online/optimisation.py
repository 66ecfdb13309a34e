"""The optimisation of one rollout: its minibatches (num_ppo_epochs passes, each reshuffled into
num_mini_batches), each in micro-batches whose gradients add up to the whole minibatch's, an optimizer step per
minibatch, and the skip of a step with a non-finite loss or gradient."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from preftune.config import resolved_num_ppo_epochs
from preftune.recipes.online.schedule import rollout_seed
from preftune.recipes.online.state import OnlineObjective, OnlineRun, Rollout
from preftune.runtime.memory import release_freed_memory
from preftune.runtime.processes import full_value


def micro_batches(objective: OnlineObjective, minibatch: Rollout, size: int) -> list[Rollout]:
    """The minibatch as micro-batches of at most `size` rows (whole units of the objective's `minibatch_unit`, at
    least one unit), or whole where it fits or the objective's loss couples its rows. Split, its rows are first
    put in prompt order (stable: a unit stays whole), so that a prompt's samples share a micro-batch and its
    prompt is computed once (--batch-layout shared_prefix, packed), as in the rollout: the tokens per micro-batch,
    and so its memory, do not grow with the shuffled minibatch's prompts. The order of a mean's terms is all it
    changes."""
    rows, unit = len(minibatch.samples), objective.minibatch_unit
    step = max(unit, size // unit * unit) if objective.splits_minibatch else rows
    if step >= rows:
        return [minibatch]
    order = torch.tensor(sorted(range(rows), key=lambda row: minibatch.samples[row].prompt_index))
    return [minibatch.rows(order[start : start + step]) for start in range(0, rows, step)]


def accumulate_gradients(objective: OnlineObjective, model: torch.nn.Module, minibatch: Rollout, size: int,
                         accelerator: Any, on_policy: bool = False) -> tuple[float, dict[str, float]]:
    """Forward and backward of one minibatch in micro-batches of at most `size` samples, gradients accumulated:
    the loss is a mean over the minibatch's count n (samples, tokens or pairs: `objective.loss_count`), and
    mean = sum_i (n_i / n) mean_i over micro-batches i, so each micro-batch's loss is weighted by n_i / n and the
    accumulated gradient is the whole minibatch's. The processes' gradients are averaged (DDP) once, at the last
    micro-batch. A micro-batch's loss comes in the objective's `loss_terms`, each term's backward taken before the
    next term is computed (PPO: the policy's activations are freed before the critic's forward). `on_policy`: the
    objective's (log pi_old = the current log-prob, detached, row by row). Returns (the minibatch's loss, its
    metrics: the same weighted sums)."""
    parts = micro_batches(objective, minibatch, size)
    counts = [float(objective.loss_count(part)) for part in parts]
    total = sum(counts)
    loss_value, metrics = 0.0, {}
    for i, (part, count) in enumerate(zip(parts, counts)):
        share = count / total if total > 0 else 1.0 / len(parts)  # nothing counted (all ties): every part's is 0
        with contextlib.ExitStack() as stack:
            if i < len(parts) - 1:
                stack.enter_context(accelerator.no_sync(model))
            part_loss, part_metrics = backward_terms(objective, model, part, share, accelerator, on_policy)
        loss_value += share * part_loss
        for name, value in part_metrics.items():
            metrics[name] = metrics.get(name, 0.0) + share * value
    return loss_value, metrics


def backward_terms(objective: OnlineObjective, model: torch.nn.Module, part: Rollout, share: float,
                   accelerator: Any, on_policy: bool) -> tuple[float, dict[str, float]]:
    """The backward of `share` x each of the objective's `loss_terms` of a micro-batch, one term at a time: a term's
    forward runs (under autocast) only after the previous term's backward has freed its activations, and after the
    C heap has given back what was freed before it (`release_freed_memory`, also after the last backward: else glibc
    keeps it resident, and the peak RSS is the memory in use plus the leftovers). Returns (the micro-batch's loss, the
    sum of its terms; its metrics, each term's own)."""
    terms = objective.loss_terms(model, part, on_policy=on_policy)
    loss_value, metrics = 0.0, {}
    while True:
        release_freed_memory()
        with accelerator.autocast():
            term = next(terms, None)
        if term is None:
            return loss_value, metrics
        loss, values = term
        accelerator.backward(loss * share)  # one part: share 1.0, the loss unchanged
        loss_value += loss.item()
        metrics.update({name: float(value) for name, value in values.items()})


def minibatch_rows(run: OnlineRun, num_rows: int) -> Iterator[torch.Tensor]:
    """The rollout rows of each optimizer step, in order: num_ppo_epochs passes, each over the rows reshuffled
    (seeded by step) into num_mini_batches minibatches; the objective's `minibatch_unit` rows stay together."""
    order = torch.Generator().manual_seed(rollout_seed(run))
    unit = run.objective.minibatch_unit
    for _ in range(resolved_num_ppo_epochs(run.config, run.objective.command)):
        for units in torch.randperm(num_rows // unit, generator=order).chunk(run.config.rl.num_mini_batches):
            yield (units[:, None] * unit + torch.arange(unit)).flatten()


def optimise(run: OnlineRun, rollout: Rollout) -> tuple[dict[str, float], float, bool]:
    """An optimizer step on each minibatch of the rollout (`minibatch_rows`). Until the first step is taken the
    minibatches are on-policy (TRL's log pi_old: the current log-prob, detached). A step with a non-finite loss or
    gradient is skipped and counted in `state.bad_steps_in_row`; at --max-bad-steps in a row the rollout's
    remaining minibatches are left (train then stops). Returns (the minibatches' mean metrics, the last gradient
    norm, whether any step was skipped)."""
    accelerator, model, state = run.group.accelerator, run.model, run.state
    totals: dict[str, float] = {}
    count, skipped, stepped, grad_norm = 0, False, False, float("nan")
    max_norm = run.config.train.max_grad_norm if run.config.train.max_grad_norm > 0 else float("inf")
    for index in minibatch_rows(run, len(rollout.samples)):
        loss, metrics = accumulate_gradients(run.objective, model, rollout.rows(index),
                                             run.config.rl.local_rollout_forward_batch_size, accelerator,
                                             on_policy=not stepped)
        grad_norm = float(full_value(accelerator.clip_grad_norm_(run.trainable, max_norm)))
        if math.isfinite(grad_norm) and math.isfinite(loss):
            run.optimizer.step()
            stepped, state.bad_steps_in_row = True, 0
        else:
            skipped, state.bad_steps_in_row = True, state.bad_steps_in_row + 1
        run.optimizer.zero_grad(set_to_none=True)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        count += 1
        if state.bad_steps_in_row >= run.config.train.max_bad_steps:
            break
    return {name: value / count for name, value in totals.items()}, grad_norm, skipped
