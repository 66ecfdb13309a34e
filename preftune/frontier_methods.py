"""The frontier's methods: what each one trains (or samples) on the default job, and how its points are measured.

Every method runs in its own process (`frontier.py` starts it), so that its wall time and peak memory are its own.
A method gives `Point`s, each the held-out reward and KL of one policy with the budgets spent to reach it, and one
`Cost` row. The measurement is the same for all (`Measure`: the same held-out prompts, seed, sample count and KL
estimator, against the same frozen reference).
"""

from __future__ import annotations

import copy
import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.config import REWARD_MODEL_DEFAULT_JOB_OVERRIDES, Config
from preftune.measure import ModelPair, measure, paired_gain, prompt_means, stderr, summarize
from preftune.rewards import sentiment_reward
from preftune.rollout import sample
from preftune.sentiment import make_prompts, prompt_token_ids

BEST_OF = (1, 2, 4, 8, 16)
REWARD_MODEL = "REWARD_MODEL"  # in a method's settings: the folder the reward-model method saved
MEASUREMENTS = 3  # points per trained method, evenly spaced over its steps


@dataclass
class Point:
    method: str  # "DPO beta=0.1", "Preferred-FT", "best-of-N", "reference", "PPO", ...
    step: int | None  # optimizer steps (rollouts for the online methods); None for sampling-only methods
    n: int | None  # N of best-of-N
    kl: float
    kl_stderr: float
    reward: float
    reward_stderr: float
    # the budgets spent to reach this point (the reward model's not included; the report adds it)
    seconds: float = 0.0  # training wall time, measurement excluded
    completions: int = 0  # completions sampled for training (best-of-N: for its choice)
    reward_queries: int = 0  # calls of the reward (ground truth or reward model) on a completion
    labels: int = 0  # preference labels consumed (pairs seen; for reward-model methods, the reward model's)
    # the reward's gain over the reference's samples on the same prompts, paired by prompt (`measure.paired_gain`)
    gain: float = math.nan
    gain_stderr: float = math.nan


@dataclass
class Cost:
    """What one method cost on the same work, measured in its own process."""

    method: str
    wall_seconds: float  # the whole process: loading, training, measuring
    train_seconds: float  # training (or best-of-N's sampling) alone
    peak_rss_bytes: int
    model_copies: int  # model-sized networks held while training
    copies: str  # which
    completions: int
    reward_queries: int
    labels: int
    uses_reward_model: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    key: str  # the name --methods selects it by (the DPO betas share "dpo")
    label: str  # how tables and plots name it
    kind: str  # "best-of-n", "pairs" (DPO / Preferred-FT), "reward-model", or an online recipe: ppo, rloo, online-dpo
    settings: dict[str, Any]  # config overrides (dotted keys)
    copies: tuple[str, ...]  # the model-sized networks it holds while training

    @property
    def uses_reward_model(self) -> bool:
        return REWARD_MODEL in self.settings.values()

    @property
    def slug(self) -> str:
        return self.label.lower().replace(" ", "-").replace("=", "")


def method_specs(config: Config, keys: list[str]) -> list[MethodSpec]:
    """The methods `keys` select, in run order (the reward model first when a method needs it). The online methods'
    step counts are sized so that all of them fit about an hour on 2 CPU cores with the DPO runs."""
    betas = [float(b) for b in config.default_job.frontier_betas.split(",")]
    specs = [MethodSpec("best-of-n", "best-of-N", "best-of-n", {}, ("reference",))]
    specs += [MethodSpec("dpo", f"DPO beta={beta:g}", "pairs", {"loss.loss_type": "sigmoid", "loss.beta": beta},
                         ("policy", "reference")) for beta in betas]
    specs.append(MethodSpec("preferred-ft", "Preferred-FT", "pairs", {"loss.loss_type": "sft"}, ("policy",)))
    ppo = {"rl.num_ppo_epochs": 2, "train.max_steps": 10}
    specs += [
        MethodSpec("ppo", "PPO", "ppo", {**ppo, "sample.reward": REWARD_MODEL, "rl.value_model": REWARD_MODEL},
                   ("policy", "reference", "critic", "reward model")),
        MethodSpec("ppo-gt", "PPO-GT", "ppo", {**ppo, "sample.reward": "sentiment"}, ("policy", "reference", "critic")),
        MethodSpec("rloo", "RLOO", "rloo", {"sample.reward": REWARD_MODEL, "train.max_steps": 24},
                   ("policy", "reference", "reward model")),
        MethodSpec("online-dpo", "online DPO", "online-dpo",
                   {"sample.reward": REWARD_MODEL, "train.max_steps": 24, "train.learning_rate": 2e-5,
                    "loss.beta": 0.1}, ("policy", "reference", "reward model")),
    ]
    chosen = [spec for spec in specs if spec.key in keys]
    if any(spec.uses_reward_model for spec in chosen):
        chosen.insert(0, MethodSpec("reward-model", "reward model", "reward-model", REWARD_MODEL_DEFAULT_JOB_OVERRIDES,
                                    ("reward model",)))
    return chosen


class Measure:
    """Held-out prompts, the reference and the ground-truth reward: everything a point is measured against.
    Standard errors take each prompt's samples as one cluster; a point's gain pairs its per-prompt mean reward with
    the reference's on the same prompt (the reference sampled once, as `measure` would sample it: same seed, same
    count)."""

    def __init__(self, config: Config, reference: torch.nn.Module, tokenizer) -> None:
        job = config.default_job
        self.tokenizer, self.reference, self.reward = tokenizer, reference, sentiment_reward()
        self.prompt_ids = prompt_token_ids(tokenizer, make_prompts(job.num_eval_prompts, config.train.seed, True))
        self.samples_per_prompt = job.samples_per_eval_prompt
        self.sampling = dict(max_new_tokens=config.sample.max_new_tokens, seed=config.train.seed + 11)
        self.seconds = 0.0  # time spent measuring, left out of the training time
        self._reference_rewards: list[float] | None = None

    def reference_rewards(self) -> list[float]:
        """The reference's rewards on the held-out prompts (prompt-major, `samples_per_prompt` each), sampled on
        first use with the policies' seed and count; its time counts as measurement."""
        if self._reference_rewards is None:
            started = time.perf_counter()
            samples = sample(self.reference, self.tokenizer, self.prompt_ids, num_samples=self.samples_per_prompt,
                             **self.sampling)
            self._reference_rewards = self.reward([""] * len(samples), [s.text for s in samples])
            self.seconds += time.perf_counter() - started
        return self._reference_rewards

    def policy_point(self, policy: torch.nn.Module, method: str, step: int, **budgets: Any) -> Point:
        reference = self.reference_rewards()
        started = time.perf_counter()
        measured = measure(ModelPair(policy, self.reference), self.tokenizer, self.prompt_ids,
                           num_samples=self.samples_per_prompt, sample_reference=False, reward=self.reward,
                           **self.sampling)
        self.seconds += time.perf_counter() - started
        rewards, kl, k = measured.policy_rewards, measured.kl, self.samples_per_prompt
        gain = paired_gain(rewards, reference, k)
        return Point(method, step, None, kl.mean, kl.stderr, statistics.fmean(rewards), summarize(rewards, k)["stderr"],
                     **budgets, gain=gain["mean"], gain_stderr=gain["stderr"])

    def best_of_n_points(self) -> tuple[list[Point], float]:
        """Points for N in BEST_OF from the same max(N) samples per prompt, and the sampling time. A point's time is
        that of its N samples (the sampling time times N / max N). Its gain pairs each prompt's best reward with
        the reference's mean reward on that prompt."""
        n_max, started = max(BEST_OF), time.perf_counter()
        samples = sample(self.reference, self.tokenizer, self.prompt_ids, num_samples=n_max, **self.sampling)
        rewards = self.reward([""] * len(samples), [s.text for s in samples])
        seconds = time.perf_counter() - started
        reference = prompt_means(self.reference_rewards(), self.samples_per_prompt)
        points = []
        for n in BEST_OF:
            best = [max(rewards[i * n_max : i * n_max + n]) for i in range(len(self.prompt_ids))]
            kl = math.log(n) - (n - 1) / n
            used = n * len(self.prompt_ids)
            gain = paired_gain(best, reference, 1)
            points.append(Point("reference" if n == 1 else "best-of-N", None, n, kl, 0.0, statistics.fmean(best),
                                stderr(best), seconds=seconds * n / n_max, completions=used, reward_queries=used,
                                gain=gain["mean"], gain_stderr=gain["stderr"]))
        return points, seconds


def measure_steps(total: int) -> set[int]:
    """MEASUREMENTS steps evenly spaced over `total`, the last one included."""
    return {max(1, round(total * k / MEASUREMENTS)) for k in range(1, MEASUREMENTS + 1)}


def method_config(config: Config, spec: MethodSpec, folder: Path) -> Config:
    """The frontier's config with the method's settings, training in folder/runs/<slug>."""
    run_config = copy.deepcopy(config)
    for key, value in spec.settings.items():
        section, name = key.split(".")
        value = str(folder / "runs" / "reward-model") if value == REWARD_MODEL else value
        setattr(getattr(run_config, section), name, value)
        run_config.explicitly_set.add(key)  # the method's choice, not a default an override may replace
    run_config.train.output_dir = str(folder / "runs" / spec.slug)
    run_config.train.overwrite = True  # a method's own training folder: recomputed whole when it runs
    run_config.train.report_to = "none"
    return run_config


def run_method(spec: MethodSpec, config: Config, folder: Path) -> tuple[list[Point], Cost]:
    """Train (or sample) one method and measure its points; run in a process of its own."""
    from preftune.models import frozen, load_model, load_tokenizer
    from preftune.sentiment import prepare_default_job

    started = time.perf_counter()
    source, train_file, eval_file = prepare_default_job(config)
    tokenizer = load_tokenizer(source, config.model.trust_remote_code)
    run_config = method_config(config, spec, folder)
    if spec.kind in ("pairs", "reward-model"):
        run_config.data.data, run_config.data.eval_data = str(train_file), str(eval_file)
    measure_against = None
    if spec.kind != "reward-model":
        reference = frozen(load_model(source, config.model.trust_remote_code))
        measure_against = Measure(config, reference, tokenizer)
    labels_of_reward_model = reward_model_labels(folder) if spec.uses_reward_model else 0
    if spec.kind == "best-of-n":
        points, train_seconds = measure_against.best_of_n_points()
        extra: dict[str, Any] = {}
    elif spec.kind == "pairs":
        points, train_seconds, extra = train_on_pairs(spec, run_config, measure_against)
    elif spec.kind == "reward-model":
        points, train_seconds, extra = train_reward_model(run_config)
    else:
        points, train_seconds, extra = train_online(spec, run_config, measure_against, labels_of_reward_model)
    spent = points[-1] if points else Point(spec.label, None, None, 0.0, 0.0, 0.0, 0.0,
                                            labels=extra.get("labels", 0))
    cost = Cost(spec.label, time.perf_counter() - started, train_seconds,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, len(spec.copies), ", ".join(spec.copies),
                spent.completions, spent.reward_queries, spent.labels, spec.uses_reward_model, extra)
    return points, cost


def train_on_pairs(spec: MethodSpec, config: Config, measure_against: Measure) -> tuple[list[Point], float, dict]:
    """DPO or Preferred-FT on the default job's pairs, measured MEASUREMENTS times during the run."""
    from preftune.recipes import dpo

    # every pairs run trains on the same pairs from the same reference: the first computes the reference's
    # log-probs into the cache, the others read them
    config.train.precompute_ref_log_probs = True
    config.train.eval_steps = 1 / MEASUREMENTS  # a fraction: evaluate MEASUREMENTS times in the run
    points: list[Point] = []
    training = dpo.setup(config)
    started = time.perf_counter()

    def measure_point(run: dpo.PairRun, results: dict) -> None:
        labels = min(run.state.micro_batches_seen * config.train.batch_size, len(run.train_pairs))
        seconds = time.perf_counter() - started - measure_against.seconds
        points.append(measure_against.policy_point(run.objective.models.policy, spec.label, run.state.step,
                                                   seconds=seconds, labels=labels))

    try:
        dpo.train(training, dpo.Hooks(on_evaluate=measure_point))
    finally:
        dpo.cleanup(training)
    return points, time.perf_counter() - started - measure_against.seconds, {}


def train_reward_model(config: Config) -> tuple[list[Point], float, dict]:
    """The Bradley-Terry reward model the RLHF methods optimise against, saved where their settings point."""
    from preftune.recipes import reward_model

    started = time.perf_counter()
    finished = reward_model.run(config)
    held_out = finished.final_eval or {}
    extra = {"labels": len(finished.train_pairs), "held_out_accuracy": held_out.get("accuracy"),
             "held_out_accuracy_stderr": held_out.get("accuracy_stderr"), "held_out_pairs": held_out.get("num_pairs")}
    return [], time.perf_counter() - started, extra


def train_online(spec: MethodSpec, config: Config, measure_against: Measure, labels: int,
                 ) -> tuple[list[Point], float, dict]:
    """PPO, RLOO or online DPO on the default job's prompts, measured MEASUREMENTS times during the run by the
    frontier's measurement (the recipe's own held-out evaluation is switched off: it would sample twice).
    `labels`: the preference labels behind its reward (the reward model's pairs; 0 for the ground truth)."""
    from preftune.recipes import online, online_dpo, ppo, rloo

    recipe = {"ppo": ppo, "rloo": rloo, "online-dpo": online_dpo}[spec.kind]
    run = recipe.setup(config)
    run.eval_prompts = []
    at = measure_steps(run.total_steps)
    points: list[Point] = []
    started = time.perf_counter()

    def after_step(run: online.OnlineRun) -> None:
        if run.state.step in at:
            generated = online.completions_generated(run)
            seconds = time.perf_counter() - started - measure_against.seconds
            points.append(measure_against.policy_point(run.models.policy, spec.label, run.state.step,
                                                       seconds=seconds, completions=generated,
                                                       reward_queries=generated, labels=labels))

    try:
        online.train(run, after_step=after_step)
    finally:
        online.cleanup(run)
    return points, time.perf_counter() - started - measure_against.seconds, {}


def reward_model_labels(folder: Path) -> int:
    """The preference labels the frontier's reward model was trained on (from its method's cached record)."""
    import json

    record = folder / "methods" / "reward-model.json"
    return int(json.loads(record.read_text())["cost"]["labels"]) if record.is_file() else 0


def as_dict(points: list[Point], cost: Cost) -> dict[str, Any]:
    return {"points": [asdict(p) for p in points], "cost": asdict(cost)}


def from_dict(record: dict[str, Any]) -> tuple[list[Point], Cost]:
    return [Point(**p) for p in record["points"]], Cost(**record["cost"])
