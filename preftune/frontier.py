"""`preftune frontier`: the DPO paper's reward-KL frontier (Figure 2, left) in miniature, on the default job.

On the default job's movie-review pairs (SmolLM2-135M-Instruct, VADER sentiment as the ground-truth reward),
each method gives points (KL(policy || reference), mean ground-truth reward) on held-out prompts:

- DPO at several betas, measured at several training lengths (evaluations during one run per beta);
- Preferred-FT: supervised fine-tuning on the chosen responses only (the `sft` loss), same pairs and lengths;
- best-of-N from the reference under the ground-truth reward, N = 1, 2, 4, 8, 16, whose KL is the analytic
  log N - (N - 1) / N (an upper bound on the true KL, Beirami et al. 2024, arXiv:2401.01879).

KL of a trained policy is estimated from its own samples (sum of per-token log-ratios, with its standard error).
Writes `frontier.csv`, `frontier.md` and `frontier.png` in the run folder.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.config import Config
from preftune.measure import ModelPair, measure, stderr
from preftune.models import frozen, load_model, load_tokenizer
from preftune.recipes import dpo
from preftune.rewards import sentiment_reward
from preftune.rollout import sample
from preftune.runtime.run_folder import prepare_output_dir
from preftune.sentiment import make_prompts, prepare_default_job, prompt_token_ids

BEST_OF = (1, 2, 4, 8, 16)


@dataclass
class Point:
    method: str  # "DPO beta=0.1", "Preferred-FT", "best-of-N", "reference"
    step: int | None  # optimizer steps trained (None for sampling-only methods)
    n: int | None  # N of best-of-N
    kl: float
    kl_stderr: float
    reward: float
    reward_stderr: float


class Measure:
    """Held-out prompts, the reference and the reward: everything a point is measured against."""

    def __init__(self, config: Config, reference: torch.nn.Module, tokenizer) -> None:
        job = config.default_job
        self.tokenizer, self.reference, self.reward = tokenizer, reference, sentiment_reward()
        self.prompt_ids = prompt_token_ids(tokenizer, make_prompts(job.num_eval_prompts, config.train.seed, True))
        self.samples_per_prompt = job.samples_per_eval_prompt
        self.sampling = dict(max_new_tokens=config.sample.max_new_tokens, seed=config.train.seed + 11)

    def policy_point(self, policy: torch.nn.Module, method: str, step: int) -> Point:
        measured = measure(ModelPair(policy, self.reference), self.tokenizer, self.prompt_ids,
                           num_samples=self.samples_per_prompt, sample_reference=False, reward=self.reward,
                           **self.sampling)
        rewards, kl = measured.policy_rewards, measured.kl
        return Point(method, step, None, kl.mean, kl.stderr, statistics.fmean(rewards), stderr(rewards))

    def best_of_n_points(self) -> list[Point]:
        n_max = max(BEST_OF)
        samples = sample(self.reference, self.tokenizer, self.prompt_ids, num_samples=n_max, **self.sampling)
        rewards = self.reward([""] * len(samples), [s.text for s in samples])
        points = []
        for n in BEST_OF:
            best = [max(rewards[i * n_max : i * n_max + n]) for i in range(len(self.prompt_ids))]
            kl = math.log(n) - (n - 1) / n
            method = "reference" if n == 1 else "best-of-N"
            points.append(Point(method, None, n, kl, 0.0, statistics.fmean(best), stderr(best)))
        return points


def run_frontier(config: Config, betas: list[float], measurements: int = 3) -> Path:
    """Train and measure every method; write the table and the plot. Returns the run folder."""
    started = time.time()
    source, train_file, eval_file = prepare_default_job(config)
    folder = prepare_output_dir(config.train.output_dir or f"runs/frontier-{time.strftime('%Y%m%d-%H%M%S')}",
                                config.train.overwrite, resuming=False)
    tokenizer = load_tokenizer(source, config.model.trust_remote_code)
    reference = frozen(load_model(source, config.model.trust_remote_code))
    measure_against = Measure(config, reference, tokenizer)
    points = measure_against.best_of_n_points()
    print(f"best-of-N measured ({time.time() - started:.0f} s)", flush=True)

    runs = [(f"DPO beta={beta:g}", {"loss.loss_type": "sigmoid", "loss.beta": beta}) for beta in betas]
    runs.append(("Preferred-FT", {"loss.loss_type": "sft"}))
    for method, settings in runs:
        run_config = copy.deepcopy(config)
        run_config.data.data, run_config.data.eval_data = str(train_file), str(eval_file)
        for key, value in settings.items():
            section, name = key.split(".")
            setattr(getattr(run_config, section), name, value)
        run_config.train.output_dir = str(folder / method.replace(" ", "_").replace("=", "-"))
        # every run trains on the same pairs from the same reference: its log-probs are computed by the first run
        # and read from the cache by the others
        run_config.train.precompute_ref_log_probs = True
        run_config.train.eval_steps = 1 / measurements  # a fraction: evaluate `measurements` times in the run

        def measure_point(run: dpo.PairRun, results: dict, method: str = method) -> None:
            points.append(measure_against.policy_point(run.objective.models.policy, method, run.state.step))

        training = dpo.setup(run_config)
        try:
            dpo.train(training, dpo.Hooks(on_evaluate=measure_point))
        finally:
            dpo.cleanup(training)
        print(f"{method} measured ({time.time() - started:.0f} s)", flush=True)

    write_table(points, folder)
    plot_frontier(points, folder / "frontier.png")
    summary = {"seconds": round(time.time() - started), "points": len(points)}
    (folder / "frontier.json").write_text(json.dumps(summary) + "\n")
    print(f"frontier of {len(points)} points in {folder} ({summary['seconds']} s)", flush=True)
    return folder


def write_table(points: list[Point], folder: Path) -> None:
    columns = ["method", "step", "n", "kl", "kl_stderr", "reward", "reward_stderr"]
    with (folder / "frontier.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for p in points:
            writer.writerow([getattr(p, c) for c in columns])
    lines = ["| method | steps | N | KL (nats) | mean reward |", "|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.method} | {'' if p.step is None else p.step} | {'' if p.n is None else p.n} | "
                     f"{p.kl:.2f} +- {p.kl_stderr:.2f} | {p.reward:+.3f} +- {p.reward_stderr:.3f} |")
    (folder / "frontier.md").write_text("\n".join(lines) + "\n")


def plot_frontier(points: list[Point], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    methods = list(dict.fromkeys(p.method for p in points if p.method != "reference"))
    for method in methods:
        group = sorted((p for p in points if p.method == method), key=lambda p: p.kl)
        style = {"marker": "s", "linestyle": "--"} if method == "best-of-N" else {"marker": "o", "linestyle": "-"}
        if method == "Preferred-FT":
            style = {"marker": "^", "linestyle": ":"}
        axis.errorbar([p.kl for p in group], [p.reward for p in group], xerr=[p.kl_stderr for p in group],
                      yerr=[p.reward_stderr for p in group], label=method, capsize=2, **style)
    for p in points:
        if p.method == "reference":
            axis.scatter([p.kl], [p.reward], color="black", zorder=5, label="reference (KL 0)")
    axis.set_xlabel("KL(policy || reference), nats per completion")
    axis.set_ylabel("mean ground-truth reward (VADER compound)")
    axis.set_title("Reward vs KL on held-out prompts (higher and further left is better)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.savefig(output, dpi=110)
    plt.close(figure)
