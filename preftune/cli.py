"""The `preftune` command: builds a Config from defaults, --config YAML and flags, then calls the library.

    preftune train [--config run.yaml] [--flag value ...]   no --data: the default sentiment job
    preftune eval --data pairs.jsonl [--model M] [--ref-model R] [--batch-size N]

User errors (bad files, bad options) print one message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from preftune.config import DEFAULT_JOB_OVERRIDES, Config, apply_yaml, field_type, iter_fields, set_option, validate
from preftune.errors import EXIT_USER_ERROR, RunInterrupted, UserError
from preftune.runtime import launch_processes, launched

# Options `preftune eval` takes, and the flag names it gives them where they differ from train's.
EVAL_OPTIONS = {
    "model.model": None, "model.ref_model": None, "model.trust_remote_code": None, "model.bf16": None,
    "model.attn_implementation": None,
    "model.cache_dir": None, "data.data": None, "data.split": None, "data.skip_invalid": None,
    "data.max_length": None, "data.truncation_mode": None, "train.eval_batch_size": "batch_size",
    # every loss option, so that a model pair can be scored under any objective
    **{f"loss.{f.name}": None for section, f in iter_fields() if section == "loss"},
}


def loss_help() -> str:
    from preftune.losses import LOSSES

    return "; ".join(f"{name}: {meaning}" for name, (_, meaning) in LOSSES.items())


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Direct Preference Optimization for causal LMs.")
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
    plot = commands.add_parser("plot", help="draw a run's training and eval curves as a PNG",
                               description="Loss, preference accuracy, reward margin and chosen/rejected rewards "
                               "(train and eval) from RUN_DIR/metrics.jsonl, as one PNG.")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a preftune run folder (holds metrics.jsonl)")
    plot.add_argument("--output", metavar="PNG", help="where to write the picture [default: RUN_DIR/curves.png]")
    return parser


def build_config(args: argparse.Namespace) -> Config:
    config = Config()
    if args.config:
        apply_yaml(config, args.config)
    for key, value in vars(args).items():
        if "." in key:
            set_option(config, key, value, "command line")
    validate(config)
    return config


def cmd_train(config: Config) -> int:
    if config.data.data is None:
        from preftune.sentiment import run_default_job

        run_default_job(config)
    else:
        from preftune.trainer import Trainer

        Trainer(config).run()
    return 0


def cmd_eval(config: Config) -> int:
    if config.data.data is None:
        raise UserError("preftune eval needs --data (a file of preference pairs or a dataset name)")
    from preftune.evaluate import run_eval

    print(json.dumps(run_eval(config)), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plot":
            from preftune.plot import plot_run

            print(plot_run(args.run_dir, args.output))
            return 0
        config = build_config(args)
        if args.command == "train" and config.train.num_processes > 1 and not launched():
            # checked above, before any process starts; each process parses the same arguments again
            return launch_processes(config.train.num_processes, argv)
        return cmd_train(config) if args.command == "train" else cmd_eval(config)
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
