"""One documented configuration tree for every preftune command.

Precedence, lowest first: the defaults below, a YAML file (`--config run.yaml`), then `--flag value` options.
Every field is documented once, in its `doc` metadata; the CLI help, the README's config reference and error
messages are generated from it. Flag names are the field names with dashes (`max_length` -> `--max-length`)
and follow TRL's `DPOConfig` names where the meaning is the same.

YAML files may nest fields under their section (`train: {learning_rate: 1e-6}`) or give them flat
(`learning_rate: 1e-6`); unknown or mistyped keys are errors that suggest the closest valid name.
`validate()` runs the cross-field checks; commands call it before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from preftune.errors import ConfigError

if TYPE_CHECKING:
    from preftune.objectives.losses import LossParams


def doc(text: str, default: Any = None, **kwargs: Any) -> Any:
    """A dataclass field carrying its one-line documentation."""
    return field(default=default, metadata={"doc": text}, **kwargs)


@dataclass
class ModelConfig:
    model: str | None = doc(
        "Policy to train: a local Hugging Face folder, a hub id, or a .gguf file. "
        "Unset: the embedded default, SmolLM2-135M-Instruct."
    )
    ref_model: str | None = doc(
        "Reference model, same forms as --model. Unset: a frozen copy of the starting policy "
        "(with --lora: the policy with its adapter disabled)."
    )
    trust_remote_code: bool = doc("Allow model repositories to run their own Python code. Off: never.", False)
    bf16: bool = doc("Train and evaluate under bfloat16 autocast (weights and optimizer state stay fp32).", False)
    attn_implementation: str | None = doc(
        "Attention kernel: sdpa, eager or flash_attention_2 (needs the flash-attn package and a GPU). "
        "Unset: transformers' choice."
    )
    gradient_checkpointing: bool = doc(
        "Recompute activations in the backward pass instead of storing them: less memory, about a third more "
        "compute.",
        False,
    )
    load_in_4bit: bool = doc(
        "QLoRA: load the base weights in 4-bit NF4 (bitsandbytes, CUDA GPUs only) and train a LoRA adapter on them.",
        False,
    )
    lora: bool = doc(
        "Train a LoRA adapter (peft) instead of all weights. PPO: the actor and the critic are two adapters on one "
        "frozen base (the critic's value head beside its adapter), the reference is the base with both off.",
        False,
    )
    lora_r: int = doc("LoRA rank.", 16)
    lora_alpha: int = doc("LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).", 32)
    lora_dropout: float = doc(
        "Dropout on the LoRA input, for train and reward-model: ppo, rloo, online-dpo and the study's online "
        "methods refuse it (it would make their probability ratio, old log-probs and values noisy; TRL's PPO and "
        "RLOO switch dropout off).",
        0.0,
    )
    lora_target_modules: str = doc(
        "Comma-separated module names to adapt, or 'all-linear' for every linear layer but the output head.",
        "all-linear",
    )
    merge: bool = doc("With --lora: also save the adapter merged into the base weights, as a plain model.", False)
    cache_dir: str | None = doc(
        "Where converted models and generated data are cached. Unset: $PREFTUNE_CACHE_DIR, else ~/.cache/preftune."
    )


@dataclass
class DataConfig:
    data: str | None = doc(
        "Training pairs: .jsonl, .json, .csv, .parquet (optionally .gz), a save_to_disk folder, or a hub "
        "dataset name. Unset: the default job's generated movie-review sentiment pairs."
    )
    split: str = doc("Split to read from a hub dataset or a saved DatasetDict.", "train")
    eval_data: str | None = doc("Held-out pairs, same forms as --data.")
    eval_split: str = doc("Split to read from --eval-data when it is a hub dataset or DatasetDict.", "test")
    skip_invalid: bool = doc("Drop invalid records (and report which) instead of stopping at the first.", False)
    max_length: int | None = doc(
        "Maximum tokens of prompt + completion per sequence; longer ones are truncated (see truncation_mode). "
        "Pairs whose prompt alone fills it are dropped. 0 or unset: no limit.",
        1024,
    )
    truncation_mode: str = doc(
        "keep_start: cut the end of prompt + completion (as TRL). keep_end: cut the start of the prompt so "
        "that the longer completion fits, then the completions' ends if they still do not.",
        "keep_start",
    )


@dataclass
class LossConfig:
    loss_type: str = doc(
        "Preference loss, or several separated by commas (the loss is then their weighted sum, see "
        "--loss-weights); the names are those of preftune.objectives.losses.LOSSES.",
        "sigmoid",
    )
    loss_weights: str | None = doc(
        "Comma-separated weights, one per --loss-type entry: the loss is the weighted sum of the per-loss means "
        "(TRL's MPO: sigmoid,bco_pair,sft with 0.8,0.2,1.0). Unset: 1 each."
    )
    beta: float = doc("Strength of the KL penalty towards the reference (the DPO paper's beta).", 0.1)
    label_smoothing: float = doc(
        "Probability that a preference label is flipped: cDPO with sigmoid, the noise rate of robust, the "
        "smoothing of aot and aot_unpaired (all in [0, 0.5)); EXO's epsilon with exo_pair (in (0, 1), 1e-3 "
        "suggested).",
        0.0,
    )
    f_divergence_type: str = doc(
        "Divergence from the reference (f-DPO): reverse_kl, forward_kl, js_divergence or alpha_divergence. "
        "Other than reverse_kl only with sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop (and sft "
        "beside them).",
        "reverse_kl",
    )
    f_alpha_divergence_coef: float = doc("The alpha of --f-divergence-type alpha_divergence.", 0.5)
    discopop_tau: float = doc("Temperature of discopop's logistic/exponential blend.", 0.05)
    simpo_gamma: float = doc("Target reward margin (gamma) of simpo.", 0.5)
    ld_alpha: float | None = doc(
        "LD-DPO: weight in [0, 1] of the log-probs of the tokens past the shorter completion's length. "
        "Unset: no weighting (as 1)."
    )
    use_weighting: bool = doc(
        "WPO: weight each pair's loss by the policy's length-normalised probability of both completions.", False
    )
    reference_free: bool = doc(
        "No reference model (log pi_ref = 0): no reference forward pass; rewards become beta * log pi.", False
    )
    rpo_alpha: float | None = doc(
        "RPO: add the sft term (NLL of the chosen completions) with this weight; shorthand for adding sft to "
        "--loss-type."
    )


@dataclass
class TrainConfig:
    output_dir: str | None = doc(
        "Run folder: metrics, TensorBoard logs, the final model and the resolved config. Unset: "
        "runs/preftune-<date>-<time>. A non-empty folder is refused unless --overwrite is given."
    )
    overwrite: bool = doc("Allow writing into a non-empty --output-dir (its files may be replaced).", False)
    num_epochs: float = doc("Passes over the training pairs (fractions allowed); --max-steps, when set, wins.", 1.0)
    max_steps: int = doc("Optimizer steps to run; -1: as many as num_epochs gives.", -1)
    batch_size: int = doc("Pairs per micro-batch per process.", 4)
    grad_accum: int = doc("Micro-batches accumulated per optimizer step.", 1)
    learning_rate: float = doc("Peak learning rate of AdamW.", 1e-6)
    lr_scheduler_type: str = doc("Decay after warmup: linear, cosine or constant.", "linear")
    warmup_ratio: float = doc("Fraction of the optimizer steps spent warming the learning rate up from 0.", 0.1)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    adam_beta1: float = doc("AdamW beta1.", 0.9)
    adam_beta2: float = doc("AdamW beta2.", 0.999)
    max_grad_norm: float = doc("Clip the gradient's global norm to this; 0: no clipping.", 1.0)
    seed: int = doc("Seed for initialisation, shuffling and dropout.", 42)
    logging_steps: int = doc("Log metrics every this many optimizer steps.", 1)
    report_to: str = doc(
        "Experiment trackers that receive the metrics and the resolved config, through accelerate's tracking: "
        "comma-separated names (tensorboard, wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive, swanlab), "
        "all (every one installed) or none. metrics.jsonl is written either way. TensorBoard's logs go to "
        "<output-dir>/tensorboard/<project>; the others' location is set as each tracker sets it (WANDB_MODE, "
        "MLFLOW_TRACKING_URI, ...).",
        "tensorboard",
    )
    run_name: str | None = doc("The run's name in the trackers. Unset: the run folder's name.")
    project: str = doc("The trackers' project (wandb, trackio, comet_ml; mlflow's experiment).", "preftune")
    eval_steps: float = doc(
        "Evaluate on --eval-data every this many optimizer steps; a fraction in (0, 1): that share of the run's "
        "steps (as TRL); 0: only at the end.",
        0,
    )
    eval_batch_size: int = doc("Pairs per micro-batch when evaluating.", 8)
    batch_layout: str = doc(
        "How pairs become tensors. padded: one right-padded row per sequence, chosen and rejected apart (as TRL; "
        "any attention kernel). shared_prefix: one row per pair, prompt | chosen | rejected, so the prompt is "
        "computed once; the rejected tokens do not see the chosen ones and their positions restart after the "
        "prompt (exact, arXiv:2410.20305). packed: as shared_prefix with several pairs side by side in a row "
        "(each sees only itself; rows as long as pays against attention's quadratic cost), so little padding is "
        "computed. shared_prefix and packed need sdpa or eager attention (a 4D mask). In ppo, rloo and online-dpo: "
        "the same for the sampled completions, a prompt's samples sharing its segment (prompt | sample 1 | sample 2 "
        "...).",
        "packed",
    )
    shuffle: bool = doc("Shuffle the training pairs each epoch (off: file order, as in exact comparisons).", True)
    num_processes: int = doc(
        "Processes to train in (started with torchrun; CPU processes use gloo). --batch-size is per process. "
        "Under an external torchrun or accelerate launch, leave it at 1.",
        1,
    )
    save_steps: int = doc("Write a resumable checkpoint every this many optimizer steps; 0: none.", 0)
    save_total_limit: int = doc("Keep only the newest this many checkpoints; 0: keep all.", 0)
    resume: str | None = doc(
        "Continue a run from a checkpoint: a checkpoint folder, or 'latest' (--resume alone) for the newest whole "
        "checkpoint in --output-dir. The run's settings must match the checkpoint's."
    )
    max_bad_steps: int = doc(
        "Stop (with a checkpoint) after this many optimizer steps in a row had a non-finite loss or gradient; "
        "such steps are skipped with a warning. In ppo, rloo and online-dpo a rollout's minibatch steps count, "
        "across rollouts.",
        3,
    )
    sync_ref_model: bool = doc(
        "TR-DPO: move the reference model towards the policy every --ref-model-sync-steps optimizer steps "
        "(needs a separate reference: not with --lora or --reference-free).",
        False,
    )
    ref_model_mixup_alpha: float = doc(
        "TR-DPO's alpha: each update sets the reference to alpha * policy + (1 - alpha) * reference.", 0.6
    )
    ref_model_sync_steps: int = doc(
        "TR-DPO's tau: optimizer steps between reference updates. online-dpo updates the reference between "
        "rollouts (a rollout's reference log-probs are computed when it is sampled): there it must be a multiple "
        "of a rollout's optimizer steps, --num-ppo-epochs x --num-mini-batches.",
        512,
    )
    precompute_ref_log_probs: bool = doc(
        "Compute the reference log-probs of every training and evaluation pair once, before training, and cache "
        "them on disk (under --cache-dir, keyed by the reference weights, the token ids and the settings that "
        "change them); later runs on the same pairs (a beta sweep) read them back. No reference model is held "
        "while training.",
        False,
    )


@dataclass
class SampleConfig:
    """Sampling, scoring and judging: `preftune generate`, `score`, `judge` (and the default job's sampling)."""

    prompts: str | None = doc(
        "JSONL file of prompts, one object per line: {\"prompt\": text or messages}; for `score`, also "
        "\"responses\": [text or messages, ...], the candidates to rank."
    )
    output: str | None = doc("Where generate / score / judge write their records (.jsonl or .csv). Unset: stdout.")
    num_samples: int = doc("Samples per prompt.", 1)
    temperature: float = doc("Sampling temperature (1: the model's distribution).", 1.0)
    top_p: float = doc("Nucleus sampling: keep the smallest set of tokens with this much probability (1: all).", 1.0)
    max_new_tokens: int = doc("Tokens sampled per completion at most.", 64)
    reward: str = doc(
        "Ground-truth reward for `judge`, and what the online recipes maximise; several separated by commas are "
        "summed with --reward-weights (TRL's reward_funcs; a completion every one returns None for is skipped). "
        "Each is 'sentiment' (VADER), 'accuracy' or 'format' (the arithmetic task's checker: the final number "
        "against the prompt's answer column; the number alone), 'module:function' (a Python callable, imported "
        "only when named here: with keyword parameters it is called as TRL calls a reward function, "
        "f(prompts=..., completions=..., completion_ids=..., **columns) with the prompts file's other columns as "
        "lists, else f(prompt, completion) on one sample's texts; it returns a float, or None where it cannot "
        "judge: skipped in training), or a folder / hub id of a sequence-classification reward model. A reward "
        "that raises or returns anything else (a string, NaN, infinity) stops the command (exit 2).",
        "sentiment",
    )
    reward_weights: str | None = doc(
        "Comma-separated weights, one per --reward entry: a completion's reward is the weighted sum of the "
        "rewards that judged it (TRL's reward_weights). Unset: 1 each."
    )
    eval_reward: str | None = doc(
        "The reward the held-out measurement of `ppo`, `rloo` and `online-dpo` reports (the same forms as --reward): "
        "the ground truth, when --reward is a learned reward model. Unset: --reward; on the default job's prompts, "
        "'sentiment' (the reward that labelled its pairs)."
    )


@dataclass
class RewardModelConfig:
    """`preftune reward-model`: a Bradley-Terry reward model trained on the pairs."""

    center_rewards_coefficient: float | None = doc(
        "Add this times the mean of (r(x, y_chosen) + r(x, y_rejected))^2 to the loss, so that rewards centre on 0 "
        "(Eisenstein et al. 2023, arXiv:2312.09244, eq. 2; 0.01 suggested). Unset: no centering term."
    )


@dataclass
class RLConfig:
    """`preftune ppo`, `rloo`, `online-dpo` and `grpo`: training on the policy's own samples, scored by --reward
    (TRL's names)."""

    num_generations: int = doc(
        "Completions sampled per prompt in each rollout (RLOO's k, at least 2: each is baselined by the others).", 2
    )
    rollout_batch_size: int = doc(
        "Prompts per rollout per process (each sampled --num-generations times). Every rollout is a full one: the "
        "prompts left over at the end of an epoch, fewer than --rollout-batch-size x processes, are skipped that "
        "epoch (TRL's drop_last; with --shuffle another few each epoch).",
        8,
    )
    num_ppo_epochs: int | None = doc(
        "Optimisation passes over each rollout (TRL RLOO's num_iterations). Unset: 4 for ppo, 1 for rloo and "
        "online-dpo."
    )
    num_mini_batches: int = doc(
        "Equal minibatches each pass splits a process's rollout into, one optimizer step each: must divide its "
        "completions (--rollout-batch-size x --num-generations; online-dpo: its pairs, --rollout-batch-size).",
        1,
    )
    local_rollout_forward_batch_size: int = doc(
        "Samples per forward in every phase of a rollout (sampling with its log-probs, the reference's log-probs, "
        "PPO's critic, a reward model) and per forward/backward of the loss (a minibatch's micro-batches, their "
        "gradients accumulated to the minibatch's exactly; online-dpo's losses that couple pairs, aot and sft, run "
        "a minibatch whole): peak memory follows this size, not the rollout's (TRL's name; TRL micro-batches the "
        "loss by per_device_train_batch_size).",
        64,
    )
    kl_coef: float = doc(
        "Weight of the KL penalty -kl_coef * (log pi - log pi_ref) in the reward (the starting value with "
        "--kl-target).",
        0.05,
    )
    kl_target: float | None = doc(
        "Adapt kl_coef towards this KL per completion, in nats (Ziegler et al. 2019's controller), starting from "
        "--kl-coef (> 0: the controller multiplies it). Unset: fixed."
    )
    kl_horizon: int = doc(
        "The adaptive controller's horizon, in completions: after a rollout of N completions (all processes') "
        "kl_coef is multiplied by 1 + e * N / horizon, e = clip(KL / target - 1, -0.2, 0.2). Refused (not clamped) "
        "unless horizon > N / 5, so that the factor stays positive.",
        10000,
    )
    cliprange: float = doc("Clipping of the probability ratio in the surrogate objective (PPO's epsilon).", 0.2)
    cliprange_value: float = doc("PPO: clipping of the value prediction around its rollout value.", 0.2)
    vf_coef: float = doc("PPO: weight of the value loss.", 0.1)
    gamma: float = doc("PPO: discount factor of GAE.", 1.0)
    lam: float = doc("PPO: lambda of GAE.", 0.95)
    whiten_rewards: bool = doc("PPO: whiten the per-token rewards of each rollout (scale only).", False)
    normalize_advantages: bool = doc(
        "RLOO: normalise the advantages over each rollout (every process's samples, as TRL) to mean 0, std 1.", False
    )
    missing_eos_penalty: float | None = doc(
        "Subtract this from the score of a completion that did not end (no EOS within --max-new-tokens)."
    )
    num_iterations: int = doc(
        "GRPO: optimisation passes over each rollout (TRL GRPO's num_iterations, mu; ppo, rloo and online-dpo: "
        "--num-ppo-epochs). Past the first, the ratio to the sampling policy moves and the clip acts.",
        1,
    )
    epsilon: float = doc(
        "GRPO: lower clip of the importance weight, 1 - epsilon (TRL's epsilon; ppo and rloo: --cliprange).", 0.2
    )
    epsilon_high: float | None = doc(
        "GRPO: upper clip, 1 + epsilon_high (DAPO's clip-higher: 0.28); cispo's cap of the weight itself (ScaleRL: "
        "5). Unset: --epsilon."
    )
    delta: float | None = doc(
        "GRPO: two-sided clipping (INTELLECT-2): the unclipped weight is capped at delta (> 1; above 1 + "
        "epsilon_high, as TRL recommends). Unset: none."
    )
    scale_rewards: str = doc(
        "GRPO: divide each advantage r - mean(group) by the group's reward std (group), the whole rollout's over "
        "every process (batch), or nothing (none, Dr. GRPO); + 1e-4, as TRL.",
        "group",
    )
    importance_sampling_level: str = doc(
        "GRPO: the importance weight pi / pi_old per token (token), or one per completion, the exp of its tokens' "
        "mean log-ratio (sequence: GSPO).",
        "token",
    )
    mask_truncated_completions: bool = doc(
        "GRPO: leave out of the loss the completions that did not end (no EOS within --max-new-tokens), as DAPO; "
        "they still count in their group's advantages.",
        False,
    )
    top_entropy_quantile: float = doc(
        "GRPO: train only on the tokens whose entropy is in this top quantile of a micro-batch's (every process's) "
        "completion tokens (Beyond the 80/20 Rule: 0.2); 1: all tokens.",
        1.0,
    )
    sapo_temperature_pos: float = doc("GRPO --loss-type sapo: the gate's temperature where the advantage is > 0.", 1.0)
    sapo_temperature_neg: float = doc("GRPO --loss-type sapo: the gate's temperature elsewhere.", 1.05)
    value_model: str | None = doc(
        "PPO's critic to start from: a reward-model folder (`preftune reward-model`) or any model with a one-output "
        "sequence-classification head. Unset: the policy's starting weights with a new value head. With --lora the "
        "critic is an adapter on the policy's base: a LoRA reward model on that base gives its adapter and head, a "
        "full one its head alone."
    )


def parse_reward_list(spec: str, weights: str | None = None) -> tuple[list[str], list[float]]:
    """'accuracy,format' and '1,0.5' -> the reward specs and their weights (1 each when no weights are given), as
    --loss-type and --loss-weights are read; ValueError on bad text."""
    specs = [name.strip() for name in spec.split(",")]
    if not all(specs):
        raise ValueError(f"--reward '{spec}' has an empty name; give rewards separated by commas")
    if weights is None:
        return specs, [1.0] * len(specs)
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        raise ValueError(f"--reward-weights '{weights}' is not a comma-separated list of numbers") from None
    if len(values) != len(specs):
        raise ValueError(f"--reward-weights gives {len(values)} weights for the {len(specs)} rewards of --reward "
                         f"'{spec}'; give one weight per reward")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"--reward-weights must be finite numbers, got '{weights}'")
    return specs, values


TASKS = ("sentiment", "arithmetic")  # --task: the built-in tasks (preftune/tasks/)


def resolved_task(config: Config, command: str) -> str:
    """--task, or the command's default: the verifiable arithmetic task for grpo, the sentiment job otherwise."""
    return config.default_job.task or ("arithmetic" if command == "grpo" else "sentiment")


# `preftune study --methods`: the names of its methods (study/methods.py's METHODS table builds them); the reward
# model of each label budget is trained first where a method needs it
STUDY_METHODS = ("dpo", "preferred-ft", "best-of-n", "ppo", "rloo", "online-dpo", "grpo", "ppo-gt", "rloo-gt",
                 "grpo-gt")
# those that run an online recipe
STUDY_ONLINE_METHODS = ("ppo", "rloo", "online-dpo", "grpo", "ppo-gt", "rloo-gt", "grpo-gt")
# what the study measures with unless the user sets it: sized so that the default study fits 2 hours on 2 CPU cores
# (docs/results/study.md: its measured run)
STUDY_DEFAULTS: dict[str, Any] = {"default_job.num_eval_prompts": 32, "default_job.samples_per_eval_prompt": 1}
# ... and on the arithmetic task, whose 0-or-1 accuracy needs more held-out problems (its replies are shorter)
ARITHMETIC_STUDY_DEFAULTS: dict[str, Any] = {"default_job.num_eval_prompts": 64}
# what --quick sets unless the user set it: a study of a few seconds a point, for tests and a first look
STUDY_QUICK: dict[str, Any] = {
    "study.label_budgets": "4,8", "study.seeds": "0,1", "study.rollouts": 2, "study.epochs": 1.0,
    "study.best_of": 4, "default_job.num_prompts": 16, "default_job.num_eval_prompts": 4,
    "default_job.samples_per_eval_prompt": 1, "sample.max_new_tokens": 6,
}


@dataclass
class StudyConfig:
    """`preftune study` (alias `preftune frontier`): DPO against reward model + RL on the same labels."""

    methods: str = doc(
        "preftune study: the methods, comma-separated: dpo (every --betas), preferred-ft (SFT on the chosen "
        "replies), best-of-n, ppo, rloo, online-dpo, grpo (these five against a reward model fit to the budget's "
        "labels), ppo-gt, rloo-gt and grpo-gt (against --ground-truth itself: ceilings, no labels).",
        "dpo,rloo,ppo,online-dpo,grpo",
    )
    betas: str = doc("preftune study: the DPO betas, comma-separated (each a method of its own).", "0.1")
    label_budgets: str = doc(
        "preftune study: labelled pairs each method may use, comma-separated: the first N of a seeded shuffle of "
        "the training pairs, the same N for every method (the reward model of a budget sees those N alone).",
        "8,16,32,64",
    )
    seeds: str = doc(
        "preftune study: seeds, comma-separated; a seed picks the label subset, the initialisation order and the "
        "sampling of every method.", "0,1,2",
    )
    kl_budgets: str = doc(
        "preftune study: KL budgets (nats) of the matched-KL comparison: each method's best held-out reward among "
        "its points with KL(policy || reference) within each.", "0.5,1,2",
    )
    ground_truth: str | None = doc(
        "preftune study: the reward that judges held-out samples (and the -gt methods train on): sentiment, "
        "module:function, or a reward-model folder (a gold judge). Needed with --data; unset: the built-in task's "
        "sentiment.",
    )
    rollouts: int = doc("preftune study: rollouts each online method runs (its stopping rule).", 3)
    epochs: float = doc(
        "preftune study: passes over its labels DPO, Preferred-FT and the reward model make (their stopping rule).",
        2.0,
    )
    points: int = doc("preftune study: held-out measurements along each method's training, evenly spaced.", 2)
    best_of: int = doc("preftune study: best-of-n's largest N (its points: N = 1, 2, 4, ... up to it).", 16)
    quick: bool = doc(
        "preftune study: a preset of a few seconds a point (tiny budgets, 2 seeds, 2 rollouts, 4 held-out prompts, "
        "6 new tokens) for tests and a first look; options you set keep their value.", False,
    )


@dataclass
class DefaultJobConfig:
    """The default job (no --data): the DPO paper's controlled-sentiment experiment in miniature."""

    num_prompts: int = doc("Default job: movie-review prompts to build preference pairs from.", 256)
    num_eval_prompts: int = doc("Default job: held-out prompts for the before/after reward report.", 64)
    samples_per_eval_prompt: int = doc("Default job: samples per held-out prompt from each model.", 2)
    task: str | None = doc(
        "The built-in task run without --data or --prompts: sentiment (movie-review requests, VADER's sentiment as "
        "the ground truth) or arithmetic (short problems with an exact answer: --reward accuracy and format, "
        "held-out accuracy). Unset: sentiment; arithmetic for grpo."
    )


# Training settings the default job uses unless the user sets them: enough learning signal for a few minutes of
# CPU on ~240 pairs (the library defaults, TRL's, suit large data sets and move a policy little in 30 steps).
DEFAULT_JOB_OVERRIDES: dict[str, Any] = {
    "train.learning_rate": 2e-5,
    "train.batch_size": 8,
    "train.num_epochs": 1.0,
    "train.warmup_ratio": 0.1,
    "train.eval_batch_size": 16,
    "data.max_length": 128,
    "sample.max_new_tokens": 24,
}

# What `preftune reward-model` (and the frontier's reward model) uses on the default job's pairs on top of those: a
# new score head fit to ~240 pairs needs more than one pass at DPO's rate (TRL's RewardTrainer trains 3 epochs).
# Measured on 243 held-out pairs: 1 epoch at 2e-5 (8 pairs a step) 0.556 held-out accuracy, these 0.671.
REWARD_MODEL_DEFAULT_JOB_OVERRIDES: dict[str, Any] = {
    "train.num_epochs": 3.0,
    "train.learning_rate": 5e-5,
    "train.batch_size": 4,
}


def apply_unset(config: Config, settings: dict[str, Any]) -> None:
    """Set each of `settings` (dotted keys) the user did not set: a job's own defaults."""
    for key, value in settings.items():
        if key not in config.explicitly_set:
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    default_job: DefaultJobConfig = field(default_factory=DefaultJobConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    # Fields the user set (YAML or flags), as "section.name": lets checks tell "left at default" from "asked for".
    explicitly_set: set[str] = field(default_factory=set, repr=False, compare=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.name != "explicitly_set")


def iter_fields() -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Yield (section, field) for every option in the tree."""
    for section_field in dataclasses.fields(Config):
        if section_field.name == "explicitly_set":
            continue
        section_type = typing.get_type_hints(Config)[section_field.name]
        for f in dataclasses.fields(section_type):
            yield section_field.name, f


def field_type(section: str, name: str) -> Any:
    section_type = typing.get_type_hints(Config)[section]
    return typing.get_type_hints(section_type)[name]


FIELD_SECTION: dict[str, str] = {f.name: section for section, f in iter_fields()}


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError naming the key."""
    args = typing.get_args(annotation)
    optional = type(None) in args if isinstance(annotation, types.UnionType) else False
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    if value is None or (isinstance(value, str) and value.lower() in {"none", "null"} and base is not str):
        if optional:
            return None
        raise ConfigError(f"option '{key}': expected {base.__name__}, got nothing")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on"}:
                return True
            if isinstance(value, str) and value.lower() in {"false", "no", "0", "off"}:
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option '{key}': expected {base.__name__}, got {value!r}") from None
    raise TypeError(f"unsupported config type {annotation} for {key}")


def suggest(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def set_option(config: Config, key: str, value: Any, origin: str) -> None:
    """Set `key` ("section.name" or a bare field name) on `config`, with type checking."""
    section, _, name = key.rpartition(".")
    if not section:
        if name not in FIELD_SECTION:
            raise ConfigError(f"{origin}: unknown option '{name}'{suggest(name, FIELD_SECTION)}")
        section = FIELD_SECTION[name]
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section '{section}'{suggest(section, SECTIONS)}")
    section_fields = {f.name for f in dataclasses.fields(getattr(config, section))}
    if name not in section_fields:
        raise ConfigError(f"{origin}: unknown option '{section}.{name}'{suggest(name, section_fields)}")
    setattr(getattr(config, section), name, coerce(value, field_type(section, name), f"{section}.{name}"))
    config.explicitly_set.add(f"{section}.{name}")


def apply_yaml(config: Config, path: str | Path) -> None:
    """Override `config` with the options in a YAML file (nested by section, or flat)."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if loaded is None:
        return
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(loaded).__name__}")
    for key, value in loaded.items():
        if key in SECTIONS and isinstance(value, dict):
            for name, inner in value.items():
                set_option(config, f"{key}.{name}", inner, str(path))
        else:
            set_option(config, str(key), value, str(path))


def save_yaml(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def loss_params(options: LossConfig) -> LossParams:
    """The loss section as the losses' plain values, for training and `preftune eval` alike (after `validate`)."""
    from preftune.objectives.losses import LossParams

    return LossParams.from_options(**dataclasses.asdict(options))


def check_loss_options(
    options: LossConfig,
    need: Callable[[bool, str], None],
    unused: Callable[[str, typing.Iterable[str], str], None],
) -> None:
    """`validate`'s checks of the loss section, reported through its `need` and `unused`: one pass over the rows
    of preftune.objectives.losses.LOSSES, which say which options each loss reads. Unknown names, wrong weight
    counts and out-of-range values are problems, and so is a changed option that none of the chosen losses reads
    or that one of them has no valid form for."""
    from preftune.objectives.losses import F_DIVERGENCES, LOSSES, parse_loss_list

    try:
        names, weights = parse_loss_list(options.loss_type, options.loss_weights)
    except ValueError as error:
        need(False, str(error))
        return
    unknown = [name for name in names if name not in LOSSES]
    for name in unknown:
        need(False, f"--loss-type '{name}' is unknown; choose one of: {', '.join(LOSSES)}")
    if unknown:
        return
    chosen = {name: LOSSES[name] for name in names}
    need(len(chosen) == len(names), f"--loss-type '{options.loss_type}' names a loss twice")
    need(all(math.isfinite(w) and w > 0 for w in weights), f"--loss-weights must be > 0, got {options.loss_weights}")
    need(math.isfinite(options.beta) and options.beta > 0, f"--beta must be > 0, got {options.beta}")

    for f in dataclasses.fields(LossConfig):  # an option that some losses read, but none of the chosen ones
        readers = [name for name, spec in LOSSES.items() if spec.reads_option(f.name)]
        if f.name == "label_smoothing":  # by range, as in the option's doc: the [0, 0.5) ones first
            readers.sort(key=lambda name: LOSSES[name].label_smoothing)
        if readers and not any(spec.reads_option(f.name) for spec in chosen.values()):
            unused("loss", [f.name], f"with --loss-type {', '.join(names)} (read only by {', '.join(readers)})")

    smoothing = options.label_smoothing
    for name, spec in chosen.items():
        if spec.label_smoothing is not None:
            low, high, closed = spec.label_smoothing
            inside = (low <= smoothing if closed else low < smoothing) and smoothing < high
            need(inside, f"--label-smoothing must be in {'[' if closed else '('}{low:g}, {high:g}) for {name}, "
                         f"got {smoothing}" + (" (the EXO paper suggests 1e-3)" if name == "exo_pair" else ""))

    kind = options.f_divergence_type
    if kind not in F_DIVERGENCES:
        need(False, f"--f-divergence-type '{kind}' is unknown; choose one of: {', '.join(F_DIVERGENCES)}")
    elif kind != "reverse_kl":
        others = [name for name, spec in chosen.items() if spec.f_divergence is False]
        valid = [name for name, spec in LOSSES.items() if spec.f_divergence is not False]
        need(not others, f"--f-divergence-type {kind} has no valid form for {', '.join(others)}: f-DPO's "
                         f"normaliser cancels only in the losses of the chosen-minus-rejected score "
                         f"({', '.join(valid)})")
    if kind != "alpha_divergence":
        unused("loss", ["f_alpha_divergence_coef"], "without --f-divergence-type alpha_divergence")
    need(math.isfinite(options.f_alpha_divergence_coef),
         f"--f-alpha-divergence-coef must be finite, got {options.f_alpha_divergence_coef}")

    need(math.isfinite(options.discopop_tau) and options.discopop_tau > 0,
         f"--discopop-tau must be > 0, got {options.discopop_tau}")
    need(math.isfinite(options.simpo_gamma) and options.simpo_gamma >= 0,
         f"--simpo-gamma must be >= 0, got {options.simpo_gamma}")
    if options.ld_alpha is not None:
        need(0 <= options.ld_alpha <= 1, f"--ld-alpha must be in [0, 1], got {options.ld_alpha}")
    if options.use_weighting:
        sorting = [name for name, spec in chosen.items() if not spec.per_pair]
        need(not sorting, f"--use-weighting has no per-pair meaning for {', '.join(sorting)}: it sorts the batch, "
                          "so row i's loss is not pair i's")
    if options.rpo_alpha is not None:
        need(math.isfinite(options.rpo_alpha) and options.rpo_alpha > 0,
             f"--rpo-alpha must be > 0, got {options.rpo_alpha}")
        need("sft" not in names, "--rpo-alpha adds the sft term, which --loss-type already has; set its weight "
                                 "with --loss-weights instead")


Check = typing.Callable[[bool, str], None]  # need(condition, message): a problem unless the condition holds
Unused = typing.Callable[[str, typing.Iterable[str], str], None]  # unused(section, names, reason)


def _check_reference(config: Config, command: str, need: Check, unused: Unused) -> None:
    """The loss options and the reference model: TR-DPO, reference-free, precomputed."""
    m, lo, t = config.model, config.loss, config.train
    if command != "grpo":  # grpo's --loss-type and --beta are its own (`_check_grpo`)
        check_loss_options(lo, need, unused)
    if lo.reference_free:
        unused("model", ["ref_model"], "with --reference-free (no reference model is used)")
    if t.sync_ref_model:
        need(not m.lora, "--sync-ref-model needs a separate reference model to update: not with --lora (as TRL)")
        need(not lo.reference_free, "--sync-ref-model has no reference model to update with --reference-free")
        need(t.resume is None, "--resume cannot continue a --sync-ref-model run: checkpoints do not hold the "
                               "updated reference model")
        need(0 < t.ref_model_mixup_alpha <= 1, f"--ref-model-mixup-alpha must be in (0, 1], got "
                                               f"{t.ref_model_mixup_alpha}")
        need(t.ref_model_sync_steps >= 1, f"--ref-model-sync-steps must be >= 1, got {t.ref_model_sync_steps}")
        per_rollout = optimizer_steps_per_rollout(config, command)
        need(command != "online-dpo" or t.ref_model_sync_steps % per_rollout == 0,
             f"--ref-model-sync-steps counts optimizer steps, and online-dpo updates the reference between rollouts: "
             f"it must be a multiple of a rollout's {per_rollout} optimizer steps (--num-ppo-epochs x "
             f"--num-mini-batches), got {t.ref_model_sync_steps}")
        need(not t.precompute_ref_log_probs, "--precompute-ref-log-probs fixes the reference log-probs before "
                                             "training: not with --sync-ref-model, which updates the reference")
    else:
        unused("train", ["ref_model_mixup_alpha", "ref_model_sync_steps"], "without --sync-ref-model")
    if lo.reference_free:
        unused("train", ["precompute_ref_log_probs"], "with --reference-free (no reference model is used)")


def _check_training(config: Config, command: str, need: Check, unused: Unused) -> None:
    """Data shaping, the optimizer and schedule, evaluation, processes and checkpoints."""
    from preftune.data.batching import LAYOUTS  # imported here: data/batching.py imports torch

    m, d, t = config.model, config.data, config.train
    need(d.max_length is None or d.max_length >= 0, f"--max-length must be >= 0, got {d.max_length}")
    need(d.truncation_mode in {"keep_start", "keep_end"},
         f"--truncation-mode must be keep_start or keep_end, got '{d.truncation_mode}'")
    need(t.batch_size >= 1, f"--batch-size must be >= 1, got {t.batch_size}")
    need(t.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {t.eval_batch_size}")
    need(t.grad_accum >= 1, f"--grad-accum must be >= 1, got {t.grad_accum}")
    need(t.learning_rate > 0, f"--learning-rate must be > 0, got {t.learning_rate}")
    need(t.num_epochs > 0, f"--num-epochs must be > 0, got {t.num_epochs}")
    need(t.max_steps == -1 or t.max_steps >= 1, f"--max-steps must be >= 1 (or -1), got {t.max_steps}")
    need(0 <= t.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {t.warmup_ratio}")
    need(t.lr_scheduler_type in {"linear", "cosine", "constant"},
         f"--lr-scheduler-type must be linear, cosine or constant, got '{t.lr_scheduler_type}'")
    need(t.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {t.max_grad_norm}")
    need(t.weight_decay >= 0, f"--weight-decay must be >= 0, got {t.weight_decay}")
    need(t.logging_steps >= 1, f"--logging-steps must be >= 1, got {t.logging_steps}")
    if t.report_to.strip() == "none":
        unused("train", ["run_name", "project"], "with --report-to none (they name the trackers' run)")
    need(t.eval_steps >= 0 and (t.eval_steps < 1 or float(t.eval_steps).is_integer()),
         f"--eval-steps must be a whole number of steps or a fraction in (0, 1), got {t.eval_steps}")
    need(t.batch_layout in LAYOUTS, f"--batch-layout must be one of {', '.join(LAYOUTS)}, got '{t.batch_layout}'")
    need(t.batch_layout == "padded" or m.attn_implementation in {None, "sdpa", "eager"},
         f"--batch-layout {t.batch_layout} needs a 4D attention mask, which sdpa and eager attention take; "
         f"with --attn-implementation {m.attn_implementation} use --batch-layout padded")
    need(t.num_processes >= 1, f"--num-processes must be >= 1, got {t.num_processes}")
    need(t.num_processes == 1 or d.data is not None or config.sample.prompts is not None,
         "--num-processes > 1 needs --data (or --prompts): the default job runs in one process")
    need(t.save_steps >= 0, f"--save-steps must be >= 0, got {t.save_steps}")
    need(t.save_total_limit >= 0, f"--save-total-limit must be >= 0, got {t.save_total_limit}")
    need(t.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {t.max_bad_steps}")
    if t.save_steps == 0:
        unused("train", ["save_total_limit"], "without --save-steps")


def _check_model(config: Config, command: str, need: Check, unused: Unused) -> None:
    """LoRA, quantization and the attention kernel."""
    m = config.model
    need(m.lora_r >= 1, f"--lora-r must be >= 1, got {m.lora_r}")
    need(0 <= m.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {m.lora_dropout}")
    need(m.attn_implementation in {None, "sdpa", "eager", "flash_attention_2", "flex_attention"},
         f"--attn-implementation must be sdpa, eager, flash_attention_2 or flex_attention, got "
         f"'{m.attn_implementation}'")
    need(not m.load_in_4bit or m.lora, "--load-in-4bit trains a LoRA adapter on 4-bit weights: add --lora")
    if not m.lora:
        unused("model", ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "merge"], "without --lora")


def _check_command_scope(config: Config, command: str, need: Check, unused: Unused) -> None:
    """Options that belong to another command, or to the default job, or need a file not given."""
    d = config.data
    if d.eval_data is None:
        unused("data", ["eval_split"], "without --eval-data")
        # the default job (no --data, no --prompts) measures on its own held-out pairs and prompts
        if d.data is not None or config.sample.prompts is not None or command not in DEFAULT_JOB_COMMANDS:
            unused("train", ["eval_steps"], "without --eval-data")
    if d.data is None:
        unused("data", ["split", "skip_invalid"], "without --data (the default job builds its own pairs)")
    else:  # preftune study measures the user's held-out prompts with --samples-per-eval-prompt samples each
        unused("default_job", [f.name for f in dataclasses.fields(DefaultJobConfig)
                               if not (command == "study" and f.name == "samples_per_eval_prompt")],
               "with --data (it configures the default job, which runs only without --data)")
    if command != "reward-model":
        unused("reward_model", [f.name for f in dataclasses.fields(RewardModelConfig)],
               f"in {command} (it configures preftune reward-model)")
    coefficient = config.reward_model.center_rewards_coefficient
    need(coefficient is None or coefficient >= 0,
         f"--center-rewards-coefficient must be >= 0, got {coefficient}")


def number_list(text: str, kind: type = float) -> list:
    """'0.1, 0.5' -> [0.1, 0.5] (a ValueError for anything else)."""
    return [kind(item) for item in text.split(",")]


def _check_study(config: Config, command: str, need: Check, unused: Unused) -> None:
    """preftune study's options: its lists, and the user's data with the reward that judges it."""
    s = config.study
    if command != "study":
        unused("study", [f.name for f in dataclasses.fields(StudyConfig)],
               f"in {command} (it configures preftune study)")
        return
    for name in s.methods.split(","):
        need(name.strip() in STUDY_METHODS, f"--methods: '{name.strip()}' is not a method; choose from "
                                            f"{', '.join(STUDY_METHODS)}")
    for option, text, kind, least in (("--betas", s.betas, float, 0.0), ("--label-budgets", s.label_budgets, int, 1),
                                      ("--seeds", s.seeds, int, 0), ("--kl-budgets", s.kl_budgets, float, 0.0)):
        try:
            values = number_list(text, kind)
            need(all(v > least if kind is float else v >= least for v in values) and len(set(values)) == len(values),
                 f"{option} must be distinct {'positive numbers' if kind is float else f'whole numbers >= {least}'}, "
                 f"got '{text}'")
        except ValueError:
            need(False, f"{option}: expected comma-separated {'numbers' if kind is float else 'whole numbers'}, got "
                        f"'{text}'")
    need(s.rollouts >= 1, f"--rollouts must be >= 1, got {s.rollouts}")
    need(s.epochs > 0, f"--epochs must be > 0, got {s.epochs}")
    need(s.points >= 1, f"--points must be >= 1, got {s.points}")
    need(s.best_of >= 1, f"--best-of must be >= 1, got {s.best_of}")
    d = config.data
    need(d.data is None or s.ground_truth is not None,
         "preftune study --data needs --ground-truth (sentiment, module:function or a reward-model folder): the "
         "reward that judges the held-out samples")
    need(d.data is None or config.default_job.task is None,
         f"preftune study --task {config.default_job.task} runs the built-in task; with --data the study runs on "
         "your pairs (leave --task out)")
    need((d.data is None) == (d.eval_data is None),
         "preftune study takes --data and --eval-data together (labelled pairs, and held-out pairs or prompts), or "
         "neither (the built-in task)")


def _check_sampling(config: Config, command: str, need: Check, unused: Unused) -> None:
    """generate / score / judge sampling, and the default job's sizes."""
    sample_fields = [f.name for f in dataclasses.fields(SampleConfig)]
    if command == "train":  # train samples only for report.md (and the default job), with --max-new-tokens
        unused("sample", [n for n in sample_fields if n != "max_new_tokens"],
               "in train (it configures generate, score and judge)")
    sample_options = config.sample
    need(command not in ("generate", "judge") or sample_options.prompts is not None,
         f"preftune {command} needs --prompts (a JSONL file of prompts)")
    need(sample_options.temperature > 0, f"--temperature must be > 0, got {sample_options.temperature}")
    need(0 < sample_options.top_p <= 1, f"--top-p must be in (0, 1], got {sample_options.top_p}")
    need(sample_options.num_samples >= 1, f"--num-samples must be >= 1, got {sample_options.num_samples}")
    need(sample_options.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {sample_options.max_new_tokens}")
    for name in ("num_prompts", "num_eval_prompts", "samples_per_eval_prompt"):
        value = getattr(config.default_job, name)
        need(value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        parse_reward_list(sample_options.reward, sample_options.reward_weights)
    except ValueError as error:
        need(False, str(error))
    if sample_options.eval_reward is not None:
        need("," not in sample_options.eval_reward, f"--eval-reward takes one reward (the held-out measurement's "
                                                   f"ground truth), got '{sample_options.eval_reward}'")
    task = config.default_job.task
    need(task is None or task in TASKS, f"--task must be one of {', '.join(TASKS)}, got '{task}'")
    need(task in (None, "sentiment") or command in TASK_COMMANDS,
         f"--task {task} runs in {', '.join(TASK_COMMANDS)}, not in {command}")


RL_COMMANDS = ("ppo", "rloo", "online-dpo", "grpo")
# RLConfig's fields that only grpo reads (TRL GRPOConfig's names)
GRPO_FIELDS = ("num_iterations", "epsilon", "epsilon_high", "delta", "scale_rewards", "importance_sampling_level",
               "mask_truncated_completions", "top_entropy_quantile", "sapo_temperature_pos", "sapo_temperature_neg")
# grpo's own defaults, where they differ from the shared fields' (TRL GRPOConfig's)
GRPO_DEFAULTS = {"loss.loss_type": "dapo", "loss.beta": 0.0}


def apply_command_defaults(config: Config, command: str) -> None:
    """The command's own defaults of the options the user left unset (grpo: --loss-type dapo, --beta 0, as TRL):
    the CLI and the API apply them before `validate`."""
    if command == "grpo":
        apply_unset(config, GRPO_DEFAULTS)
# the commands that run on the default job's pairs or prompts when given no --data
DEFAULT_JOB_COMMANDS = ("train", "reward-model", *RL_COMMANDS)
# the commands that run any built-in task (--task), grpo's included once it exists
TASK_COMMANDS = tuple(dict.fromkeys(("train", *RL_COMMANDS, "grpo", "study")))


def _check_rl(config: Config, command: str, need: Check, unused: Unused) -> None:
    """The online recipes' options, and the DPO-only options they do not read."""
    r = config.rl
    if command not in RL_COMMANDS:
        unused("rl", [f.name for f in dataclasses.fields(RLConfig)],
               f"in {command} (it configures ppo, rloo, online-dpo and grpo)")
        return
    if command == "grpo":
        _check_grpo(config, need, unused)
    else:
        unused("rl", GRPO_FIELDS, f"in {command} (TRL GRPO's options: they configure grpo)")
    need(r.num_generations >= 1, f"--num-generations must be >= 1, got {r.num_generations}")
    need(command != "online-dpo" or r.num_generations == 2,
         f"online-dpo ranks two samples per prompt into a pair: --num-generations must be 2, got {r.num_generations}")
    need(command != "rloo" or r.num_generations >= 2,
         f"rloo baselines each sample by the other samples of its prompt: --num-generations must be >= 2, got "
         f"{r.num_generations}")
    need(r.rollout_batch_size >= 1, f"--rollout-batch-size must be >= 1, got {r.rollout_batch_size}")
    need(r.num_ppo_epochs is None or r.num_ppo_epochs >= 1, f"--num-ppo-epochs must be >= 1, got {r.num_ppo_epochs}")
    need(r.local_rollout_forward_batch_size >= 1,
         f"--local-rollout-forward-batch-size must be >= 1, got {r.local_rollout_forward_batch_size}")
    need(math.isfinite(r.kl_coef) and r.kl_coef >= 0, f"--kl-coef must be >= 0, got {r.kl_coef}")
    need(r.kl_target is None or r.kl_target > 0, f"--kl-target must be > 0, got {r.kl_target}")
    need(r.kl_horizon >= 1, f"--kl-horizon must be >= 1, got {r.kl_horizon}")
    need(r.cliprange > 0, f"--cliprange must be > 0, got {r.cliprange}")
    need(r.cliprange_value > 0, f"--cliprange-value must be > 0, got {r.cliprange_value}")
    need(r.vf_coef >= 0, f"--vf-coef must be >= 0, got {r.vf_coef}")
    need(0 <= r.gamma <= 1 and 0 <= r.lam <= 1, f"--gamma and --lam must be in [0, 1], got {r.gamma}, {r.lam}")
    if r.kl_target is None:
        unused("rl", ["kl_horizon"], "without --kl-target")
    if command == "online-dpo":
        unused("rl", ["kl_coef", "kl_target", "kl_horizon", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
                      "whiten_rewards", "normalize_advantages", "value_model"],
               "in online-dpo (its loss is --loss-type's, with --beta as the KL weight)")
        need(config.loss.ld_alpha is None and not config.loss.use_weighting,
             "--ld-alpha and --use-weighting are not supported in online-dpo (they need per-token extras of the "
             "pairs' log-probs that its rollouts do not compute)")
    elif command == "rloo":
        unused("rl", ["cliprange_value", "vf_coef", "gamma", "lam", "whiten_rewards", "value_model"],
               "in rloo (it has no critic)")
    elif command == "grpo":
        unused("rl", ["kl_coef", "kl_target", "kl_horizon", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
                      "whiten_rewards", "normalize_advantages", "value_model", "num_ppo_epochs"],
               "in grpo (TRL GRPO's names: --beta, --epsilon, --scale-rewards, --num-iterations)")
    else:
        unused("rl", ["normalize_advantages"], "in ppo (it whitens its GAE advantages)")
    if config.sample.prompts is not None:
        unused("default_job", ["num_prompts", "num_eval_prompts", "task"], "with --prompts")
    need(not (config.sample.prompts is not None and config.data.data is not None),
         f"preftune {command} reads prompts from --prompts or from the pairs of --data, not both")


def _check_grpo(config: Config, need: Check, unused: Unused) -> None:
    """grpo's options: its loss type (objectives/group_relative.py's GRPO_LOSSES), --beta >= 0, the clip, the
    reward scaling, and the DPO loss options it does not read."""
    from preftune.objectives.group_relative import GRPO_LOSSES, IMPORTANCE_SAMPLING_LEVELS, SCALE_REWARDS

    r, lo = config.rl, config.loss
    need(r.num_generations >= 2, f"grpo compares each sample with the other samples of its prompt: "
                                 f"--num-generations must be >= 2, got {r.num_generations}")
    need(lo.loss_type in GRPO_LOSSES, f"--loss-type '{lo.loss_type}' is not a grpo loss type; choose one of: "
                                      f"{', '.join(GRPO_LOSSES)}")
    need(math.isfinite(lo.beta) and lo.beta >= 0, f"--beta must be >= 0 in grpo (0: no KL term, no reference "
                                                   f"model held), got {lo.beta}")
    unused("loss", [f.name for f in dataclasses.fields(LossConfig) if f.name not in ("loss_type", "beta")],
           "in grpo (DPO's loss options)")
    need(r.num_iterations >= 1, f"--num-iterations must be >= 1, got {r.num_iterations}")
    need(r.epsilon > 0, f"--epsilon must be > 0, got {r.epsilon}")
    need(r.epsilon_high is None or r.epsilon_high > 0, f"--epsilon-high must be > 0, got {r.epsilon_high}")
    need(r.delta is None or r.delta > 1, f"--delta caps the importance weight: it must be > 1, got {r.delta}")
    need(r.scale_rewards in SCALE_REWARDS,
         f"--scale-rewards must be one of {', '.join(SCALE_REWARDS)}, got '{r.scale_rewards}'")
    need(r.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS, f"--importance-sampling-level must be one of "
         f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}, got '{r.importance_sampling_level}'")
    need(0 <= r.top_entropy_quantile <= 1, f"--top-entropy-quantile must be in [0, 1], got {r.top_entropy_quantile}")
    need(r.sapo_temperature_pos > 0 and r.sapo_temperature_neg > 0,
         f"--sapo-temperature-pos and --sapo-temperature-neg must be > 0, got {r.sapo_temperature_pos}, "
         f"{r.sapo_temperature_neg}")
    spec = GRPO_LOSSES.get(lo.loss_type)
    if spec is not None and not spec.clipped:
        unused("rl", ["delta"], f"with --loss-type {lo.loss_type} (only the clipped surrogate reads it)")
    if lo.loss_type != "sapo":
        unused("rl", ["sapo_temperature_pos", "sapo_temperature_neg"], f"with --loss-type {lo.loss_type}")
    else:
        unused("rl", ["epsilon", "epsilon_high"], "with --loss-type sapo (its soft gate does not clip)")


def _check_lora_dropout(config: Config, command: str, need: Check, unused: Unused) -> None:
    """Dropout on the LoRA input would make an online recipe's probability ratio, old log-probs and values noisy
    (TRL's PPO and RLOO switch dropout off): refused where one runs, the frontier's online methods included."""
    m = config.model
    if command == "study":
        online = [n.strip() for n in config.study.methods.split(",") if n.strip() in STUDY_ONLINE_METHODS]
    else:
        online = [command] if command in RL_COMMANDS else []
    need(not (m.lora and m.lora_dropout != 0 and online),
         f"--lora-dropout must be 0 in {', '.join(online)} (dropout would make the probability ratio, the old "
         f"log-probs and the values noisy; TRL's PPO and RLOO switch it off), got {m.lora_dropout}")


def _check_minibatches(config: Config, command: str, need: Check, unused: Unused) -> None:
    """--num-mini-batches splits each process's rollout into equal minibatches (TRL refuses a remainder too):
    torch.chunk would make fewer of them, or a small last one weighted like the others."""
    r = config.rl
    if command not in RL_COMMANDS or r.rollout_batch_size < 1 or r.num_generations < 1:
        return  # not an online recipe, or a rollout size already refused by _check_rl
    if command == "online-dpo":  # a minibatch holds whole pairs
        units, what = r.rollout_batch_size, f"{r.rollout_batch_size} pairs per process (--rollout-batch-size)"
    else:
        units = r.rollout_batch_size * r.num_generations
        what = f"{units} completions per process (--rollout-batch-size x --num-generations)"
    divisors = [d for d in range(1, units + 1) if units % d == 0]
    need(r.num_mini_batches in divisors,
         f"--num-mini-batches must divide a rollout's {what} evenly, got {r.num_mini_batches}: choose one of "
         f"{', '.join(map(str, divisors))}")


def _check_kl_controller(config: Config, command: str, need: Check, unused: Unused) -> None:
    """The adaptive KL coefficient (policy_gradient.adaptive_kl_coef) must stay positive: it multiplies kl_coef by
    1 + e * N / horizon after a rollout of N completions (all processes), e down to -0.2."""
    r = config.rl
    if command not in ("ppo", "rloo") or r.kl_target is None:
        return
    need(r.kl_coef != 0, "--kl-target adapts --kl-coef by multiplying it: from 0 it would never move; set "
                         "--kl-coef > 0 (the starting value)")  # a negative one is refused by _check_rl
    problem = kl_horizon_problem(config, config.train.num_processes)
    need(problem is None, problem or "")


def kl_horizon_problem(config: Config, processes: int) -> str | None:
    """What is wrong with --kl-horizon for a rollout over `processes` processes, or None: with --kl-target the
    controller multiplies kl_coef by down to 1 - 0.2 x completions / horizon, which must stay > 0. validate checks
    it for --num-processes; the online recipes again for the real world size (an external torchrun or accelerate
    launch)."""
    r = config.rl
    completions = r.rollout_batch_size * r.num_generations * processes
    if r.kl_target is None or r.kl_horizon < 1 or 5 * r.kl_horizon > completions:
        return None
    return (f"--kl-horizon must be more than a fifth of a rollout's {completions} completions "
            f"({r.rollout_batch_size} prompts x {r.num_generations} samples x {processes} processes), got "
            f"{r.kl_horizon}: below --kl-target the controller multiplies --kl-coef by 1 - 0.2 x {completions} / "
            f"{r.kl_horizon}, which must stay > 0")


def resolved_num_ppo_epochs(config: Config, command: str) -> int:
    """--num-ppo-epochs, or its default for the command (TRL's: 4 for PPO, 1 for RLOO); grpo's --num-iterations."""
    if command == "grpo":
        return config.rl.num_iterations
    if config.rl.num_ppo_epochs is not None:
        return config.rl.num_ppo_epochs
    return 4 if command == "ppo" else 1


def optimizer_steps_per_rollout(config: Config, command: str) -> int:
    """The optimizer steps an online recipe takes on each rollout: one per minibatch of each pass."""
    return resolved_num_ppo_epochs(config, command) * config.rl.num_mini_batches


def validate(config: Config, command: str = "train") -> None:
    """Cross-field checks for `command`; raises ConfigError with every problem found. Runs before any model
    loads."""
    problems: list[str] = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    defaults = Config()

    def unused(section: str, names: typing.Iterable[str], reason: str) -> None:
        # set by the user to something other than its default (a saved, resolved config repeats the defaults)
        for name in names:
            value, default = getattr(getattr(config, section), name), getattr(getattr(defaults, section), name)
            if f"{section}.{name}" in config.explicitly_set and value != default:
                problems.append(f"--{name.replace('_', '-')} has no effect {reason}")

    for check in (_check_reference, _check_training, _check_model, _check_command_scope, _check_study, _check_sampling,
                  _check_rl, _check_lora_dropout, _check_minibatches, _check_kl_controller):
        check(config, command, need, unused)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


# Options that may differ between a checkpoint and the run resuming it: they change where things are written,
# what is logged or how the result is saved, never the trained weights (precomputed reference log-probs and the
# batch layouts give the same log-probs up to float rounding).
RESUMABLE_DIFFERENCES = frozenset({
    "model.cache_dir", "model.merge", "data.eval_data", "data.eval_split", "train.output_dir", "train.overwrite",
    "train.resume", "train.save_steps", "train.save_total_limit", "train.logging_steps", "train.report_to",
    "train.run_name", "train.project", "train.eval_steps",
    "train.eval_batch_size", "train.max_bad_steps", "train.precompute_ref_log_probs", "train.batch_layout",
    "default_job.num_eval_prompts", "default_job.samples_per_eval_prompt",
})


def math_differences(saved: dict[str, dict[str, Any]], current: Config) -> list[str]:
    """Options whose value differs between a checkpoint's saved config and `current`, ignoring those in
    RESUMABLE_DIFFERENCES; as 'section.name: saved -> current'."""
    differences = []
    for section, values in current.to_dict().items():
        for name, value in values.items():
            key = f"{section}.{name}"
            # a field added since the checkpoint was written counts as its default
            old = saved.get(section, {}).get(name, getattr(getattr(Config(), section), name))
            if key not in RESUMABLE_DIFFERENCES and old != value:
                differences.append(f"{key}: {old!r} in the checkpoint, {value!r} now")
    return differences


def reference_markdown() -> str:
    """The README's config reference, generated from the field docs (a test keeps the README in sync)."""
    defaults = Config()
    lines = []
    for section in SECTIONS:
        lines += [f"**{section}**", "", "| flag / YAML key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(getattr(defaults, section)):
            default = getattr(getattr(defaults, section), f.name)
            flag = "--" + f.name.replace("_", "-")
            meaning = f.metadata["doc"].replace("|", "\\|")  # a literal bar, not a column
            lines.append(f"| `{flag}` / `{section}.{f.name}` | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
