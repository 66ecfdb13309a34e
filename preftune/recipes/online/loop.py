"""The online loop itself, setup -> train -> save -> cleanup: `start` opens (or resumes) the run, `train` runs the
rollout steps (rollouts.collect -> the objective's score -> optimisation.optimise -> the KL controller -> log,
evaluate, checkpoint, signals), `save` writes the policy, its config, model card and the held-out report."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from preftune.config import Config
from preftune.data.prompts import Prompt, distinct_prompts, distinct_texts
from preftune.errors import UserError
from preftune.evaluation.measure import ModelPair
from preftune.forward.rewards import RewardFunction, Rewards
from preftune.objectives.policy_gradient import adaptive_kl_coef
from preftune.recipes.online.held_out import evaluate, write_held_out_report
from preftune.recipes.online.optimisation import optimise
from preftune.recipes.online.rollouts import collect, rollout_metrics
from preftune.recipes.online.schedule import check_world_size, count_rollout_steps, step_positions
from preftune.recipes.online.state import OnlineObjective, OnlineRun, OnlineState
from preftune.runtime.accelerator import fsdp_requested, init_sharded_root, weights_held
from preftune.runtime.checkpoint import restore_run_checkpoint, write_run_checkpoint
from preftune.runtime.run_folder import CONFIG_FILE
from preftune.runtime.session import Session, evaluation_interval
from preftune.runtime.signals import interruption, stop_on_signals
from preftune.tasks.sources import prompt_sources


def start(session: Session, *, tokenizer: PreTrainedTokenizerBase, model_source: str, model: torch.nn.Module,
          optimizer: torch.optim.Optimizer, scheduler: Any, objective: OnlineObjective, models: ModelPair,
          reward: Rewards, eval_reward: RewardFunction, train_prompts: list[Prompt],
          eval_prompts: list[Prompt]) -> OnlineRun:
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


def save_checkpoint(run: OnlineRun) -> Path:
    config_yaml = yaml.safe_dump(run.config.to_dict(), sort_keys=False)
    return write_run_checkpoint(run.group, run.folder, run.state.step, run.model, run.optimizer, run.scheduler,
                                asdict(run.state), config_yaml, keep=run.config.train.save_total_limit or None)


def cleanup(run: OnlineRun) -> None:
    run.logger.close()


ModelBuilder = Callable[[torch.nn.Module, PreTrainedTokenizerBase], torch.nn.Module]
ObjectiveMaker = Callable[[PreTrainedTokenizerBase], OnlineObjective]


def setup(config: Config, command: str, make_objective: ObjectiveMaker, build_model: ModelBuilder | None = None,
          reward: RewardFunction | Rewards | None = None) -> OnlineRun:
    """Check the prompts and the reward, open the run, load the policy and its reference, build the objective and
    the trained module, and start the run (`command`: the recipe's, named in the refusals before anything loads).
    `make_objective`: the recipe's objective, built complete once the tokenizer is loaded (its pad id) and never
    changed after. `build_model`: the policy with whatever the recipe trains beside it (unset: the policy alone).
    `reward`: a callable, or `Rewards` (the Python API's reward_funcs), given in memory in place of --reward."""
    from preftune.evaluation.measure import reference_pair
    from preftune.forward.rewards import checked, load_reward, load_rewards
    from preftune.models.load import load_policy_and_reference
    from preftune.runtime.accelerator import process_state
    from preftune.runtime.session import open_session, prepare_training

    c = config
    train_texts, eval_texts = prompt_sources(c, command)
    if build_model is not None and fsdp_requested():
        # FSDP gathers a module's weights in its own forward: the policy and the critic would be sharded as one
        # module, and sampling and the critic's values call each of them alone, outside that forward
        raise UserError(f"preftune {command} under FSDP is not supported: its policy and critic would be "
                        "sharded as one module, which sampling and the critic's values cannot run part of. Use data "
                        "parallelism (configs/accelerate/ddp.yaml or --num-processes); RLOO and online DPO run "
                        "under FSDP")
    check_world_size(c, len(distinct_texts(train_texts)), process_state().num_processes)  # before anything is written
    session = open_session(c)
    group = session.group
    if reward is None:
        # a bad --reward fails before the policy loads
        reward = load_rewards(c.sample.reward, c.sample.reward_weights, group.device,
                              c.rl.local_rollout_forward_batch_size)
    reward = checked(reward, c.sample.reward)
    rewards = reward if isinstance(reward, Rewards) else Rewards([reward])
    eval_reward = rewards
    if c.sample.eval_reward not in (None, c.sample.reward):
        eval_reward = load_reward(c.sample.eval_reward, group.device, c.rl.local_rollout_forward_batch_size)
    policy, reference, tokenizer, source = load_policy_and_reference(c.model)
    objective = make_objective(tokenizer)
    if objective.command != command:
        raise ValueError(f"the objective of {command} is {objective.command}'s")
    train_prompts, eval_prompts = distinct_prompts(train_texts, tokenizer), distinct_prompts(eval_texts, tokenizer)
    _, total_steps = count_rollout_steps(c, len(train_prompts), group.world_size)
    trained = build_model(policy, tokenizer) if build_model is not None else policy
    prepared, optimizer, scheduler = prepare_training(session, trained, total_steps)
    if reference is not None:
        reference = group.place_frozen(reference)
    models = reference_pair(objective.policy_of(group.unwrap(prepared)), reference, c.model, group.place_frozen)
    return start(session, tokenizer=tokenizer, model_source=source, model=prepared, optimizer=optimizer,
                 scheduler=scheduler, objective=objective, models=models, reward=rewards, eval_reward=eval_reward,
                 train_prompts=train_prompts, eval_prompts=eval_prompts)


def save(run: OnlineRun) -> None:
    """The trained policy (a plain transformers folder, or the LoRA adapter), the resolved config, the final
    held-out measurement (eval_results.json), rl_report.json (reference vs policy on the held-out prompts) and
    report.md (`held_out.write_held_out_report`)."""
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
    write_held_out_report(run)
    group.wait()


def run(online_run: OnlineRun, after_step: Callable[[OnlineRun], None] | None = None) -> OnlineRun:
    """train -> save on a set-up run, with cleanup whatever happens. Returns the finished run."""
    try:
        train(online_run, after_step=after_step)
        save(online_run)
    finally:
        cleanup(online_run)
    return online_run
