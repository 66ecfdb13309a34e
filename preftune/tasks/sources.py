"""Where a run's prompts come from: --prompts (with each record's other columns), the prompts of --data's pairs,
or (with neither) the built-in task's (--task: the sentiment job's review requests, or the arithmetic problems with
their answers) and its held-out ones, with the settings the online recipes use on them."""

from __future__ import annotations

from typing import Any

from preftune.config import Config, apply_unset, resolved_task
from preftune.data.prompts import PromptRow
from preftune.data.read import load_and_report, load_prompts
from preftune.tasks import arithmetic, sentiment

# What the online recipes use on the default job's prompts unless the user sets it (the library defaults suit large
# prompt sets; these move SmolLM2-135M in ~30 rollouts on 2 CPU cores).
DEFAULT_JOB_OVERRIDES: dict[str, Any] = {
    "train.learning_rate": 1e-5,
    "train.warmup_ratio": 0.0,
    "sample.max_new_tokens": 24,
    "sample.eval_reward": "sentiment",  # the ground truth, also when --reward is a reward model fit to its pairs
}
# ... and on the arithmetic task's: its checker is the reward, and the held-out report's accuracy is the mean of
# its correctness reward
ARITHMETIC_OVERRIDES: dict[str, Any] = {
    **DEFAULT_JOB_OVERRIDES,
    **arithmetic.TASK_SETTINGS,
    "sample.reward": "accuracy,format",
    "sample.reward_weights": "1,0.5",
    "sample.eval_reward": "accuracy",
}


def task_prompts(config: Config, command: str) -> tuple[list[PromptRow], list[PromptRow]]:
    """The built-in task's training and held-out prompts (--task, else the command's default), with its settings
    applied where the user set none."""
    c, task = config, resolved_task(config, command)
    job = c.default_job
    if task == "arithmetic":
        chosen_reward = "sample.reward" in c.explicitly_set  # its weights are then the user's too
        apply_unset(c, {k: v for k, v in ARITHMETIC_OVERRIDES.items()
                        if not (chosen_reward and k == "sample.reward_weights")})
        return ([PromptRow(p, columns) for p, columns in arithmetic.make_rows(job.num_prompts, c.train.seed, False)],
                [PromptRow(p, columns) for p, columns in arithmetic.make_rows(job.num_eval_prompts, c.train.seed,
                                                                              True)])
    apply_unset(c, DEFAULT_JOB_OVERRIDES)
    return ([PromptRow(p) for p in sentiment.make_prompts(job.num_prompts, c.train.seed, held_out=False)],
            [PromptRow(p) for p in sentiment.make_prompts(job.num_eval_prompts, c.train.seed, held_out=True)])


def prompt_sources(config: Config, command: str = "") -> tuple[list[PromptRow], list[PromptRow]]:
    """The training and held-out prompts, as given with their columns: --prompts (each record's keys besides
    "prompt" are its columns), else the prompts of --data's pairs, else the built-in task's (`task_prompts`);
    held-out: --eval-data's prompts. Read and checked before anything else loads."""
    c = config
    held_out: list[PromptRow] = []
    if c.sample.prompts is not None:
        train = [PromptRow(record.prompt, record.columns) for record in load_prompts(c.sample.prompts)]
    elif c.data.data is not None:
        train = [PromptRow(pair.prompt) for pair in load_and_report(
            c.data.data, split=c.data.split, skip_invalid=c.data.skip_invalid, name="train_data").pairs]
    else:
        train, held_out = task_prompts(c, command)
    if c.data.eval_data is not None:
        held_out = [PromptRow(pair.prompt) for pair in load_and_report(
            c.data.eval_data, split=c.data.eval_split, skip_invalid=c.data.skip_invalid, name="eval_data").pairs]
    return train, held_out
