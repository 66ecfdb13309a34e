"""The loop every online recipe shares (PPO, RLOO, online DPO): prompts -> rollout -> optimise on it -> log,
evaluate, save.

A recipe plugs an `OnlineObjective` into it: what it adds to a rollout (`score`: values, advantages, ranked pairs)
and what one minibatch of the rollout costs (`loss`). Everything else is here, once, in parts a reader takes in
this order:

- `state`: the `Rollout` (samples, log-probs under the policy and the reference, reward), the `OnlineObjective`
  Protocol (all the loop reads of an objective), the `OnlineState` a checkpoint keeps, the `OnlineRun`;
- `schedule`: the prompts of each rollout (full rollouts only, each process's share) and the seeds of sampling and
  of the minibatch order, from (seed, step, position) alone, so that a resumed run does what the uninterrupted
  one would have;
- `rollouts`: one rollout (`collect`): sampling, log-probs, the reward and which samples it judged, the missing-EOS
  penalty (`missing_eos_penalized`), and the metrics TRL logs of it;
- `optimisation`: the optimizer steps on one rollout: minibatches, micro-batches whose gradients add up to the
  minibatch's, the skip of a non-finite step;
- `held_out`: the held-out measurement (reward and KL with their standard errors, through evaluation/measure.py),
  during training and at the end against the reference (rl_report.json, report.md);
- `loop`: `setup` (prompts, reward, models, the objective built complete once the tokenizer is loaded) -> `train`
  (the steps, the KL controller, logging, checkpoints that resume exactly, signals) -> `save` -> `cleanup`.

The run folder, process group, trackers, optimizer and checkpoint files are runtime/'s, as for the offline
recipes. The modules import one another (state first, loop last), never this package's `__init__`.
"""

from preftune.recipes.online.held_out import (
    REPORT_FILE,
    completions_generated,
    evaluate,
    held_out_report,
    write_held_out_report,
)
from preftune.recipes.online.loop import (
    ModelBuilder,
    ObjectiveMaker,
    cleanup,
    run,
    save,
    save_checkpoint,
    setup,
    start,
    train,
)
from preftune.recipes.online.optimisation import accumulate_gradients, micro_batches, minibatch_rows, optimise
from preftune.recipes.online.rollouts import collect, judged_rewards, missing_eos_penalized, rollout_metrics
from preftune.recipes.online.schedule import (
    check_world_size,
    count_rollout_steps,
    epoch_shares,
    rollout_seed,
    sample_seeds,
    step_positions,
)
from preftune.recipes.online.state import OnlineObjective, OnlineRun, OnlineState, Rollout

__all__ = [
    "REPORT_FILE", "ModelBuilder", "ObjectiveMaker", "OnlineObjective", "OnlineRun", "OnlineState", "Rollout",
    "accumulate_gradients", "check_world_size", "cleanup", "collect", "completions_generated", "count_rollout_steps",
    "epoch_shares", "evaluate", "held_out_report", "judged_rewards", "micro_batches", "minibatch_rows",
    "missing_eos_penalized", "optimise", "rollout_metrics", "rollout_seed", "run", "sample_seeds", "save",
    "save_checkpoint", "setup", "start", "step_positions", "train", "write_held_out_report",
]
