"""Defaults < YAML < flags; unknown keys and bad values are errors before any model loads."""

from __future__ import annotations

import dataclasses

import pytest

from preftune.cli import build_config, build_parser
from preftune.config import Config, LossConfig, apply_yaml, iter_fields, set_option, validate
from preftune.errors import ConfigError
from preftune.objectives.losses import LOSSES, LossSpec


def parse(argv: list[str]) -> Config:
    return build_config(build_parser().parse_args(argv))


def test_every_field_is_documented():
    for section, f in iter_fields():
        assert f.metadata.get("doc"), f"{section}.{f.name} has no doc"


def test_precedence_defaults_yaml_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("loss:\n  beta: 0.3\nlearning_rate: 2.0e-5\nbatch_size: 2\n")
    config = parse(["train", "--config", str(yaml_file), "--batch-size", "6", "--data", "x.jsonl"])
    assert config.loss.beta == 0.3  # from YAML (nested)
    assert config.train.learning_rate == 2e-5  # from YAML (flat)
    assert config.train.batch_size == 6  # the flag wins over YAML
    assert config.train.grad_accum == 1  # default
    assert {"loss.beta", "train.batch_size", "train.learning_rate", "data.data"} <= config.explicitly_set


def test_unknown_yaml_key_suggests_the_closest(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  learning_rat: 1e-5\n")
    with pytest.raises(ConfigError, match="unknown option 'train.learning_rat'.*did you mean 'learning_rate'"):
        apply_yaml(Config(), yaml_file)


def test_wrong_type_names_the_option():
    with pytest.raises(ConfigError, match="option 'train.batch_size': expected int, got 'four'"):
        parse(["train", "--batch-size", "four"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--beta", "0"], "--beta must be > 0"),
        (["--loss-type", "sigmoidd"], "--loss-type 'sigmoidd' is unknown; choose one of: sigmoid"),
        (["--lora-r", "8"], "--lora-r has no effect without --lora"),
        (["--merge"], "--merge has no effect without --lora"),
        (["--data", "x.jsonl", "--num-prompts", "10"], "--num-prompts has no effect with --data"),
        (["--data", "x.jsonl", "--eval-steps", "5"], "--eval-steps has no effect without --eval-data"),
        (["--truncation-mode", "middle"], "--truncation-mode must be keep_start or keep_end"),
        (["--batch-layout", "packing"], "--batch-layout must be one of padded, shared_prefix, packed"),
        (["--batch-layout", "shared_prefix", "--attn-implementation", "flash_attention_2"],
         "--batch-layout shared_prefix needs a 4D attention mask"),
        (["--attn-implementation", "flash_attention_2"], "--batch-layout packed needs a 4D attention mask"),
        (["--precompute-ref-log-probs", "--sync-ref-model"], "not with --sync-ref-model"),
    ],
)
def test_cross_field_checks(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(["train", *argv])


@pytest.mark.parametrize("command", ["train", "reward-model", "ppo", "rloo", "online-dpo"])
def test_eval_steps_in_the_default_job_measures_on_its_held_out_set(command):
    parse([command, "--eval-steps", "5"])  # no --data: the default job's held-out pairs / prompts
    with pytest.raises(ConfigError, match="--eval-steps has no effect without --eval-data"):
        parse([command, "--prompts", "p.jsonl", "--eval-steps", "5"] if command in ("ppo", "rloo", "online-dpo")
              else [command, "--data", "x.jsonl", "--eval-steps", "5"])


def test_validate_accepts_defaults():
    validate(Config())


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--bta", "0.1"])
    assert exit_info.value.code == 2


# ---- loss options: one case per rejection rule, all before any model loads ---------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--beta", "-0.5"], r"--beta must be > 0"),
        (["--beta", "nan"], r"--beta must be > 0"),
        (["--loss-type", "sigmoid,nope"], r"--loss-type 'nope' is unknown; choose one of: sigmoid, hinge"),
        (["--loss-type", "sigmoid,"], r"has an empty name"),
        (["--loss-type", "sigmoid,sigmoid"], r"names a loss twice"),
        (["--loss-type", "sigmoid,sft", "--loss-weights", "1.0"], r"gives 1 weights for the 2 losses"),
        (["--loss-weights", "a,b"], r"--loss-weights 'a,b' is not a comma-separated list of numbers"),
        (["--loss-weights", "-1"], r"--loss-weights must be > 0"),
        (["--loss-type", "hinge", "--label-smoothing", "0.1"],
         r"--label-smoothing has no effect with --loss-type hinge \(read only by sigmoid, robust, aot"),
        (["--label-smoothing", "0.5"], r"--label-smoothing must be in \[0, 0.5\) for sigmoid, got 0.5"),
        (["--loss-type", "robust", "--label-smoothing", "0.6"], r"must be in \[0, 0.5\) for robust"),
        (["--loss-type", "aot", "--label-smoothing", "-0.1"], r"must be in \[0, 0.5\) for aot"),
        (["--loss-type", "exo_pair"], r"--label-smoothing must be in \(0, 1\) for exo_pair, got 0.0 \(the EXO"),
        (["--f-divergence-type", "tv"], r"--f-divergence-type 'tv' is unknown; choose one of: reverse_kl"),
        (["--loss-type", "sigmoid,bco_pair", "--f-divergence-type", "forward_kl"],
         r"--f-divergence-type forward_kl has no valid form for bco_pair"),
        (["--loss-type", "sft", "--f-divergence-type", "js_divergence"],
         r"--f-divergence-type has no effect with --loss-type sft"),
        (["--f-alpha-divergence-coef", "0.3"],
         r"--f-alpha-divergence-coef has no effect without --f-divergence-type alpha_divergence"),
        (["--f-divergence-type", "alpha_divergence", "--f-alpha-divergence-coef", "inf"], r"must be finite"),
        (["--discopop-tau", "0.1"], r"--discopop-tau has no effect with --loss-type sigmoid \(read only by discopop\)"),
        (["--loss-type", "discopop", "--discopop-tau", "0"], r"--discopop-tau must be > 0"),
        (["--simpo-gamma", "1.0"], r"--simpo-gamma has no effect with --loss-type sigmoid \(read only by simpo\)"),
        (["--loss-type", "simpo", "--simpo-gamma", "-1"], r"--simpo-gamma must be >= 0"),
        (["--ld-alpha", "1.5"], r"--ld-alpha must be in \[0, 1\]"),
        (["--loss-type", "simpo", "--ld-alpha", "0.5"], r"--ld-alpha has no effect with --loss-type simpo"),
        (["--loss-type", "aot", "--use-weighting"], r"--use-weighting has no per-pair meaning for aot"),
        (["--rpo-alpha", "0"], r"--rpo-alpha must be > 0"),
        (["--loss-type", "sigmoid,sft", "--rpo-alpha", "1"], r"--rpo-alpha adds the sft term"),
        (["--reference-free", "--ref-model", "x"], r"--ref-model has no effect with --reference-free"),
        (["--ref-model-sync-steps", "8"], r"--ref-model-sync-steps has no effect without --sync-ref-model"),
        (["--ref-model-mixup-alpha", "0.5"], r"--ref-model-mixup-alpha has no effect without --sync-ref-model"),
        (["--sync-ref-model", "--lora"], r"--sync-ref-model needs a separate reference model to update"),
        (["--sync-ref-model", "--reference-free"], r"--sync-ref-model has no reference model to update"),
        (["--sync-ref-model", "--ref-model-mixup-alpha", "0"], r"--ref-model-mixup-alpha must be in \(0, 1\]"),
        (["--sync-ref-model", "--ref-model-sync-steps", "0"], r"--ref-model-sync-steps must be >= 1"),
        (["--sync-ref-model", "--resume", "latest"], r"--resume cannot continue a --sync-ref-model run"),
    ],
)
def test_loss_option_checks(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(["train", "--data", "x.jsonl", *argv])


@pytest.mark.parametrize(
    "argv",
    [
        ["--loss-type", "sigmoid,bco_pair,sft", "--loss-weights", "0.8,0.2,1.0"],
        ["--label-smoothing", "0.1"],  # cDPO
        ["--loss-type", "exo_pair", "--label-smoothing", "1e-3"],
        ["--loss-type", "hinge,sft", "--f-divergence-type", "alpha_divergence", "--f-alpha-divergence-coef", "0.3"],
        ["--loss-type", "sigmoid,simpo", "--ld-alpha", "0.5", "--simpo-gamma", "1"],
        ["--loss-type", "simpo", "--reference-free", "--use-weighting", "--rpo-alpha", "0.2"],
        ["--sync-ref-model", "--ref-model-sync-steps", "4", "--ref-model-mixup-alpha", "0.9"],
        ["--loss-type", "bco_pair", "--f-divergence-type", "reverse_kl"],  # the default, whatever the loss
    ],
)
def test_loss_options_accepted(argv):
    parse(["train", "--data", "x.jsonl", *argv])


def test_eval_takes_every_loss_option():
    config = parse(["eval", "--data", "x.jsonl", "--loss-type", "ipo,sft", "--loss-weights", "1,0.5", "--ld-alpha",
                    "0.5", "--use-weighting", "--reference-free", "--f-divergence-type", "js_divergence"])
    assert config.loss.loss_type == "ipo,sft" and config.loss.reference_free
    with pytest.raises(ConfigError, match="--discopop-tau has no effect"):
        parse(["eval", "--data", "x.jsonl", "--discopop-tau", "0.1"])


def test_train_help_lists_every_loss_with_its_meaning(capsys):
    from preftune.objectives.losses import LOSSES

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse re-wraps lines (also at hyphens)
    for name, spec in LOSSES.items():
        assert "".join(f"{name}: {spec.meaning}".split()) in text


# ---- the LossSpec rows are exactly what validate enforces ------------------------------------------------
# A changed value of each per-loss option (label smoothing: inside the readers' ranges, see `inside`); a row that
# reads a new option needs one here.
CHANGED = {"f_divergence_type": "forward_kl", "ld_alpha": 0.5, "use_weighting": True, "discopop_tau": 0.1,
           "simpo_gamma": 1.0}
PER_LOSS_OPTIONS = ["label_smoothing", *CHANGED]


def declared(spec: LossSpec, option: str) -> bool:
    """Whether the row says its loss takes `option` (reads it; for --use-weighting, has a per-pair loss)."""
    return {"label_smoothing": spec.label_smoothing is not None, "f_divergence_type": spec.f_divergence is True,
            "ld_alpha": spec.ld_alpha, "use_weighting": spec.per_pair}.get(option, option in spec.reads)


def inside(*names: str) -> float:
    """A label smoothing strictly inside the ranges of those of `names` that read it."""
    ranges = [LOSSES[n].label_smoothing for n in names if LOSSES[n].label_smoothing is not None] or [(0.0, 0.5, True)]
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return low + (high - low) / 4


def loss_options(*names: str, **options) -> dict:
    """--loss-type names, with the label smoothing that one of them cannot go without (EXO's)."""
    smoothing = [LOSSES[n].label_smoothing for n in names if LOSSES[n].label_smoothing is not None]
    needed = any(not closed or low > 0 for low, _, closed in smoothing)
    return {"loss_type": ",".join(names), **({"label_smoothing": inside(*names)} if needed else {}), **options}


def loss_problems(**options) -> str:
    """validate's message when the user sets these loss options; '' when they are valid."""
    config = Config()
    for name, value in options.items():
        set_option(config, f"loss.{name}", value, "test")
    try:
        validate(config)
    except ConfigError as error:
        return str(error)
    return ""


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def test_every_option_a_row_reads_is_a_loss_option_with_a_changed_value():
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    for name, spec in LOSSES.items():
        assert set(spec.reads) <= fields & set(CHANGED), (name, spec.reads)


@pytest.mark.parametrize("name", list(LOSSES))
def test_alone_a_changed_option_is_an_error_iff_the_row_says_its_loss_does_not_take_it(name):
    spec = LOSSES[name]
    assert loss_problems(**loss_options(name)) == ""
    for option in PER_LOSS_OPTIONS:
        value = inside(name) if option == "label_smoothing" else CHANGED[option]
        message = loss_problems(**loss_options(name, **{option: value}))
        assert bool(message) != declared(spec, option), (option, message)
        assert not message or flag(option) in message
        assert spec.reads_option(option) == (declared(spec, option) and option != "use_weighting")
    if spec.label_smoothing is not None:  # the range is the one enforced
        low, high, closed = spec.label_smoothing
        assert bool(loss_problems(loss_type=name, label_smoothing=low)) != closed
        assert f"must be in {'[' if closed else '('}{low:g}, {high:g}) for {name}" in loss_problems(
            loss_type=name, label_smoothing=high)
        assert loss_problems(loss_type=name, label_smoothing=low - 0.01)


@pytest.mark.parametrize("name", list(LOSSES))
def test_beside_a_loss_that_takes_it_an_option_is_an_error_iff_the_row_has_no_valid_form_for_it(name):
    # "has no effect" needs all chosen losses not to read the option; "no valid form" needs only one: f-DPO's
    # divergences for f_divergence=False (sft's None is valid beside them), WPO's weight without per_pair
    spec = LOSSES[name]
    invalid = {"f_divergence_type": spec.f_divergence is False, "use_weighting": not spec.per_pair}
    for option in PER_LOSS_OPTIONS:
        partner = next((n for n, s in LOSSES.items() if n != name and declared(s, option)), None)
        if partner is None:  # only this loss takes it
            continue
        value = inside(name, partner) if option == "label_smoothing" else CHANGED[option]
        assert loss_problems(**loss_options(partner, name)) == ""
        message = loss_problems(**loss_options(partner, name, **{option: value}))
        assert bool(message) == invalid.get(option, False), (option, partner, message)
        assert not message or f"{flag(option)} {value} has no valid form for {name}" in message or (
            f"{flag(option)} has no per-pair meaning for {name}" in message)


def test_several_processes_need_prompts_or_pairs_of_the_users():
    config = Config()
    set_option(config, "train.num_processes", 2, "test")
    with pytest.raises(ConfigError, match="--num-processes > 1 needs --data \\(or --prompts\\)"):
        validate(config)
    for key in ("data.data", "sample.prompts"):
        given = Config()
        set_option(given, "train.num_processes", 2, "test")
        set_option(given, key, "prompts.jsonl", "test")
        validate(given, "rloo" if key == "sample.prompts" else "train")


# ---- the online recipes' minibatches, KL controller and LoRA dropout (issue 23, items 2, 3, 7) -------------------
@pytest.mark.parametrize(("argv", "message"), [
    # 16 completions (8 prompts x 2): torch.chunk made 4 minibatches of 4 for 5, and 3,3,3,3,3,1 for 6
    (["ppo", "--num-mini-batches", "5"], r"--num-mini-batches must divide a rollout's 16 completions per process "
                                         r"\(--rollout-batch-size x --num-generations\) evenly, got 5: choose one of "
                                         r"1, 2, 4, 8, 16"),
    (["ppo", "--num-mini-batches", "6"], r"--num-mini-batches must divide a rollout's 16 completions"),
    (["ppo", "--num-mini-batches", "32"], r"--num-mini-batches must divide a rollout's 16 completions"),
    (["rloo", "--rollout-batch-size", "2", "--num-generations", "3", "--num-mini-batches", "4"],
     r"--num-mini-batches must divide a rollout's 6 completions per process .* got 4: choose one of 1, 2, 3, 6"),
    # online DPO's minibatches hold whole pairs: 6 pairs, not 12 completions
    (["online-dpo", "--rollout-batch-size", "6", "--num-mini-batches", "4"],
     r"--num-mini-batches must divide a rollout's 6 pairs per process \(--rollout-batch-size\) evenly, got 4: "
     r"choose one of 1, 2, 3, 6"),
    (["online-dpo", "--rollout-batch-size", "6", "--num-mini-batches", "12"], r"6 pairs per process"),
])
def test_minibatches_that_do_not_divide_the_rollout_are_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv)


@pytest.mark.parametrize("argv", [
    ["ppo", "--num-mini-batches", "4"],
    ["rloo", "--num-mini-batches", "16"],
    ["rloo", "--rollout-batch-size", "2", "--num-generations", "3", "--num-mini-batches", "3"],
    ["online-dpo", "--rollout-batch-size", "6", "--num-mini-batches", "3"],
])
def test_minibatches_that_divide_the_rollout_are_accepted(argv):
    parse(argv)


@pytest.mark.parametrize(("argv", "message"), [
    # from 0 a multiplicative controller never moves
    (["ppo", "--kl-target", "1", "--kl-coef", "0"], r"--kl-target adapts --kl-coef by multiplying it"),
    # 16 completions a rollout: 1 + e * 16 / 3 with e = -0.2 is -0.07 (the penalty would reward drift)
    (["rloo", "--kl-target", "1", "--kl-horizon", "3"],
     r"--kl-horizon must be more than a fifth of a rollout's 16 completions \(8 prompts x 2 samples x 1 "
     r"processes\), got 3"),
    # 10 completions, horizon 2: the factor would be exactly 0 below the target, and kl_coef 0 for ever
    (["ppo", "--kl-target", "1", "--kl-horizon", "2", "--rollout-batch-size", "5"],
     r"--kl-horizon must be more than a fifth of a rollout's 10 completions"),
    # the rollout counts every process's completions: 2 x 16
    (["rloo", "--prompts", "p.jsonl", "--num-processes", "2", "--kl-target", "1", "--kl-horizon", "6"],
     r"--kl-horizon must be more than a fifth of a rollout's 32 completions \(8 prompts x 2 samples x 2 processes\)"),
])
def test_an_adaptive_kl_coefficient_that_could_reach_0_is_refused(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(argv)


@pytest.mark.parametrize("argv", [
    ["rloo", "--kl-target", "1", "--kl-horizon", "4"],  # 16 / 4 * 0.2 = 0.8: the factor stays >= 0.2
    ["ppo", "--kl-target", "1", "--kl-horizon", "3", "--rollout-batch-size", "5"],  # 10 completions, >= 1/3
    ["rloo", "--prompts", "p.jsonl", "--num-processes", "2", "--kl-target", "1", "--kl-horizon", "7"],
    ["ppo", "--kl-coef", "0"],  # a fixed coefficient of 0: no KL penalty, no controller
])
def test_an_adaptive_kl_coefficient_that_stays_positive_is_accepted(argv):
    parse(argv)


@pytest.mark.parametrize("command", ["ppo", "rloo", "online-dpo", "grpo"])
def test_the_online_recipes_refuse_lora_dropout(command):
    with pytest.raises(ConfigError, match=r"--lora-dropout must be 0 in " + command + r" \(dropout would make"):
        parse([command, "--lora", "--lora-dropout", "0.05"])
    parse([command, "--lora", "--lora-dropout", "0"])
    parse(["train", "--lora", "--lora-dropout", "0.05"])  # DPO and the reward model keep it
    parse(["reward-model", "--lora", "--lora-dropout", "0.05"])


def test_the_frontier_refuses_lora_dropout_when_it_runs_an_online_method(tmp_path):
    settings = tmp_path / "lora.yaml"  # the frontier takes the model options from a YAML file
    settings.write_text("model:\n  lora: true\n  lora_dropout: 0.1\n")
    with pytest.raises(ConfigError, match=r"--lora-dropout must be 0 in ppo-gt, rloo \(dropout would make"):
        parse(["frontier", "--config", str(settings), "--methods", "dpo,ppo-gt,rloo"])
    parse(["frontier", "--config", str(settings), "--methods", "dpo,best-of-n"])


@pytest.mark.parametrize("bad", [["--num-mini-batches", "5"], ["--kl-target", "1", "--kl-horizon", "3"],
                                 ["--lora", "--lora-dropout", "0.1"]])
def test_the_cli_exits_2_naming_the_option_before_a_model_loads_and_writes_nothing(tmp_path, capsys, bad):
    from preftune.cli import main

    out = tmp_path / "run"
    # no such model: a run that got as far as loading one would fail naming it
    code = main(["rloo", "--model", str(tmp_path / "no-model"), "--output-dir", str(out), *bad])
    err = capsys.readouterr().err
    assert code == 2 and bad[-2] in err and "Traceback" not in err and "no-model" not in err
    assert list(tmp_path.iterdir()) == []  # no run folder


def test_grpo_starts_from_trls_defaults_and_keeps_what_the_user_set():
    """preftune grpo's --loss-type and --beta default to TRL GRPOConfig's (dapo, 0), not DPO's (sigmoid, 0.1); a
    value the user gives, even DPO's default, stays."""
    config = parse(["grpo", "--prompts", "p.jsonl"])
    assert (config.loss.loss_type, config.loss.beta) == ("dapo", 0.0)
    config = parse(["grpo", "--prompts", "p.jsonl", "--loss-type", "grpo", "--beta", "0.1"])
    assert (config.loss.loss_type, config.loss.beta) == ("grpo", 0.1)
    assert parse(["train"]).loss.loss_type == "sigmoid"  # DPO's own default unchanged
