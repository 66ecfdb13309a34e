"""The loop every online recipe shares (PPO, RLOO): prompts -> rollout -> optimise on it -> log, evaluate, save.

A recipe plugs an `OnlineObjective` into it: what it adds to a rollout (`score`: values, advantages) and what one
minibatch of the rollout costs (`loss`). Everything else is here, once: the prompts (a prompts file, the prompts of
preference pairs, or the default job's), the rollout itself (samples from the policy, their log-probs under the
policy and the reference, the reward), the optimisation epochs and minibatches, logging, held-out measurement
(reward and KL with their standard errors, through evaluation/measure.py), checkpoints that resume exactly and signals.
The run folder, process group, trackers, optimizer and checkpoint files are runtime/'s, as for the offline recipes.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from preftune.config import Config, kl_horizon_problem, resolved_num_ppo_epochs
from preftune.data.batching import process_batches
from preftune.data.prompts import Prompt, distinct_prompts, distinct_texts
from preftune.errors import UserError
from preftune.evaluation.measure import ModelPair, measure, paired_gain, summarize
from preftune.forward.rewards import RewardError, RewardFunction
from preftune.forward.rollout import Sample, completion_mask, in_micro_batches, sample, sampled_token_logps, token_logps
from preftune.objectives.policy_gradient import adaptive_kl_coef, masked_mean
from preftune.runtime.accelerator import fsdp_requested, init_sharded_root, weights_held
from preftune.runtime.checkpoint import latest_checkpoint, restore_run_checkpoint, write_run_checkpoint
from preftune.runtime.logging import MetricLogger
from preftune.runtime.processes import ProcessGroup, full_value
from preftune.runtime.run_folder import CONFIG_FILE
from preftune.runtime.session import Session, evaluation_interval
from preftune.runtime.signals import interruption, stop_on_signals
from preftune.tasks.sources import prompt_sources

REPORT_FILE = "rl_report.json"


@dataclass
class Rollout:
    """One rollout batch of this process: `k` samples per prompt, prompt by prompt, and what was measured of them.
    Per-token tensors are (B, T), T = the longest completion; `mask` marks each completion's own tokens."""

    samples: list[Sample]
    mask: torch.Tensor
    logps: torch.Tensor  # log pi_old(y_t), the policy's at sampling time (no gradient)
    ref_logps: torch.Tensor
    scores: torch.Tensor  # (B,) the reward (less the missing-EOS penalty)
    raw_scores: torch.Tensor  # (B,) the reward as the reward function gave it (0 where it could not judge)
    judged: torch.Tensor | None = None  # (B,) bool: the reward judged the sample (unset: all); a sample it could
    # not judge (None) contributes no loss and no reward statistics
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's: values, advantages, returns

    def __post_init__(self) -> None:
        if self.judged is None:
            self.judged = torch.ones_like(self.scores, dtype=torch.bool)

    def rows(self, index: torch.Tensor) -> Rollout:
        picked = [self.samples[i] for i in index.tolist()]
        return Rollout(picked, self.mask[index], self.logps[index], self.ref_logps[index], self.scores[index],
                       self.raw_scores[index], self.judged[index], {k: v[index] for k, v in self.extras.items()})

    @property
    def width(self) -> int:
        return self.mask.shape[1]


class OnlineObjective(Protocol):
    command: str  # the CLI command (for the resume hint)
    metric_names: tuple[str, ...]  # the per-minibatch metrics `loss` returns, averaged per step
    minibatch_unit: int  # consecutive rollout rows a minibatch keeps together (online DPO's pairs: 2)
    # whether a minibatch's loss is the weighted mean of its micro-batches' (False: the loss couples its rows, as a
    # loss that sorts the batch: the minibatch runs as one forward/backward)
    splits_minibatch: bool
    kl_coef: float  # the KL weight the rollout metrics (and PPO's, RLOO's reward) start from

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        """The policy inside the trained module (which may hold a critic beside it)."""

    def score(self, run: OnlineRun, rollout: Rollout) -> dict[str, float]:
        """Add what the loss needs to `rollout.extras` (advantages, ...); returns rollout metrics to log."""

    def loss(self, model: torch.nn.Module, minibatch: Rollout,
             on_policy: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a minibatch (with gradients), and its metrics (detached scalars). `on_policy`: no optimizer
        step since the rollout was sampled, so log pi_old is the current log-prob, detached (the ratio exactly 1)."""

    def loss_count(self, minibatch: Rollout) -> float:
        """What the loss and its metrics are means over, counted in `minibatch` (RLOO: samples; PPO: completion
        tokens; online DPO: decided pairs): a micro-batch weighs count / the minibatch's count."""


@dataclass
class OnlineState:
    """What the loop advances, and all a checkpoint needs to continue it exactly (rollouts are seeded by step)."""

    step: int = 0
    kl_coef: float = 0.0  # the adaptive controller's value (fixed: the configured one)
    bad_steps_in_row: int = 0  # optimizer steps in a row with a non-finite loss or gradient
    world_size: int = 1
    sharded: bool = False


@dataclass
class OnlineRun:
    config: Config
    group: ProcessGroup
    folder: Path
    tokenizer: PreTrainedTokenizerBase
    model_source: str
    model: torch.nn.Module  # prepared by accelerate: the policy, or the policy with its critic
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    objective: Any
    models: ModelPair  # the unwrapped policy and its reference (rollouts, measurement, report)
    reward: RewardFunction  # what the policy is trained to maximise
    reward_name: str
    eval_reward: RewardFunction  # what the held-out measurement reports (the ground truth)
    eval_reward_name: str
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    batches_per_epoch: int
    total_steps: int
    eval_every: int
    logger: MetricLogger
    state: OnlineState
    last_eval: dict[str, float] | None = None
    final_eval: dict[str, float] | None = None

    def log(self, values: dict, step: int | None = None) -> None:
        self.logger.log(values, self.state.step if step is None else step, self.state.step / self.batches_per_epoch)


def count_rollout_steps(config: Config, num_prompts: int, world_size: int) -> tuple[int, int]:
    """(rollouts per epoch, rollout steps of the run). Every rollout is a full one, --rollout-batch-size prompts in
    each of `world_size` processes: the short last one of an epoch is dropped (TRL's drop_last), so every process
    takes the same minibatch steps on the same number of samples. Too few prompts for one rollout: UserError."""
    t, r = config.train, config.rl
    per_epoch = len(epoch_shares(num_prompts, r.rollout_batch_size, world_size, 0, t.shuffle, t.seed, 0))
    if per_epoch == 0:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise UserError(f"{num_prompts} distinct prompts are fewer than one rollout's "
                        f"{r.rollout_batch_size * world_size} ({r.rollout_batch_size} prompts (--rollout-batch-size)"
                        f"{processes}): lower --rollout-batch-size or give more prompts")
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_epochs * per_epoch))
    return per_epoch, total


def epoch_shares(num_prompts: int, rollout_batch_size: int, world_size: int, rank: int, shuffle: bool, seed: int,
                 epoch: int) -> list[list[int]]:
    """This process's prompts (positions) in each full rollout of one epoch: `process_batches` with drop_last."""
    return process_batches(num_prompts, rollout_batch_size, world_size, rank, shuffle, seed, epoch, drop_last=True)


def check_world_size(config: Config, num_prompts: int, world_size: int) -> None:
    """Refuse (UserError) what the real number of processes rules out, before any model loads: fewer prompts than
    one rollout, and a --kl-horizon the adaptive KL controller cannot take (config.validate checks it only for
    --num-processes; an external torchrun or accelerate launch may start more)."""
    count_rollout_steps(config, num_prompts, world_size)
    problem = kl_horizon_problem(config, world_size)
    if problem is not None:
        raise UserError(problem)


def start(session: Session, *, tokenizer: PreTrainedTokenizerBase, model_source: str, model: torch.nn.Module,
          optimizer: torch.optim.Optimizer, scheduler: Any, objective: Any, models: ModelPair, reward: RewardFunction,
          eval_reward: RewardFunction, train_prompts: list[Prompt], eval_prompts: list[Prompt]) -> OnlineRun:
    """The run, restored from its checkpoint when resuming."""
    c, group = session.config, session.group
    batches_per_epoch, total_steps = count_rollout_steps(c, len(train_prompts), group.world_size)
    state = OnlineState(kl_coef=objective.kl_coef, world_size=group.world_size, sharded=group.sharded)
    if session.resume_from is not None:
        state = OnlineState(**restore_run_checkpoint(group, session.resume_from, session.folder, model, optimizer,
                                                     scheduler))
    run = OnlineRun(
        config=c, group=group, folder=session.folder, tokenizer=tokenizer, model_source=model_source, model=model,
        optimizer=optimizer, scheduler=scheduler,
        trainable=[p for param_group in optimizer.param_groups for p in param_group["params"]],
        objective=objective, models=models, reward=reward, reward_name=c.sample.reward,
        eval_reward=eval_reward, eval_reward_name=c.sample.eval_reward or c.sample.reward,
        train_prompts=train_prompts, eval_prompts=eval_prompts, batches_per_epoch=batches_per_epoch,
        total_steps=total_steps, eval_every=evaluation_interval(c.train.eval_steps, total_steps),
        logger=session.logger(state.step), state=state,
    )
    if group.sharded:
        init_sharded_root(model)  # before the first rollout samples through peft's generate, past the root
        held, total = weights_held(model)
        group.print(f"FSDP: each process holds a slice of the weights ({held:,} of {total:,} on the main one), and "
                    "of their gradients and optimizer state; the reference is sharded too")
    processes = f" in each of {group.world_size} processes" if group.world_size > 1 else ""
    group.print(f"{objective.command}: training {model_source} on {len(train_prompts)} prompts for {total_steps} "
                f"rollouts ({c.rl.rollout_batch_size} prompts x {c.rl.num_generations} samples{processes}); "
                f"reward {c.sample.reward}; run folder {run.folder}")
    return run


# ---- one rollout -------------------------------------------------------------------------------------------------
def step_positions(run: OnlineRun) -> list[int]:
    """This process's prompts for the current step, as positions in `run.train_prompts` (epoch after epoch,
    reshuffled per epoch; the processes' shares of one global batch)."""
    t = run.config.train
    epoch, offset = divmod(run.state.step, run.batches_per_epoch)
    return epoch_shares(len(run.train_prompts), run.config.rl.rollout_batch_size, run.group.world_size,
                        run.group.rank, t.shuffle, t.seed, epoch)[offset]


def rollout_seed(run: OnlineRun) -> int:
    """Each step's (and process's) seed for the minibatch order: a resumed run does what the uninterrupted one
    would have."""
    return run.config.train.seed + 1_000_003 * (run.state.step + 1) + 7919 * run.group.rank


def sample_seeds(run: OnlineRun, positions: list[int]) -> list[int]:
    """One sampling seed per sample, from (seed, step, the prompt's position, which of its samples) alone: the
    same completions whichever process samples them and whatever shares its batch, and again on resume."""
    k, base = run.config.rl.num_generations, run.config.train.seed * 1_000_003 + run.state.step
    return [zlib.crc32(f"{base}/{position}/{j}".encode()) for position in positions for j in range(k)]


def collect(run: OnlineRun, positions: list[int]) -> Rollout:
    """Sample `num_generations` completions of each prompt (by position in `run.train_prompts`) from the policy
    (batched, KV-cached, each sample from its own seed), their per-token log-probs under the policy and the
    reference, and their reward. Every forward holds at most --local-rollout-forward-batch-size samples (each
    sample's tokens and log-probs are its own whatever shares its micro-batch)."""
    r, models, pad = run.config.rl, run.models, run.tokenizer.pad_token_id
    prompts = [run.train_prompts[i] for i in positions]
    layout, device, size = run.config.train.batch_layout, run.group.device, r.local_rollout_forward_batch_size
    # In fp32 the sampling forward's own logits give log pi_old (equal to a separate forward's to ~1e-6), which
    # saves a forward pass per rollout; under bf16/fp16 the cached and the full forward round differently, so
    # log pi_old comes from a full forward as the loss's (the minibatches after an update use it; the one before,
    # on-policy, uses its own log-probs: `optimise`).
    from_sampling = run.group.accelerator.mixed_precision == "no"
    with run.group.accelerator.autocast():
        samples = sample(models.policy, run.tokenizer, [p.ids for p in prompts], num_samples=r.num_generations,
                         max_new_tokens=run.config.sample.max_new_tokens, batch_size=size,
                         with_logps=from_sampling, row_seeds=sample_seeds(run, positions))
        width = max(len(s.completion_ids) for s in samples)
        with torch.no_grad():
            if from_sampling:
                logps = sampled_token_logps(samples, width, device)
            else:
                logps = in_micro_batches(lambda part: token_logps(models.policy, part, pad, width, device, layout),
                                         samples, size)
            with models.reference_model() as reference:
                ref_logps = in_micro_batches(lambda part: token_logps(reference, part, pad, width, device, layout),
                                             samples, size)
    raw, judged = judged_rewards(run, [prompts[s.prompt_index].given for s in samples], [s.text for s in samples])
    scores = raw.clone()
    if r.missing_eos_penalty is not None:  # a completion cut off at max_new_tokens
        ended = torch.tensor([s.completion_ids[-1] == run.tokenizer.eos_token_id for s in samples],
                             device=raw.device)
        scores = torch.where(ended, scores, scores - r.missing_eos_penalty)
    mask = completion_mask(samples, width).to(device)
    return Rollout(samples, mask, logps.float(), ref_logps.float(), scores, raw, judged)


def judged_rewards(run: OnlineRun, prompts: list, completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward of each completion (0 where the reward returned None, cannot judge) and which it judged, (B,)
    each. A failing reward (`rewards.RewardError`) stops the run before this step's update, naming the last
    checkpoint to resume from."""
    try:
        values = run.reward(prompts, completions)
    except RewardError as error:
        path = latest_checkpoint(run.folder, warn=False)
        resume = ("No checkpoint was written yet: a new run starts from the beginning." if path is None else
                  f"The last checkpoint is {path}; once the reward is fixed, resume with:\n  preftune "
                  f"{run.objective.command} --config {run.folder / CONFIG_FILE} --resume")
        raise RewardError(f"stopped at step {run.state.step} of {run.total_steps}, in step {run.state.step + 1}'s "
                          f"rollout: {error}\n\n{resume}") from None
    judged = torch.tensor([v is not None for v in values], device=run.group.device)
    raw = torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float32, device=run.group.device)
    return raw, judged


def rollout_metrics(rollout: Rollout, kl_coef: float) -> dict[str, float]:
    """The names TRL's PPO logs: objective/kl (sum over tokens of log pi - log pi_ref, mean over completions),
    objective/entropy (sum of -log pi of the sampled tokens), objective/non_score_reward, objective/rlhf_reward,
    objective/scores (the reward less the missing-EOS penalty, as in objective/rlhf_reward); and the completions'
    mean length. The reward's two are means over the samples it judged (0 if none), objective/unjudged_fraction
    the share it returned None for; the KL, entropy and length are over all samples."""
    kl = ((rollout.logps - rollout.ref_logps) * rollout.mask).sum(1)
    lengths = rollout.mask.sum(1).float()
    judged = rollout.judged.float()  # the reward's statistics leave out the samples it could not judge
    return {
        "objective/kl": kl.mean().item(),
        "objective/entropy": (-(rollout.logps * rollout.mask).sum(1)).mean().item(),
        "objective/non_score_reward": (-kl_coef * kl).mean().item(),
        "objective/rlhf_reward": masked_mean(rollout.scores - kl_coef * kl, judged).item(),
        "objective/scores": masked_mean(rollout.scores, judged).item(),
        "objective/unjudged_fraction": 1.0 - judged.mean().item(),
        "completions/mean_length": lengths.mean().item(),
    }


# ---- the loop ----------------------------------------------------------------------------------------------------
def micro_batches(objective: Any, minibatch: Rollout, size: int) -> list[Rollout]:
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


def accumulate_gradients(objective: Any, model: torch.nn.Module, minibatch: Rollout, size: int,
                         accelerator: Any, on_policy: bool = False) -> tuple[float, dict[str, float]]:
    """Forward and backward of one minibatch in micro-batches of at most `size` samples, gradients accumulated:
    the loss is a mean over the minibatch's count n (samples, tokens or pairs: `objective.loss_count`), and
    mean = sum_i (n_i / n) mean_i over micro-batches i, so each micro-batch's loss is weighted by n_i / n and the
    accumulated gradient is the whole minibatch's. The processes' gradients are averaged (DDP) once, at the last
    micro-batch. `on_policy`: the objective's (log pi_old = the current log-prob, detached, row by row). Returns
    (the minibatch's loss, its metrics: the same weighted sums)."""
    parts = micro_batches(objective, minibatch, size)
    counts = [float(objective.loss_count(part)) for part in parts]
    total = sum(counts)
    loss_value, metrics = 0.0, {}
    for i, (part, count) in enumerate(zip(parts, counts)):
        share = count / total if total > 0 else 1.0 / len(parts)  # nothing counted (all ties): every part's is 0
        with contextlib.ExitStack() as stack:
            if i < len(parts) - 1:
                stack.enter_context(accelerator.no_sync(model))
            with accelerator.autocast():
                loss, values = objective.loss(model, part, on_policy=on_policy)
            accelerator.backward(loss * share)  # one part: share 1.0, the loss unchanged
        loss_value += share * loss.item()
        for name, value in values.items():
            metrics[name] = metrics.get(name, 0.0) + share * float(value)
    return loss_value, metrics


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


def train(run: OnlineRun, on_evaluate: Callable[[OnlineRun, dict], None] | None = None,
          after_step: Callable[[OnlineRun], None] | None = None) -> None:
    """Rollout steps until `total_steps`, then a final held-out measurement (kept in `run.final_eval`).
    `after_step`: called after each rollout's updates (online DPO's reference updates)."""
    c, state = run.config, run.state
    progress = tqdm(total=run.total_steps, initial=state.step, desc=run.objective.command, dynamic_ncols=True,
                    disable=not run.group.is_main)
    run.model.train()
    with stop_on_signals() as signal_received:
        while state.step < run.total_steps:
            rollout = collect(run, step_positions(run))
            scored = run.objective.score(run, rollout)
            means, grad_norm, skipped = optimise(run, rollout)
            learning_rate = run.scheduler.get_last_lr()[0]
            run.scheduler.step()
            metrics = run.group.mean(rollout_metrics(rollout, state.kl_coef))  # the controller sees every process's
            if c.rl.kl_target is not None:
                state.kl_coef = adaptive_kl_coef(state.kl_coef, metrics["objective/kl"], c.rl.kl_target,
                                                 c.rl.kl_horizon, len(rollout.samples) * run.group.world_size)
            state.step += 1
            if after_step is not None:
                after_step(run)
            progress.update(1)
            if state.step % c.train.logging_steps == 0 or state.step == run.total_steps:
                values = run.group.mean({**scored, **means, "grad_norm": grad_norm})
                run.log({**metrics, **values, "objective/kl_coef": state.kl_coef, "lr": learning_rate,
                         "episode": state.step * len(rollout.samples) * run.group.world_size})
                progress.set_postfix(score=f"{metrics['objective/scores']:+.3f}", kl=f"{metrics['objective/kl']:.2f}")
            if skipped:
                warnings.warn(f"step {state.step}: non-finite loss or gradient; a minibatch update was skipped",
                              RuntimeWarning, stacklevel=2)
            if run.eval_prompts and run.eval_every and state.step % run.eval_every == 0:
                evaluate(run, on_evaluate)
            if c.train.save_steps and state.step % c.train.save_steps == 0:
                save_checkpoint(run)
            if state.bad_steps_in_row >= c.train.max_bad_steps:
                path = save_checkpoint(run)
                raise UserError(f"stopped at rollout {state.step}: {state.bad_steps_in_row} optimizer steps in a "
                                "row had a non-finite loss or gradient. Lower --learning-rate or --kl-coef. "
                                f"Checkpoint: {path}")
            if run.group.any_process(signal_received() is not None):
                path = save_checkpoint(run)
                raise interruption(state.step, run.total_steps, path, run.objective.command, run.folder / CONFIG_FILE,
                                   signal_received())
    progress.close()
    if run.eval_prompts:
        just_evaluated = run.eval_every and state.step % run.eval_every == 0
        run.final_eval = run.last_eval if just_evaluated else evaluate(run, on_evaluate)


def evaluate(run: OnlineRun, on_evaluate: Callable[[OnlineRun, dict], None] | None = None) -> dict[str, float]:
    """Mean ground-truth reward of the policy's samples on the held-out prompts and KL(policy || reference), each
    with its standard error, logged as eval_*."""
    c = run.config
    with run.group.accelerator.autocast():
        measured = measure(run.models, run.tokenizer, [p.ids for p in run.eval_prompts],
                           num_samples=c.default_job.samples_per_eval_prompt, max_new_tokens=c.sample.max_new_tokens,
                           seed=c.train.seed + 7, sample_reference=False, reward=run.eval_reward,
                           prompts=[p.given for p in run.eval_prompts])
    rewards = summarize(measured.policy_rewards, c.default_job.samples_per_eval_prompt)
    results = {"reward": rewards["mean"], "reward_stderr": rewards["stderr"], "kl": measured.kl.mean,
               "kl_stderr": measured.kl.stderr, "num_samples": measured.kl.num_samples}
    run.log({f"eval_{name}": value for name, value in results.items()})
    run.last_eval = results
    if on_evaluate is not None:
        on_evaluate(run, results)
    return results


def held_out_report(run: OnlineRun) -> dict[str, Any]:
    """The reference's and the trained policy's held-out reward (same prompts, seed and sample count), the gain,
    and KL(policy || reference) from the policy's samples; written to rl_report.json. Standard errors take each
    prompt's samples as one cluster, and the gain's pairs the two models by prompt (`measure.paired_gain`); the
    per-sample rewards (prompt-major) are kept so that other statistics can be computed later."""
    c = run.config
    per_prompt = c.default_job.samples_per_eval_prompt
    with run.group.accelerator.autocast():
        measured = measure(run.models, run.tokenizer, [p.ids for p in run.eval_prompts],
                           num_samples=per_prompt, max_new_tokens=c.sample.max_new_tokens,
                           seed=c.train.seed + 7, reward=run.eval_reward,
                           prompts=[p.given for p in run.eval_prompts])
    policy = summarize(measured.policy_rewards, per_prompt)
    reference = summarize(measured.reference_rewards, per_prompt)
    gain = paired_gain(measured.policy_rewards, measured.reference_rewards, per_prompt)
    return {
        "method": run.objective.command,
        "reward": run.eval_reward_name,
        "trained_on_reward": run.reward_name,
        "held_out_prompts": len(run.eval_prompts),
        "samples_per_prompt": per_prompt,
        "reference_reward": reference,
        "policy_reward": policy,
        "reward_gain": gain["mean"],
        "reward_gain_stderr": gain["stderr"],  # paired by prompt, clustered by prompt
        "kl_policy_reference": {"mean": measured.kl.mean, "stderr": measured.kl.stderr,
                                "num_samples": measured.kl.num_samples},
        "rewards": {"policy": measured.policy_rewards, "reference": measured.reference_rewards},
        "steps": run.state.step,
        "completions_generated": completions_generated(run),
        "examples": [{"prompt": run.eval_prompts[i].text,
                      "reference": measured.reference_samples[i * per_prompt].text,
                      "policy": measured.policy_samples[i * per_prompt].text}
                     for i in range(min(5, len(run.eval_prompts)))],
    }


def completions_generated(run: OnlineRun) -> int:
    """Completions sampled for training so far, over all processes (the held-out measurement's not counted)."""
    c = run.config
    return run.state.step * c.rl.rollout_batch_size * c.rl.num_generations * run.group.world_size


def save_checkpoint(run: OnlineRun) -> Path:
    config_yaml = yaml.safe_dump(run.config.to_dict(), sort_keys=False)
    return write_run_checkpoint(run.group, run.folder, run.state.step, run.model, run.optimizer, run.scheduler,
                                asdict(run.state), config_yaml, keep=run.config.train.save_total_limit or None)


def cleanup(run: OnlineRun) -> None:
    run.logger.close()


# ---- setup and save ----------------------------------------------------------------------------------------------
ModelBuilder = Callable[[torch.nn.Module, PreTrainedTokenizerBase], torch.nn.Module]


def setup(config: Config, objective: Any, build_model: ModelBuilder | None = None,
          reward: RewardFunction | None = None) -> OnlineRun:
    """Check the prompts and the reward, open the run, load the policy and its reference, build the trained module
    (`build_model`: the policy with whatever the recipe trains beside it; unset: the policy alone). `reward`: a
    callable given in memory (the Python API) in place of --reward."""
    from preftune.evaluation.measure import reference_pair
    from preftune.forward.rewards import checked, load_reward
    from preftune.models.load import load_policy_and_reference
    from preftune.runtime.accelerator import process_state
    from preftune.runtime.session import open_session, prepare_training

    c = config
    train_texts, eval_texts = prompt_sources(c)
    if build_model is not None and fsdp_requested():
        # FSDP gathers a module's weights in its own forward: the policy and the critic would be sharded as one
        # module, and sampling and the critic's values call each of them alone, outside that forward
        raise UserError(f"preftune {objective.command} under FSDP is not supported: its policy and critic would be "
                        "sharded as one module, which sampling and the critic's values cannot run part of. Use data "
                        "parallelism (configs/accelerate/ddp.yaml or --num-processes); RLOO and online DPO run "
                        "under FSDP")
    check_world_size(c, len(distinct_texts(train_texts)), process_state().num_processes)  # before anything is written
    session = open_session(c)
    group = session.group
    if reward is None:
        # a bad --reward fails before the policy loads
        reward = load_reward(c.sample.reward, group.device, c.rl.local_rollout_forward_batch_size)
    reward = checked(reward, c.sample.reward)
    eval_reward = reward
    if c.sample.eval_reward not in (None, c.sample.reward):
        eval_reward = load_reward(c.sample.eval_reward, group.device, c.rl.local_rollout_forward_batch_size)
    policy, reference, tokenizer, source = load_policy_and_reference(c.model)
    train_prompts, eval_prompts = distinct_prompts(train_texts, tokenizer), distinct_prompts(eval_texts, tokenizer)
    _, total_steps = count_rollout_steps(c, len(train_prompts), group.world_size)
    trained = build_model(policy, tokenizer) if build_model is not None else policy
    prepared, optimizer, scheduler = prepare_training(session, trained, total_steps)
    if reference is not None:
        reference = group.place_frozen(reference)
    models = reference_pair(objective.policy_of(group.unwrap(prepared)), reference, c.model, group.place_frozen)
    return start(session, tokenizer=tokenizer, model_source=source, model=prepared, optimizer=optimizer,
                 scheduler=scheduler, objective=objective, models=models, reward=reward, eval_reward=eval_reward,
                 train_prompts=train_prompts, eval_prompts=eval_prompts)


def save(run: OnlineRun) -> None:
    """The trained policy (a plain transformers folder, or the LoRA adapter), the resolved config, the final
    held-out measurement (eval_results.json), rl_report.json (reference vs policy on the held-out prompts) and
    report.md."""
    from preftune.evaluation.report import cell, write_report
    from preftune.models.load import save_model
    from preftune.recipes.model_card import write_model_cards
    from preftune.runtime.run_folder import save_config

    group, c = run.group, run.config
    # under FSDP the whole weights, gathered onto the main process (every process takes part)
    state_dict = group.accelerator.get_state_dict(run.model) if group.sharded else None
    if group.is_main:
        save_model(run.models.policy, run.tokenizer, run.folder, merge=c.model.merge, state_dict=state_dict)
        save_config(c, run.folder)
        if run.final_eval is not None:
            (run.folder / "eval_results.json").write_text(json.dumps(run.final_eval, indent=2) + "\n")
        write_model_cards(run, run.objective.command, run.models.policy, merge=c.model.merge)
        print(f"saved the trained model to {run.folder}", flush=True)
    del state_dict
    # sharded models sample only with every process taking part: each measures the same prompts with the same
    # seeds (as `evaluate` does in every process), and the main process writes
    report = held_out_report(run) if run.eval_prompts and (group.is_main or group.sharded) else None
    if report is not None and group.is_main:
        (run.folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        ref, pol, kl = report["reference_reward"], report["policy_reward"], report["kl_policy_reference"]
        print(f"held-out reward ({run.eval_reward_name}): reference {ref['mean']:+.3f} +- {ref['stderr']:.3f}, policy "
              f"{pol['mean']:+.3f} +- {pol['stderr']:.3f} (gain {report['reward_gain']:+.3f} +- "
              f"{report['reward_gain_stderr']:.3f}); KL(policy || reference) {kl['mean']:.2f} +- {kl['stderr']:.2f}",
              flush=True)
        rows = [f"| {cell(e['prompt'])} | {cell(e['reference'])} | {cell(e['policy'])} |" for e in report["examples"]]
        summary = [f"Held-out reward ({run.eval_reward_name}, {report['held_out_prompts']} prompts x "
                   f"{report['samples_per_prompt']} samples): reference {ref['mean']:+.3f} +- {ref['stderr']:.3f}, "
                   f"policy {pol['mean']:+.3f} +- {pol['stderr']:.3f}, gain {report['reward_gain']:+.3f} +- "
                   f"{report['reward_gain_stderr']:.3f}; KL(policy || reference) {kl['mean']:.2f} +- "
                   f"{kl['stderr']:.2f} nats per completion; {report['steps']} rollouts, "
                   f"{report['completions_generated']} completions generated. Standard errors take each prompt's "
                   "samples as one cluster; the gain's pairs policy and reference by prompt."]
        write_report(run.folder, c.to_dict(), summary, rows, f"preftune {run.objective.command} run {run.folder.name}")
    group.wait()


def run(online_run: OnlineRun, after_step: Callable[[OnlineRun], None] | None = None) -> OnlineRun:
    """train -> save on a set-up run, with cleanup whatever happens. Returns the finished run."""
    try:
        train(online_run, after_step=after_step)
        save(online_run)
    finally:
        cleanup(online_run)
    return online_run
