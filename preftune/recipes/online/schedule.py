"""Which prompts each rollout takes, and its seeds: the number of rollouts (full ones only), each process's share
of an epoch's prompts, and the seeds of the sampling and of the minibatch order, from (seed, step, position)
alone, so that a resumed run does what the uninterrupted one would have."""

from __future__ import annotations

import math
import zlib

from preftune.config import Config, kl_horizon_problem
from preftune.data.batching import process_batches
from preftune.errors import UserError
from preftune.recipes.online.state import OnlineRun


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
