"""Defaults < YAML < flags; unknown keys and bad values are errors before any model loads."""

from __future__ import annotations

import pytest

from preftune.cli import build_config, build_parser
from preftune.config import Config, apply_yaml, iter_fields, validate
from preftune.errors import ConfigError


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
        (["--eval-steps", "5"], "--eval-steps has no effect without --eval-data"),
        (["--truncation-mode", "middle"], "--truncation-mode must be keep_start or keep_end"),
    ],
)
def test_cross_field_checks(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(["train", *argv])


def test_validate_accepts_defaults():
    validate(Config())


def test_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--bta", "0.1"])
    assert exit_info.value.code == 2
