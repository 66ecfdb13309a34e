"""The loop every online recipe shares (PPO, RLOO): prompts -> rollout -> optimise on it -> log, evaluate, save.

A recipe plugs an `OnlineObjective` into it: what it adds to a rollout (`score`: values, advantages) and what one
minibatch of the rollout costs (`loss`). Everything else is here, once: the prompts (a prompts file, the prompts of
preference pairs, or the default job's), the rollout itself (samples from the policy, their log-probs under the
policy and the reference, the reward), the optimisation epochs and minibatches, logging, held-out measurement
(reward and KL with their standard errors, through measure.py), checkpoints that resume exactly and signals.
The run folder, process group, trackers, optimizer and checkpoint files are runtime/'s, as for the offline recipes.
"""

from __future__ import annotations

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

from preftune.batching import process_batches
from preftune.config import Config, resolved_num_ppo_epochs
from preftune.errors import UserError
from preftune.measure import ModelPair, measure, paired_gain, summarize
from preftune.policy_gradient import adaptive_kl_coef
from preftune.prompts import Prompt, distinct_prompts, prompt_sources
from preftune.rewards import RewardFunction
from preftune.rollout import Sample, completion_mask, sample, sampled_token_logps, token_logps
from preftune.runtime.checkpoint import restore_run_checkpoint, write_run_checkpoint
from preftune.runtime.logging import MetricLogger
from preftune.runtime.processes import ProcessGroup, full_value
from preftune.runtime.run_folder import CONFIG_FILE
from preftune.runtime.session import Session, evaluation_interval
from preftune.runtime.signals import interruption, stop_on_signals

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
    raw_scores: torch.Tensor  # (B,) the reward as the reward function gave it
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's: values, advantages, returns

    def rows(self, index: torch.Tensor) -> Rollout:
        picked = [self.samples[i] for i in index.tolist()]
        return Rollout(picked, self.mask[index], self.logps[index], self.ref_logps[index], self.scores[index],
                       self.raw_scores[index], {k: v[index] for k, v in self.extras.items()})

    @property
    def width(self) -> int:
        return self.mask.shape[1]


class OnlineObjective(Protocol):
    command: str  # the CLI command (for the resume hint)
    metric_names: tuple[str, ...]  # the per-minibatch metrics `loss` returns, averaged per step
    minibatch_unit: int  # consecutive rollout rows a minibatch keeps together (online DPO's pairs: 2)
    kl_coef: float  # the KL weight the rollout metrics (and PPO's, RLOO's reward) start from

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        """The policy inside the trained module (which may hold a critic beside it)."""

    def score(self, run: OnlineRun, rollout: Rollout) -> dict[str, float]:
        """Add what the loss needs to `rollout.extras` (advantages, ...); returns rollout metrics to log."""

    def loss(self, model: torch.nn.Module, minibatch: Rollout,
             on_policy: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a minibatch (with gradients), and its metrics (detached scalars). `on_policy`: no optimizer
        step since the rollout was sampled, so log pi_old is the current log-prob, detached (the ratio exactly 1)."""


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


def count_rollout_steps(config: Config, num_prompts: int, world_size: int, rank: int) -> tuple[int, int]:
    """(rollout batches per epoch for this process, rollout steps of the run)."""
    t, r = config.train, config.rl
    per_epoch = len(process_batches(num_prompts, r.rollout_batch_size, world_size, rank, t.shuffle, t.seed, 0))
    if per_epoch == 0:
        raise UserError(f"{num_prompts} prompts cannot give each of {world_size} processes a prompt")
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_epochs * per_epoch))
    return per_epoch, total


def start(session: Session, *, tokenizer: PreTrainedTokenizerBase, model_source: str, model: torch.nn.Module,
          optimizer: torch.optim.Optimizer, scheduler: Any, objective: Any, models: ModelPair, reward: RewardFunction,
          eval_reward: RewardFunction, train_prompts: list[Prompt], eval_prompts: list[Prompt]) -> OnlineRun:
    """The run, restored from its checkpoint when resuming."""
    c, group = session.config, session.group
    batches_per_epoch, total_steps = count_rollout_steps(c, len(train_prompts), group.world_size, group.rank)
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
    return process_batches(len(run.train_prompts), run.config.rl.rollout_batch_size, run.group.world_size,
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
    reference, and their reward."""
    r, models, pad = run.config.rl, run.models, run.tokenizer.pad_token_id
    prompts = [run.train_prompts[i] for i in positions]
    layout, device = run.config.train.batch_layout, run.group.device
    # In fp32 the sampling forward's own logits give log pi_old (equal to a separate forward's to ~1e-6), which
    # saves a forward pass per rollout; under bf16/fp16 the cached and the full forward round differently, so
    # log pi_old comes from a full forward as the loss's (the minibatches after an update use it; the one before,
    # on-policy, uses its own log-probs: `optimise`).
    from_sampling = run.group.accelerator.mixed_precision == "no"
    with run.group.accelerator.autocast():
        samples = sample(models.policy, run.tokenizer, [p.ids for p in prompts], num_samples=r.num_generations,
                         max_new_tokens=run.config.sample.max_new_tokens, batch_size=len(prompts) * r.num_generations,
                         with_logps=from_sampling, row_seeds=sample_seeds(run, positions))
        width = max(len(s.completion_ids) for s in samples)
        with torch.no_grad():
            if from_sampling:
                logps = sampled_token_logps(samples, width, device)
            else:
                logps = token_logps(models.policy, samples, pad, width, device, layout)
            with models.reference_model() as reference:
                ref_logps = token_logps(reference, samples, pad, width, device, layout)
    raw = torch.tensor(run.reward([prompts[s.prompt_index].given for s in samples], [s.text for s in samples]),
                       dtype=torch.float32, device=run.group.device)
    scores = raw.clone()
    if r.missing_eos_penalty is not None:  # a completion cut off at max_new_tokens
        ended = torch.tensor([s.completion_ids[-1] == run.tokenizer.eos_token_id for s in samples],
                             device=raw.device)
        scores = torch.where(ended, scores, scores - r.missing_eos_penalty)
    mask = completion_mask(samples, width).to(device)
    return Rollout(samples, mask, logps.float(), ref_logps.float(), scores, raw)


def rollout_metrics(rollout: Rollout, kl_coef: float) -> dict[str, float]:
    """The names TRL's PPO logs: objective/kl (sum over tokens of log pi - log pi_ref, mean over completions),
    objective/entropy (sum of -log pi of the sampled tokens), objective/non_score_reward, objective/rlhf_reward,
    objective/scores (the reward less the missing-EOS penalty, as in objective/rlhf_reward); and the completions'
    mean length."""
    kl = ((rollout.logps - rollout.ref_logps) * rollout.mask).sum(1)
    lengths = rollout.mask.sum(1).float()
    return {
        "objective/kl": kl.mean().item(),
        "objective/entropy": (-(rollout.logps * rollout.mask).sum(1)).mean().item(),
        "objective/non_score_reward": (-kl_coef * kl).mean().item(),
        "objective/rlhf_reward": (rollout.scores - kl_coef * kl).mean().item(),
        "objective/scores": rollout.scores.mean().item(),
        "completions/mean_length": lengths.mean().item(),
    }


# ---- the loop ----------------------------------------------------------------------------------------------------
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
        with accelerator.autocast():
            loss, metrics = run.objective.loss(model, rollout.rows(index), on_policy=not stepped)
        accelerator.backward(loss)
        grad_norm = float(full_value(accelerator.clip_grad_norm_(run.trainable, max_norm)))
        if math.isfinite(grad_norm) and math.isfinite(loss.item()):
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
    from preftune.measure import reference_pair
    from preftune.models import load_policy_and_reference
    from preftune.rewards import load_reward
    from preftune.runtime.session import open_session, prepare_training

    c = config
    train_texts, eval_texts = prompt_sources(c)
    session = open_session(c)
    group = session.group
    if group.sharded:  # the held-out measurement and report sample on the main process alone
        raise UserError(f"preftune {objective.command} under FSDP is not supported yet: use data parallelism "
                        "(configs/accelerate/ddp.yaml or --num-processes)")
    if reward is None:
        reward = load_reward(c.sample.reward, group.device)  # a bad --reward fails before the policy loads
    eval_reward = reward
    if c.sample.eval_reward not in (None, c.sample.reward):
        eval_reward = load_reward(c.sample.eval_reward, group.device)
    policy, reference, tokenizer, source = load_policy_and_reference(c.model)
    train_prompts, eval_prompts = distinct_prompts(train_texts, tokenizer), distinct_prompts(eval_texts, tokenizer)
    _, total_steps = count_rollout_steps(c, len(train_prompts), group.world_size, group.rank)
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
    from preftune.model_card import write_model_cards
    from preftune.models import save_model
    from preftune.report import cell, write_report
    from preftune.runtime.run_folder import save_config

    group, c = run.group, run.config
    if group.is_main:
        save_model(run.models.policy, run.tokenizer, run.folder, merge=c.model.merge)
        save_config(c, run.folder)
        if run.final_eval is not None:
            (run.folder / "eval_results.json").write_text(json.dumps(run.final_eval, indent=2) + "\n")
        write_model_cards(run, run.objective.command, run.models.policy, merge=c.model.merge)
        print(f"saved the trained model to {run.folder}", flush=True)
    if run.eval_prompts and group.is_main:
        report = held_out_report(run)
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
