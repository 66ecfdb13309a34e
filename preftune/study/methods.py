"""The study's methods: the table of what each one trains (or samples), and the records a unit of work gives.

A unit is one (method, label budget, seed); `study/unit.py` runs it in a process of its own. A unit gives `Point`s,
each the held-out reward and KL of one policy with the budgets spent to reach it, and one `Cost` row. Every point
of a seed is measured the same way (`study/measure.py`: the same held-out prompts, sample count, sampling seed and
KL estimator, against the same frozen reference, by the same ground truth).

Adding a method is one row of `method_table`: an online recipe is any module `preftune.recipes.<kind>` (dashes as
underscores) with `setup(config) -> OnlineRun`, run by the shared online loop; its settings are config overrides,
REWARD_MODEL standing for the folder of the budget's reward model and GROUND_TRUTH for --ground-truth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from preftune.config import GRPO_DEFAULTS, REWARD_MODEL_DEFAULT_JOB_OVERRIDES

REWARD_MODEL = "REWARD_MODEL"  # in a method's settings: the folder of its budget's (and seed's) reward model
GROUND_TRUTH = "GROUND_TRUTH"  # in a method's settings: --ground-truth (sentiment, module:function, a folder)
OFFLINE_KINDS = ("reference", "pairs", "reward-model", "best-of-n")  # every other kind is an online recipe


@dataclass
class Point:
    method: str  # "DPO beta=0.1", "best-of-N", "reference", "PPO", ...
    budget: int | None  # labelled pairs available (None: a method that uses none, the ground-truth ceilings)
    seed: int
    step: int | None  # optimizer steps (rollouts for the online methods); None for sampling-only methods
    n: int | None  # N of best-of-N
    kl: float
    kl_stderr: float
    reward: float  # mean ground-truth reward on the held-out prompts
    reward_stderr: float  # clustered by prompt
    # the budgets spent to reach this point (the reward model's not included; the report adds it)
    seconds: float = 0.0  # training wall time, measurement excluded
    completions: int = 0  # completions sampled for training (best-of-N: for its choice)
    reward_queries: int = 0  # calls of the training reward (ground truth or reward model) on a completion
    labels: int = 0  # preference labels consumed (for reward-model methods, the reward model's)
    # the gain over the reference's samples on the same prompts, paired by prompt (`measure.paired_gain`)
    gain: float = math.nan
    gain_stderr: float = math.nan
    prompt_rewards: list[float] = field(default_factory=list)  # per held-out prompt, its mean reward (for pairing)


@dataclass
class Cost:
    """What one unit cost, measured in its own process."""

    method: str
    budget: int | None
    seed: int
    wall_seconds: float  # the whole process: loading, training, measuring
    train_seconds: float  # training (or best-of-N's choice) alone
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
    kind: str  # "reference", "pairs" (DPO, Preferred-FT), "reward-model", "best-of-n", or an online recipe
    settings: dict[str, Any]  # config overrides (dotted keys)
    copies: tuple[str, ...]  # the model-sized networks it holds while training

    @property
    def uses_reward_model(self) -> bool:
        return self.kind == "best-of-n" or REWARD_MODEL in self.settings.values()

    @property
    def uses_ground_truth(self) -> bool:
        """Trains on the ground truth (a ceiling: labels none, the ground truth callable during training)."""
        return GROUND_TRUTH in self.settings.values()

    @property
    def per_budget(self) -> bool:
        """Run once per label budget (else once per seed)."""
        return self.kind != "reference" and not self.uses_ground_truth

    @property
    def online(self) -> bool:
        return self.kind not in OFFLINE_KINDS

    @property
    def samples(self) -> bool:
        """Samples from a model during training or for its answer (needs a sampler at hand, unlike DPO)."""
        return self.online or self.kind == "best-of-n"

    @property
    def slug(self) -> str:
        return self.label.lower().replace(" ", "-").replace("=", "")


PPO = {"rl.num_ppo_epochs": 2}
GRPO = dict(GRPO_DEFAULTS)  # `preftune grpo`'s own defaults (TRL's: dapo, beta 0, so no reference is held)
REFERENCE = MethodSpec("reference", "reference", "reference", {}, ("reference",))
REWARD_MODEL_SPEC = MethodSpec("reward-model", "reward model", "reward-model",
                               {k: v for k, v in REWARD_MODEL_DEFAULT_JOB_OVERRIDES.items() if k != "train.num_epochs"},
                               ("reward model",))


def method_table(betas: list[float]) -> list[MethodSpec]:
    """Every method the study knows, one row each (the DPO betas a row each)."""
    rows = [MethodSpec("dpo", f"DPO beta={beta:g}", "pairs", {"loss.loss_type": "sigmoid", "loss.beta": beta},
                       ("policy", "reference")) for beta in betas]
    rows += [
        MethodSpec("preferred-ft", "Preferred-FT", "pairs", {"loss.loss_type": "sft"}, ("policy",)),
        MethodSpec("best-of-n", "best-of-N", "best-of-n", {}, ("reference", "reward model")),
        MethodSpec("ppo", "PPO", "ppo", {**PPO, "sample.reward": REWARD_MODEL, "rl.value_model": REWARD_MODEL},
                   ("policy", "reference", "critic", "reward model")),
        MethodSpec("rloo", "RLOO", "rloo", {"sample.reward": REWARD_MODEL}, ("policy", "reference", "reward model")),
        MethodSpec("online-dpo", "online DPO", "online-dpo",
                   {"sample.reward": REWARD_MODEL, "train.learning_rate": 2e-5, "loss.beta": 0.1},
                   ("policy", "reference", "reward model")),
        MethodSpec("grpo", "GRPO", "grpo", {**GRPO, "sample.reward": REWARD_MODEL}, ("policy", "reward model")),
        MethodSpec("ppo-gt", "PPO-GT", "ppo", {**PPO, "sample.reward": GROUND_TRUTH},
                   ("policy", "reference", "critic")),
        MethodSpec("rloo-gt", "RLOO-GT", "rloo", {"sample.reward": GROUND_TRUTH}, ("policy", "reference")),
        MethodSpec("grpo-gt", "GRPO-GT", "grpo", {**GRPO, "sample.reward": GROUND_TRUTH}, ("policy",)),
    ]
    return rows


def selected_methods(keys: list[str], betas: list[float]) -> list[MethodSpec]:
    """The rows `keys` select, in the table's order."""
    return [spec for spec in method_table(betas) if spec.key in keys]


@dataclass(frozen=True)
class Unit:
    """One (method, label budget, seed): a process, a record file, a training folder."""

    spec: MethodSpec
    budget: int | None
    seed: int

    @property
    def name(self) -> str:
        return self.spec.slug + ("" if self.budget is None else f"-n{self.budget}") + f"-s{self.seed}"


def plan(methods: list[MethodSpec], budgets: list[int], seeds: list[int]) -> list[Unit]:
    """Every unit in run order: seed by seed (a killed study has whole seeds), the reference first (its samples
    are every point's pair), then budget by budget the reward model before the methods that need it, and the
    ground-truth ceilings last."""
    units = []
    for seed in seeds:
        units.append(Unit(REFERENCE, None, seed))
        for budget in budgets:
            if any(spec.uses_reward_model for spec in methods):
                units.append(Unit(REWARD_MODEL_SPEC, budget, seed))
            units += [Unit(spec, budget, seed) for spec in methods if spec.per_budget]
        units += [Unit(spec, None, seed) for spec in methods if not spec.per_budget]
    return units


def as_dict(points: list[Point], cost: Cost) -> dict[str, Any]:
    return {"points": [asdict(p) for p in points], "cost": asdict(cost)}


def from_dict(record: dict[str, Any]) -> tuple[list[Point], Cost]:
    return [Point(**p) for p in record["points"]], Cost(**record["cost"])
