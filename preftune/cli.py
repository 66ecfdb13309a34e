"""The `preftune` command: builds a Config from defaults, --config YAML and flags, then calls the library.

    preftune train [--config run.yaml] [--flag value ...]   no --data: the default sentiment job
    preftune eval --data pairs.jsonl [--model M] [--ref-model R] [--batch-size N]
    preftune export RUN_DIR --gguf OUT.gguf [--outtype f32|f16|q8_0] [--force]

User errors (bad files, bad options) print one message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from preftune import __version__, commands
from preftune.config import (
    DEFAULT_JOB_OVERRIDES,
    Config,
    apply_command_defaults,
    apply_yaml,
    field_type,
    iter_fields,
    set_option,
    validate,
)
from preftune.errors import EXIT_USER_ERROR, RunInterrupted, UserError
from preftune.runtime.accelerator import launch_processes, launched

# The options each command other than train takes, and the flag names it gives them where they differ from
# train's (their batch size is train's eval_batch_size).
MODEL_PAIR = {"model.model": None, "model.ref_model": None, "model.trust_remote_code": None, "model.bf16": None,
              "model.attn_implementation": None, "model.cache_dir": None, "train.eval_batch_size": "batch_size",
              "train.batch_layout": None}
PAIR_DATA = {"data.data": None, "data.split": None, "data.skip_invalid": None, "data.max_length": None,
             "data.truncation_mode": None}
SAMPLING = {"sample.prompts": None, "sample.output": None, "sample.num_samples": None,
            "sample.max_new_tokens": None, "train.seed": None}
GENERATE_OPTIONS = {**{k: v for k, v in MODEL_PAIR.items() if k != "model.ref_model"}, **SAMPLING,
                    "sample.temperature": None, "sample.top_p": None}
SCORE_OPTIONS = {**MODEL_PAIR, **PAIR_DATA, "sample.prompts": None, "sample.output": None, "loss.beta": None}
JUDGE_OPTIONS = {**MODEL_PAIR, **SAMPLING, "sample.reward": None, "sample.reward_weights": None}
STUDY_OPTIONS = {
    **{key: None for key in ("train.output_dir", "train.overwrite", "train.seed", "train.learning_rate",
                             "model.model", "model.cache_dir",
                             "model.trust_remote_code", "model.lora", "model.lora_r", "model.lora_alpha",
                             "model.lora_target_modules", "data.data", "data.eval_data", "data.split",
                             "data.eval_split", "data.skip_invalid", "default_job.num_prompts",
                             "default_job.num_eval_prompts", "default_job.samples_per_eval_prompt",
                             "default_job.task", "sample.max_new_tokens")},
    **{f"study.{f.name}": None for section, f in iter_fields() if section == "study"},
}
ALIASES = {"frontier": "study"}  # the study grew out of `preftune frontier`, whose name still runs it
# the reward model reads no reference, loss, sampling or layout option (its head reads each padded row's last token)
REWARD_MODEL_OPTIONS = {
    **{f"{section}.{f.name}": None for section, f in iter_fields()
       if section in ("model", "data", "train", "reward_model")
       and f"{section}.{f.name}" not in {"model.ref_model", "model.load_in_4bit", "model.merge", "train.batch_layout",
                                          "train.sync_ref_model", "train.ref_model_mixup_alpha",
                                          "train.ref_model_sync_steps", "train.precompute_ref_log_probs"}},
    # without --data: the default job's pairs, and the settings they are built with
    "default_job.num_prompts": None, "default_job.num_eval_prompts": None, "sample.max_new_tokens": None,
}
# ppo and rloo: prompts in, no pairs' shaping, batch layout, loss or reference-update options
RL_OPTIONS = {
    **{f"{section}.{f.name}": None for section, f in iter_fields()
       if section in ("model", "data", "train", "rl")
       and f"{section}.{f.name}" not in {"data.max_length", "data.truncation_mode", "train.batch_size",
                                          "train.grad_accum", "train.eval_batch_size",
                                          "train.sync_ref_model", "train.ref_model_mixup_alpha",
                                          "train.ref_model_sync_steps", "train.precompute_ref_log_probs",
                                          "model.load_in_4bit"}},
    "sample.prompts": None, "sample.reward": None, "sample.reward_weights": None, "sample.eval_reward": None,
    "sample.max_new_tokens": None, "default_job.num_prompts": None, "default_job.num_eval_prompts": None,
    "default_job.samples_per_eval_prompt": None, "default_job.task": None,
}
# grpo: ppo's and rloo's options, and its --loss-type and --beta (TRL GRPOConfig's names)
GRPO_OPTIONS = {**RL_OPTIONS, "loss.loss_type": None, "loss.beta": None}
# online-dpo: ppo's and rloo's options, DPO's loss and TR-DPO reference updates (iterative DPO) where they apply
ONLINE_DPO_OPTIONS = {
    **RL_OPTIONS,
    **{f"loss.{f.name}": None for section, f in iter_fields()
       if section == "loss" and f.name not in {"ld_alpha", "use_weighting"}},
    "train.sync_ref_model": None, "train.ref_model_mixup_alpha": None, "train.ref_model_sync_steps": None,
}
EVAL_OPTIONS = {
    **MODEL_PAIR, **PAIR_DATA,
    # every loss option, so that a model pair can be scored under any objective
    **{f"loss.{f.name}": None for section, f in iter_fields() if section == "loss"},
}


def loss_help() -> str:
    from preftune.objectives.losses import LOSSES

    return "; ".join(f"{name}: {spec.meaning}" for name, spec in LOSSES.items())


def add_config_flags(parser: argparse.ArgumentParser, only: dict[str, str | None] | None) -> None:
    """One flag per config field (or per field in `only`); defaults are SUPPRESS so that only flags the user
    typed override the YAML file."""
    defaults = Config()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, f in iter_fields():
        key = f"{section}.{f.name}"
        if only is not None and key not in only:
            continue
        name = (only or {}).get(key) or f.name
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        help_text = f.metadata["doc"]
        if key == "loss.loss_type":
            help_text += f" ({loss_help()})"
        default = getattr(getattr(defaults, section), f.name)
        help_text += f" [default: {default}]"
        flag = "--" + name.replace("_", "-")
        if key == "train.resume":
            group.add_argument(flag, dest=key, nargs="?", const="latest", default=argparse.SUPPRESS,
                               metavar="CHECKPOINT", help=help_text)
        elif field_type(section, f.name) is bool:
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=key, default=argparse.SUPPRESS, metavar="VALUE", help=help_text)


# the commands that take the config tree's options alone: (name, the options it reads, --help line, description)
OPTION_COMMANDS = (
    ("generate", GENERATE_OPTIONS, "sample completions for a file of prompts (JSONL out)",
     "Batched sampling from --model (chat template applied to message prompts): --num-samples per prompt, "
     "--temperature, --top-p, --max-new-tokens, --seed. Writes JSONL (or CSV) to --output or stdout."),
    ("score", SCORE_OPTIONS, "implicit rewards beta*log(pi/pi_ref) of responses; best-of-N ranks",
     "The implicit reward of each response under --model against --ref-model: of chosen and rejected for "
     "--data pairs, or of every candidate (with its rank) for --prompts records with \"responses\"."),
    ("study", STUDY_OPTIONS, "DPO or RLHF? over label budgets and seeds, at matched KL, with costs and a decision "
     "table (alias: frontier)",
     "DPO (--betas) against a reward model fit to the same labels with PPO, RLOO, online DPO, GRPO or "
     "best-of-N against it (and -gt ceilings on the ground truth), for each --label-budgets (the first N of a "
     "seeded shuffle, the same for every method) and --seeds, on --data / --eval-data judged by --ground-truth, "
     "or on the built-in task (--task sentiment or arithmetic). Each (method, budget, seed) runs in a process of "
     "its own and is cached in the folder: a re-run (or a run after a kill) computes only what is missing or "
     "changed. Writes label_efficiency.png, reward_kl.png, gains.md, matched_kl.md, differences.md, costs.md, "
     "decision.md, summary.md and the CSVs. --quick: a few seconds a point."),
    ("reward-model", REWARD_MODEL_OPTIONS, "train a Bradley-Terry reward model on preference pairs",
     "A sequence-classification head of one output over --model, trained with -log sigmoid(r(x, y_chosen) - "
     "r(x, y_rejected)) (optionally centred), as TRL's RewardTrainer; held-out accuracy with its interval. "
     "Saves a plain transformers folder that --reward reads. Without --data: the default job's pairs."),
    ("ppo", RL_OPTIONS, "RLHF with PPO: an actor-critic against --reward with a KL penalty",
     "Samples completions of the prompts (--prompts, the prompts of --data's pairs, or the default job's) from "
     "the policy, scores them with --reward (sentiment, module:function or a reward-model folder), and optimises "
     "the policy and a critic with PPO's clipped objectives on KL-shaped rewards with GAE. Reports the held-out "
     "reward against the reference's, and the KL, with their standard errors."),
    ("rloo", RL_OPTIONS, "RLHF with RLOO: REINFORCE with a leave-one-out baseline against --reward",
     "As ppo, without a critic: --num-generations samples per prompt, each baselined by the mean reward of the "
     "others (Ahmadian et al. 2024), the KL to the reference as a penalty on the reward, as TRL's RLOOTrainer."),
    ("grpo", GRPO_OPTIONS, "RLHF with GRPO: group-relative advantages, no critic, as TRL's GRPOTrainer",
     "As rloo: --num-generations samples per prompt; each sample's advantage is its reward less its group's "
     "mean, over the group's std (--scale-rewards), and the policy minimises --loss-type's surrogate (dapo, "
     "grpo, bnpo, dr_grpo, cispo, sapo) of the importance weight per token or per sequence "
     "(--importance-sampling-level), clipped by --epsilon / --epsilon-high, plus --beta times the k3 KL to the "
     "reference (Shao et al. 2024; TRL 1.16's GRPOTrainer, its defaults)."),
    ("online-dpo", ONLINE_DPO_OPTIONS, "online DPO: DPO on pairs of the policy's own samples ranked by --reward",
     "Each rollout samples two completions per prompt from the current policy, ranks them with --reward (ties "
     "are left out of the loss) and takes a step of --loss-type (any DPO-family loss) against the reference "
     "(Guo et al. 2024), as TRL's OnlineDPOTrainer. Iterative DPO: one rollout per round over all prompts, "
     "--num-ppo-epochs passes over its pairs, --sync-ref-model to make each round's reference the last policy."),
    ("judge", JUDGE_OPTIONS, "win rate of --model over --ref-model under a ground-truth reward, and KL",
     "Samples both models on --prompts, scores the samples with --reward, and prints the win rate (ties "
     "count half) with a 95% interval, and KL(policy || reference) from the policy's samples."),
)


def add_folder_commands(commands) -> None:
    """plot and export: commands on a run's folder, with options of their own."""
    plot = commands.add_parser("plot", help="draw a run's training and eval curves as a PNG",
                               description="Loss, preference accuracy, reward margin and chosen/rejected rewards "
                               "(train and eval) from RUN_DIR/metrics.jsonl, as one PNG.")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a preftune run folder (holds metrics.jsonl)")
    plot.add_argument("--output", metavar="PNG", help="where to write the picture [default: RUN_DIR/curves.png]")
    export = commands.add_parser("export", help="write a run's model as one GGUF file (llama.cpp, Ollama)",
                                 description="The run's model (a LoRA adapter merged into its base first) with its "
                                 "tokenizer and chat template as one GGUF file. Llama, Mistral and Qwen2 models.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a finished preftune run folder (holds the model)")
    export.add_argument("--gguf", metavar="OUT.gguf", required=True, help="the GGUF file to write")
    export.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f16",
                        help="type of the weight matrices (norms stay f32) [default: f16]")
    export.add_argument("--force", action="store_true", help="replace --gguf if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Direct Preference Optimization for causal LMs.")
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a policy on preference pairs (no --data: the default sentiment job)",
        description="Train a policy with DPO. Without --data, runs the default job: the DPO paper's "
        "controlled-sentiment experiment in miniature on SmolLM2-135M-Instruct, which uses "
        + ", ".join(f"{k.split('.')[1]}={v}" for k, v in DEFAULT_JOB_OVERRIDES.items())
        + " unless you set them.",
    )
    train.add_argument("--config", metavar="FILE", help="YAML file of options; flags override it")
    add_config_flags(train, None)
    evaluate = commands.add_parser(
        "eval",
        help="score a model pair on preference pairs; prints the metrics as JSON",
        description="Preference metrics (loss, rewards/*, logps/*) of --model against --ref-model (default: "
        "the model itself) on --data. Trains nothing.",
    )
    evaluate.add_argument("--config", metavar="FILE", help="YAML file of options; flags override it")
    add_config_flags(evaluate, EVAL_OPTIONS)
    for name, options, summary, description in OPTION_COMMANDS:
        command = commands.add_parser(name, help=summary, description=description,
                                      aliases=[alias for alias, to in ALIASES.items() if to == name])
        command.add_argument("--config", metavar="FILE", help="YAML file of options; flags override it")
        add_config_flags(command, options)
    add_folder_commands(commands)
    return parser


def build_config(args: argparse.Namespace) -> Config:
    config = Config()
    if args.config:
        apply_yaml(config, args.config)
    for key, value in vars(args).items():
        if "." in key:
            set_option(config, key, value, "command line")
    command = ALIASES.get(args.command, args.command)
    apply_command_defaults(config, command)
    validate(config, command)
    return config


def print_records(records: list[dict], config: Config) -> None:
    from preftune.data.records import write_records

    write_records(records, config.sample.output)


def cmd_judge(config: Config) -> None:
    summary, records = commands.run_judge(config)
    if config.sample.output:
        print_records(records, config)
    print(json.dumps(summary), flush=True)


# command -> what it does with the validated config
COMMANDS: dict[str, Callable[[Config], object]] = {
    "train": commands.run_train,
    "eval": lambda config: print(json.dumps(commands.run_eval(config)), flush=True),
    "generate": lambda config: print_records(commands.run_generate(config), config),
    "score": lambda config: print_records(commands.run_score(config), config),
    "judge": cmd_judge,
    "study": commands.run_study,
    "reward-model": commands.run_reward_model,
    "ppo": lambda config: commands.run_online(config, "ppo"),
    "rloo": lambda config: commands.run_online(config, "rloo"),
    "grpo": lambda config: commands.run_online(config, "grpo"),
    "online-dpo": lambda config: commands.run_online(config, "online-dpo"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plot":
            from preftune.evaluation.plot import plot_run

            print(plot_run(args.run_dir, args.output))
            return 0
        if args.command == "export":
            print(commands.run_export(args.run_dir, args.gguf, args.outtype, args.force), flush=True)
            return 0
        config = build_config(args)
        trains = args.command in ("train", "reward-model", "ppo", "rloo", "grpo", "online-dpo")
        if trains and config.train.num_processes > 1 and not launched():
            # checked above, before any process starts; each process parses the same arguments again
            return launch_processes(config.train.num_processes, argv)
        COMMANDS[ALIASES.get(args.command, args.command)](config)
        return 0
    except UserError as error:
        print(f"preftune: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunInterrupted as interrupted:
        print(f"preftune: {interrupted}", file=sys.stderr)
        return interrupted.exit_code
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
