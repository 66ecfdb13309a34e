"""`preftune ppo`, `rloo`, `grpo` and `online-dpo` through the CLI on tiny models: what a run writes, TRL's metric
names, held-out measurement, exact resume, LoRA, learning on a reward the policy can reach, iterative DPO's
reference updates, and user errors (exit 2, no traceback, nothing written)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.recipes.model_card import read_front_matter
from preftune.runtime.run_folder import CONFIG_FILE
from tests.conftest import PAIRS, write_jsonl

PROMPTS = [{"prompt": p["prompt"]} for p in PAIRS]


@pytest.fixture
def files(tmp_path, monkeypatch) -> dict[str, Path]:
    # a reward without ties (VADER scores a random model's text 0 almost always; online DPO leaves ties out)
    (tmp_path / "text_reward.py").write_text("def length(prompt, completion):\n"
                                             "    return len(completion) + 1e-3 * sum(map(ord, completion))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return {"prompts": write_jsonl(tmp_path / "prompts.jsonl", PROMPTS),
            "pairs": write_jsonl(tmp_path / "pairs.jsonl", PAIRS)}


LENGTH_REWARD = ("--reward", "text_reward:length")


def args_for(command: str, model: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [command, "--model", str(model), "--prompts", str(files["prompts"]), "--eval-data", str(files["pairs"]),
            "--output-dir", str(out), "--rollout-batch-size", "2", "--max-new-tokens", "6", "--max-steps", "4",
            "--learning-rate", "1e-3", "--samples-per-eval-prompt", "2", "--report-to", "none", *extra]


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("command", "names"), [
    ("ppo", ["loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac", "val/vpred", "val/clipfrac"]),
    ("rloo", ["loss/policy", "policy/approxkl", "policy/clipfrac"]),
    ("grpo", ["loss", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "reward",
              "reward_std", "frac_reward_zero_std", "completions/clipped_ratio", "completions/mean_length"]),
    ("online-dpo", ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "objective/chosen_scores", "objective/scores_margin", "objective/tie_rate"]),
])
def test_a_run_logs_trl_names_measures_held_out_and_saves_a_loadable_policy(tmp_path, tiny_model_dir, files,
                                                                             command, names):
    out = tmp_path / "run"
    assert main(args_for(command, tiny_model_dir, files, out, "--eval-steps", "2", "--eval-reward", "sentiment",
                         *LENGTH_REWARD)) == 0
    rows = rows_of(out)
    train = [r for r in rows if "objective/scores" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # grpo with beta 0 (TRL's default) runs no reference in its rollouts: no rollout KL
    with_kl = ["objective/kl", "objective/rlhf_reward"] if command != "grpo" else []
    for name in [*with_kl, "objective/entropy", "objective/scores", "lr", *names]:
        assert all(isinstance(r[name], float) for r in train), name
    if command == "grpo":
        assert not any("objective/kl" in r or "kl" in r for r in train)
    # every rollout: 2 prompts x 2 samples
    assert [r["episode"] for r in train] == [4, 8, 12, 16]
    evaluations = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in evaluations] == [2, 4] and all(r["eval_num_samples"] == 8 for r in evaluations)
    report = json.loads((out / "rl_report.json").read_text())
    assert report["method"] == command and report["held_out_prompts"] == 4 and report["completions_generated"] == 16
    assert report["reward_gain"] == pytest.approx(report["policy_reward"]["mean"] - report["reference_reward"]["mean"])
    # trained on one reward, measured on held-out prompts with another (the ground truth)
    assert report["reward"] == "sentiment" and report["trained_on_reward"] == "text_reward:length"
    assert "held-out prompts" in (out / "report.md").read_text() and (out / "curves.png").is_file()
    card = read_front_matter((out / "README.md").read_text())
    assert card["tags"] == ["preftune", command, "rlhf"] and card["pipeline_tag"] == "text-generation"
    assert "reward `text_reward:length`" in (out / "README.md").read_text()
    policy = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(policy.model.norm.weight, start.model.norm.weight) or any(
        not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters()))


def test_the_held_out_gain_is_paired_by_prompt(tmp_path, tiny_model_dir, files, capsys):
    """rl_report.json keeps the per-sample rewards (prompt-major) and reports the gain's standard error from the
    per-prompt differences d_i = mean_j policy_ij - mean_j reference_ij, sd(d) / sqrt(n_prompts); each model's own
    standard error from its per-prompt means; not the independent-samples hypot of the two."""
    from text_reward import length

    out, k = tmp_path / "run", 3
    assert main(args_for("rloo", tiny_model_dir, files, out, "--learning-rate", "1e-2", "--samples-per-eval-prompt",
                         str(k), *LENGTH_REWARD)) == 0
    report = json.loads((out / "rl_report.json").read_text())
    policy, reference = (torch.tensor(report["rewards"][m], dtype=torch.float64) for m in ("policy", "reference"))
    n = report["held_out_prompts"]
    assert report["samples_per_prompt"] == k and policy.numel() == reference.numel() == n * k
    # the stored rewards are the measured samples' (the first sample of each prompt is the report's example)
    for i, example in enumerate(report["examples"]):
        assert policy[i * k].item() == pytest.approx(length("", example["policy"]))
        assert reference[i * k].item() == pytest.approx(length("", example["reference"]))
    differences = policy.view(n, k).mean(dim=1) - reference.view(n, k).mean(dim=1)
    assert differences.abs().max() > 0  # the policy moved (4 steps at 1e-2): its samples are not the reference's
    assert report["reward_gain"] == pytest.approx(differences.mean().item())
    assert report["reward_gain_stderr"] == pytest.approx((differences.std() / n**0.5).item())
    for name, rewards in (("policy_reward", policy), ("reference_reward", reference)):
        assert report[name]["mean"] == pytest.approx(rewards.mean().item())
        assert report[name]["stderr"] == pytest.approx((rewards.view(n, k).mean(dim=1).std() / n**0.5).item())
    independent = (policy.var() / (n * k) + reference.var() / (n * k)).sqrt().item()
    assert report["reward_gain_stderr"] != pytest.approx(independent)
    printed = capsys.readouterr().out
    assert f"gain {report['reward_gain']:+.3f} +- {report['reward_gain_stderr']:.3f}" in printed
    assert f"gain {report['reward_gain']:+.3f} +- {report['reward_gain_stderr']:.3f}" in (out / "report.md").read_text()


# grpo with the KL term and two passes per rollout: the reference's log-probs and the clipped ratios take part
GRPO_KL = ("--beta", "0.04", "--num-iterations", "2")


@pytest.mark.parametrize("command", ["ppo", "rloo", "online-dpo", "grpo"])
def test_resume_from_a_checkpoint_ends_on_the_same_weights(tmp_path, tiny_model_dir, files, command):
    out = tmp_path / "run"
    adaptive = (["--kl-target", "0.5", "--kl-horizon", "20"] if command in ("ppo", "rloo")
                else list(GRPO_KL) if command == "grpo" else [])
    args = args_for(command, tiny_model_dir, files, out, "--save-steps", "2", *adaptive, *LENGTH_REWARD)
    assert main(args) == 0
    uninterrupted = load_file(out / "model.safetensors")
    metrics = rows_of(out)
    shutil.rmtree(out / "checkpoint-4")  # as after a kill between steps 2 and 4
    assert main([*args, "--resume"]) == 0
    resumed = load_file(out / "model.safetensors")
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)
    # the same rollouts, losses and adaptive KL coefficient after the resume; each step logged once
    again = rows_of(out)
    assert [r["step"] for r in again if "objective/scores" in r] == [1, 2, 3, 4]
    for before, after in zip(metrics, again):
        for name in ("objective/scores", "loss/policy", "loss", "objective/kl_coef"):
            assert before.get(name) == after.get(name)


@pytest.mark.parametrize("command", ["ppo", "online-dpo", "grpo"])
def test_lora_takes_its_reference_from_the_adapter_switched_off(tmp_path, tiny_model_dir, files, command):
    out = tmp_path / "run"
    kl = GRPO_KL if command == "grpo" else ()
    assert main(args_for(command, tiny_model_dir, files, out, "--lora", "--lora-r", "4", *kl, *LENGTH_REWARD)) == 0
    assert (out / "adapter_config.json").is_file()
    first = [r for r in rows_of(out) if "objective/kl" in r][0]
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the adapter starts as a no-op
    if command == "grpo":  # and so does its k3 KL term in the loss
        assert first["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("command", ["ppo", "rloo", "grpo"])
def test_one_update_moves_probability_towards_the_samples_with_positive_advantage(tmp_path, tiny_model_dir, files,
                                                                                   command):
    """The direction of learning, on one rollout: after the update, sum_i A_i * (log pi_new(y_i) - log pi_old(y_i))
    > 0 (per token for PPO and GRPO, per sequence for RLOO): the surrogate improved, not only the loss went down."""
    from preftune.cli import build_config, build_parser
    from preftune.forward.rollout import token_logps
    from preftune.recipes import grpo, online, ppo, rloo

    passes = ("--num-iterations" if command == "grpo" else "--num-ppo-epochs", "1")
    argv = args_for(command, tiny_model_dir, files, tmp_path / "run", *passes, "--max-steps", "1",
                    "--rollout-batch-size", "4", "--num-generations", "4", "--warmup-ratio", "0",
                    *(LENGTH_REWARD if command == "grpo" else ()))  # grpo: sentiment's zeros would leave no advantage
    config = build_config(build_parser().parse_args(argv))
    run = {"ppo": ppo, "rloo": rloo, "grpo": grpo}[command].setup(config)
    try:
        rollout = online.collect(run, online.step_positions(run))
        run.objective.score(run, rollout)
        online.optimise(run, rollout)
        with torch.no_grad():
            new = token_logps(run.models.policy, rollout.samples, run.tokenizer.pad_token_id, rollout.width, "cpu")
        change = (new - rollout.logps) * rollout.mask
        advantages = rollout.extras["advantages"]
        improvement = ((advantages * change).sum() if command == "ppo" else (advantages * change.sum(1)).sum()
                       if command == "rloo" else (advantages[:, None] * change).sum())
        assert change.abs().max() > 0 and improvement > 0
    finally:
        online.cleanup(run)


def test_online_dpo_step_raises_the_margin_of_its_pairs(tmp_path, tiny_model_dir, files):
    """The direction of learning, on one rollout: after one online DPO update the policy's log-ratio margin
    (log pi(y_w) - log pi(y_l), the reference's cancels) grows on the rollout's decided pairs."""
    from preftune.cli import build_config, build_parser
    from preftune.forward.rollout import token_logps
    from preftune.recipes import online, online_dpo

    argv = args_for("online-dpo", tiny_model_dir, files, tmp_path / "run", "--max-steps", "1",
                    "--rollout-batch-size", "4", "--warmup-ratio", "0", *LENGTH_REWARD)
    config = build_config(build_parser().parse_args(argv))
    run = online_dpo.setup(config)
    try:
        rollout = online.collect(run, online.step_positions(run))
        assert run.objective.score(run, rollout)["objective/tie_rate"] == 0
        online.optimise(run, rollout)
        with torch.no_grad():
            new = token_logps(run.models.policy, rollout.samples, run.tokenizer.pad_token_id, rollout.width, "cpu")
        change = ((new - rollout.logps) * rollout.mask).sum(1).view(-1, 2)
        first_is_chosen = rollout.extras["first_is_chosen"][0::2]
        sign = torch.where(first_is_chosen, 1.0, -1.0)
        assert (sign * (change[:, 0] - change[:, 1])).sum() > 0
    finally:
        online.cleanup(run)


def test_iterative_online_dpo_moves_the_reference_to_the_policy_after_each_round(tmp_path, tiny_model_dir, files):
    """--sync-ref-model with alpha 1 every 4 optimizer steps (TRL's unit), a round's 2 epochs x 2 minibatches: each
    round's rollout is sampled with the reference equal to the policy, so its KL is 0 after the first round (the
    first round's reference is the starting model too): to float rounding in training (log pi_old comes from the
    sampling forward, KV-cached, log pi_ref from a full forward), exactly in the held-out measurement (both from
    full forwards)."""
    out = tmp_path / "run"
    assert main(args_for("online-dpo", tiny_model_dir, files, out, "--rollout-batch-size", "4", "--max-steps", "3",
                         "--num-ppo-epochs", "2", "--num-mini-batches", "2", "--sync-ref-model",
                         "--ref-model-mixup-alpha", "1", "--ref-model-sync-steps", "4", *LENGTH_REWARD)) == 0
    train = [r for r in rows_of(out) if "objective/kl" in r]
    assert len(train) == 3 and all(abs(r["objective/kl"]) < 1e-5 for r in train)
    report = json.loads((out / "rl_report.json").read_text())
    assert report["kl_policy_reference"]["mean"] == 0.0  # measured against the last round's reference


@pytest.mark.parametrize(("extra", "message"), [
    (["--num-generations", "1"], "--num-generations must be >= 2"),
    (["online-dpo", "--num-generations", "3"], "online-dpo ranks two samples per prompt into a pair"),
    (["online-dpo", "--kl-coef", "0.1"], "--kl-coef has no effect in online-dpo"),
    (["--normalize-advantages"], "--normalize-advantages has no effect in ppo"),
    (["--reward", "no_such_module:f"], "--reward no_such_module:f: cannot import f from no_such_module"),
    (["--data", "PAIRS"], "reads prompts from --prompts or from the pairs of --data, not both"),
    (["--kl-horizon", "5"], "--kl-horizon has no effect without --kl-target"),
    (["online-dpo", "--sync-ref-model", "--num-mini-batches", "2", "--ref-model-sync-steps", "3"],
     "it must be a multiple of a rollout's 2 optimizer steps (--num-ppo-epochs x --num-mini-batches), got 3"),
    (["grpo", "--loss-type", "sigmoid"], "--loss-type 'sigmoid' is not a grpo loss type; choose one of: dapo, grpo"),
    (["grpo", "--beta", "-0.1"], "--beta must be >= 0 in grpo"),
    (["grpo", "--scale-rewards", "std"], "--scale-rewards must be one of group, batch, none, got 'std'"),
    (["grpo", "--importance-sampling-level", "seq"], "--importance-sampling-level must be one of token, sequence"),
    (["grpo", "--top-entropy-quantile", "1.5"], "--top-entropy-quantile must be in [0, 1], got 1.5"),
    (["grpo", "--delta", "0.9"], "--delta caps the importance weight: it must be > 1, got 0.9"),
    (["grpo", "--kl-coef", "0.1"], "--kl-coef has no effect in grpo (TRL GRPO's names: --beta"),
    (["grpo", "--num-ppo-epochs", "2"], "--num-ppo-epochs has no effect in grpo"),
    (["grpo", "--loss-type", "cispo", "--delta", "2"], "--delta has no effect with --loss-type cispo"),
    (["grpo", "--sapo-temperature-pos", "2"], "--sapo-temperature-pos has no effect with --loss-type dapo"),
    (["--epsilon-high", "0.28"], "--epsilon-high has no effect in ppo (TRL GRPO's options: they configure grpo)"),
])
def test_bad_options_exit_2_before_anything_is_written(tmp_path, tiny_model_dir, files, capsys, extra, message):
    command = "rloo" if "--num-generations" in extra else "ppo"
    if extra[0] in ("online-dpo", "grpo"):
        command, extra = extra[0], extra[1:]
    out = tmp_path / "run"
    extra = [str(files["pairs"]) if value == "PAIRS" else value for value in extra]
    assert main(args_for(command, tiny_model_dir, files, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ppo_under_fsdp_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, files, capsys, monkeypatch):
    """PPO trains its policy and critic as one module, which FSDP would shard as one root: sampling and the critic's
    values call each part alone, outside the root's forward that gathers its weights. Refused when the launcher asks
    for FSDP (the variable `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets), before the run
    folder exists; RLOO and online DPO run under FSDP (the two-process test)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "run"
    assert main(args_for("ppo", tiny_model_dir, files, out)) == 2
    err = capsys.readouterr().err
    assert "preftune ppo under FSDP is not supported: its policy and critic" in err and "Traceback" not in err
    assert "configs/accelerate/ddp.yaml" in err and not out.exists()


def test_a_bad_prompts_line_is_named(tmp_path, tiny_model_dir, files, capsys):
    files["prompts"].write_text('{"prompt": "fine"}\n{"text": "no prompt here"}\n')
    assert main(args_for("rloo", tiny_model_dir, files, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl: line 2: field 'prompt'" in err and not (tmp_path / "run").exists()


def test_objective_scores_are_the_scores_less_the_missing_eos_penalty():
    """objective/scores and objective/rlhf_reward both start from the penalised score, as TRL logs them."""
    from preftune.recipes.online import Rollout, rollout_metrics

    mask = torch.ones(2, 3, dtype=torch.bool)
    logps, ref_logps = torch.full((2, 3), -1.0), torch.full((2, 3), -1.5)  # KL 0.5 a token, 1.5 a completion
    raw, penalised = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])  # the second did not end: penalty 2
    metrics = rollout_metrics(Rollout([], mask, logps, ref_logps, penalised, raw), kl_coef=0.1)
    assert metrics["objective/scores"] == pytest.approx(1.0)
    assert metrics["objective/rlhf_reward"] == pytest.approx(1.0 - 0.1 * 1.5)


def test_the_missing_eos_penalty_falls_on_the_completions_cut_off_alone():
    """A completion that does not end on EOS (cut off at --max-new-tokens) loses the penalty; the scores given are
    left as they were; unset, the scores are unchanged."""
    from preftune.forward.rollout import Sample
    from preftune.recipes.online import missing_eos_penalized

    samples = [Sample(0, [1], [5, 2], "a"), Sample(0, [1], [5, 6], "b"), Sample(1, [1], [2], "")]  # EOS: 2
    scores = torch.tensor([1.0, 3.0, -1.0])
    assert missing_eos_penalized(scores, samples, 2, 2.0).tolist() == [1.0, 1.0, -1.0]
    assert missing_eos_penalized(scores, samples, 2, None).tolist() == [1.0, 3.0, -1.0]
    assert scores.tolist() == [1.0, 3.0, -1.0]


@pytest.mark.parametrize("command", ["ppo", "rloo"])
def test_the_minibatch_before_the_first_update_has_ratio_exactly_1_under_bf16(tmp_path, tiny_model_dir, files,
                                                                             command):
    """Under bf16 the rollout's log pi_old (one forward in rollout order) and a shuffled half-rollout minibatch's
    log-probs round differently; the first minibatch is on-policy all the same (no update since sampling): its
    ratio is exactly 1, nothing clipped. The minibatches after updates are measured against the rollout's log pi_old
    (their ratio moves)."""
    from preftune.cli import build_config, build_parser
    from preftune.recipes import online, ppo, rloo

    argv = args_for(command, tiny_model_dir, files, tmp_path / "run", "--bf16", "--max-steps", "1",
                    "--rollout-batch-size", "4", "--num-generations", "4", "--num-ppo-epochs", "2",
                    "--num-mini-batches", "2", "--max-new-tokens", "12", *LENGTH_REWARD)
    run = (ppo if command == "ppo" else rloo).setup(build_config(build_parser().parse_args(argv)))
    metrics, loss_terms = [], run.objective.loss_terms

    def recorded(*args, **kwargs):  # the policy term's metrics of each minibatch (PPO's critic term comes apart)
        for term in loss_terms(*args, **kwargs):
            values = {name: value.item() for name, value in term[1].items()}
            if "policy/ratio" in values:
                metrics.append(values)
            yield term

    try:
        assert run.group.accelerator.mixed_precision == "bf16"
        run.objective.loss_terms = recorded
        rollout = online.collect(run, online.step_positions(run))
        run.objective.score(run, rollout)
        online.optimise(run, rollout)
    finally:
        online.cleanup(run)
    assert len(metrics) == 4
    first = metrics[0]
    assert first["policy/ratio"] == 1.0 and first["policy/clipfrac"] == 0.0 and first["policy/approxkl"] == 0.0
    assert all(m["policy/ratio"] != 1.0 for m in metrics[1:])


@pytest.mark.parametrize(("bad", "stopped_at"), [({0, 1, 2}, 1), ({2, 3, 4}, 2), ({0, 1, 3, 5, 6, 8}, None)],
                         ids=["in-one-rollout", "across-rollouts", "never-3-in-a-row"])
def test_max_bad_steps_counts_optimizer_steps_in_a_row(tmp_path, tiny_model_dir, files, bad, stopped_at):
    """4 minibatch steps per rollout, --max-bad-steps 3: the run stops (with a checkpoint) once 3 optimizer steps
    in a row had a non-finite loss, within a rollout or across two, and the rollout's remaining minibatches are
    not run; bad steps with good ones between do not stop it."""
    from preftune.cli import build_config, build_parser
    from preftune.errors import UserError
    from preftune.recipes import online, rloo

    argv = args_for("rloo", tiny_model_dir, files, tmp_path / "run", "--max-steps", "3", "--num-generations", "4",
                    "--num-mini-batches", "4", "--max-bad-steps", "3", *LENGTH_REWARD)
    run = rloo.setup(build_config(build_parser().parse_args(argv)))
    calls, loss = [], run.objective.loss

    def sometimes_nan(*args, **kwargs):
        value, metrics = loss(*args, **kwargs)
        calls.append(len(calls))
        return (value * float("nan"), metrics) if calls[-1] in bad else (value, metrics)

    run.objective.loss = sometimes_nan
    try:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            if stopped_at is None:
                online.train(run)
            else:
                with pytest.raises(UserError, match=f"stopped at rollout {stopped_at}: 3 optimizer steps in a row"):
                    online.train(run)
    finally:
        online.cleanup(run)
    assert len(calls) == (12 if stopped_at is None else max(bad) + 1)
    if stopped_at is not None:
        assert (tmp_path / "run" / f"checkpoint-{stopped_at}").is_dir()


def test_the_iterative_dpo_config_file_validates_as_documented():
    from preftune.cli import build_config, build_parser

    config = build_config(build_parser().parse_args(["online-dpo", "--config", "configs/iterative-dpo.yaml"]))
    assert config.train.sync_ref_model and config.train.ref_model_mixup_alpha == 1.0
    assert config.rl.rollout_batch_size == 256 and config.rl.num_ppo_epochs == 2


@pytest.mark.slow
@pytest.mark.parametrize("command", ["rloo", "online-dpo", "grpo"])
def test_resume_after_kill_9_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, files, command):
    """kill -9 at a seeded random step between checkpoints (PREFTUNE_KILL_SEED, as the DPO test), then --resume: the
    same weights and the same logged rollouts as a run never killed."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    steps, save_every = 12, 3
    seed = int(os.environ.get("PREFTUNE_KILL_SEED", "20261202"))
    target = random.Random(f"{seed}-{command}").randint(save_every + 1, steps - save_every - 1)
    print(f"killing after logged step {target} (PREFTUNE_KILL_SEED={seed})")

    def args(out: Path) -> list[str]:
        return args_for(command, tiny_model_dir, files, out, "--max-steps", str(steps), "--save-steps",
                        str(save_every), *LENGTH_REWARD)

    uninterrupted = tmp_path / "uninterrupted"
    assert main(args(uninterrupted)) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    process = subprocess.Popen([sys.executable, "-m", "preftune.cli", *args(out)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= target:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    assert process.wait(timeout=300) == -signal.SIGKILL, "the run finished before it could be killed"
    assert main([*args(out), "--resume"]) == 0
    expected, resumed = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    train = [r for r in rows_of(out) if "objective/scores" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))  # each rollout logged once
    assert [r["objective/scores"] for r in train] == [r["objective/scores"] for r in rows_of(uninterrupted)
                                                      if "objective/scores" in r]


NORMALIZED = ("--normalize-advantages",)  # RLOO normalises its advantages over both processes' (TRL gathers them)


@pytest.mark.slow
@pytest.mark.parametrize(("command", "loss", "engine", "options"), [
    ("rloo", "loss/policy", "ddp", NORMALIZED),
    ("online-dpo", "loss", "ddp", ()),
    ("rloo", "loss/policy", "fsdp", NORMALIZED),
    ("online-dpo", "loss", "fsdp", ()),
    # the reference: the sharded policy with its adapter off; the first forward is peft's generate, past the root
    ("rloo", "loss/policy", "fsdp", (*NORMALIZED, "--lora", "--merge", "--learning-rate", "1e-2")),
    # dapo's token normaliser and the batch std over both processes' rollouts; the KL term's reference
    ("grpo", "loss", "ddp", ("--scale-rewards", "batch", "--beta", "0.04")),
    ("grpo", "loss", "fsdp", ("--loss-type", "dr_grpo", "--importance-sampling-level", "sequence")),
], ids=["rloo-ddp", "online-dpo-ddp", "rloo-fsdp", "online-dpo-fsdp", "rloo-fsdp-lora-merged", "grpo-ddp",
        "grpo-fsdp"])
def test_two_processes_sample_and_train_as_one_process_with_twice_the_prompts(tmp_path, tiny_model_dir, files,
                                                                              monkeypatch, capfd, command, loss,
                                                                              engine, options):
    """Rollouts sharded over 2 processes (2 prompts each) equal 1 process with 4 prompts: each sample comes from its
    own seed, so both sample the same completions, and DDP averages the two halves' gradients; RLOO normalises its
    advantages over both processes' (as TRL, after gathering them). Scores, KL and losses at every step, the
    held-out measurements and report, and the saved weights, equal to 1e-5. (PPO whitens its advantages over each
    process's rollout and averages its losses over each process's tokens, as TRL's PPOTrainer did, so there 2 x b
    equals 1 x 2b only in expectation.)

    FSDP2 (configs/accelerate/fsdp.yaml, as `accelerate launch` sets it up, on CPU processes over gloo): the policy
    and the reference sharded, sampling with synced_gpus, every process in the held-out measurement, the saved
    model gathered whole; and a resumed run ends on the same weights to the bit."""
    from benchmarks.bench_sharding import launch_environment

    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{Path(__file__).resolve().parents[1]}")  # the reward, for torchrun's
    common = [command, "--model", str(tiny_model_dir), "--prompts", str(files["prompts"]), "--max-new-tokens", "6",
              "--max-steps", "3", "--learning-rate", "1e-3", "--num-mini-batches", "1", "--report-to", "none",
              "--seed", "3", "--eval-data", str(files["pairs"]), "--samples-per-eval-prompt", "2", "--eval-steps", "2",
              "--save-steps", "2", *LENGTH_REWARD, *options]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--output-dir", str(one), "--rollout-batch-size", "4"]) == 0
    for name, value in launch_environment(engine, processes=2).items():  # read by the processes torchrun starts
        monkeypatch.setenv(name, value)
    two_processes = [*common, "--output-dir", str(two), "--rollout-batch-size", "2", "--num-processes", "2"]
    capfd.readouterr()
    assert main(two_processes) == 0
    if engine == "fsdp":
        held, total = (int(n.replace(",", "")) for n in re.search(
            r"FSDP: each process holds a slice of the weights \(([\d,]+) of ([\d,]+)", capfd.readouterr().out).groups())
        assert held <= total // 2 + 64  # sharded: half of every weight, up to rounding of odd first dimensions
    one_rows, two_rows = rows_of(one), rows_of(two)
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows] == [1, 2, 2, 3, 3]  # eval at 2 and 3
    for a, b in zip(one_rows, two_rows, strict=True):
        assert a.get("episode") == b.get("episode")
        for name in ("objective/scores", "objective/kl", "objective/entropy", loss, "eval_reward", "eval_kl"):
            if name in a:
                assert abs(a[name] - b[name]) <= 1e-5 * max(1.0, abs(a[name])), (a["step"], name, a[name], b[name])
    reports = [json.loads((run / "rl_report.json").read_text()) for run in (one, two)]
    assert reports[0]["examples"] == reports[1]["examples"]  # the same held-out samples
    for name in ("policy_reward", "reference_reward", "kl_policy_reference"):
        assert reports[1][name]["mean"] == pytest.approx(reports[0][name]["mean"], abs=1e-5), name
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert max((weights_one[n] - start[n]).abs().max() for n in start) > 1e-4  # training moved the weights
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=1e-5, rtol=0.0)
    if engine == "fsdp":  # step 3 again from checkpoint-2: its optimizer state gathered to the file and sliced back
        assert main([*two_processes, "--resume"]) == 0
        resumed = load_file(two / "model.safetensors")
        assert all(torch.equal(weights_two[name], resumed[name]) for name in weights_two)
        assert [r["step"] for r in rows_of(two)] == [1, 2, 2, 3, 3]  # each step logged once


USER_REWARDS = '''import math

calls = [0]


def nan(prompt, completion):
    return float("nan")


def infinite(prompt, completion):
    return -math.inf


def text(prompt, completion):
    return "good"


def raises(prompt, completion):
    raise ValueError("cannot parse " + repr(completion[:3]))


def late_nan(prompt, completion):  # fine for two rollouts of 4 samples, then NaN
    calls[0] += 1
    return 1.0 if calls[0] <= 8 else float("nan")


def never(prompt, completion):  # cannot judge anything
    return None


def picky(prompt, completion):  # cannot judge a completion of odd length
    return None if len(completion) % 2 else len(completion) + 1e-3 * sum(map(ord, completion))
'''


@pytest.fixture
def user_rewards(tmp_path, files):
    """`--reward user_rewards:NAME`: rewards a new user might write, some of them wrong."""
    (tmp_path / "user_rewards.py").write_text(USER_REWARDS)
    import user_rewards

    user_rewards.calls[0] = 0
    return user_rewards


def named_sample(err: str) -> bool:
    """The message quotes one of the prompts and a completion."""
    return any(f"  prompt: {p['prompt']!r}\n  completion: '" in err for p in PROMPTS)


@pytest.mark.parametrize(("function", "problem"), [
    ("nan", "returned nan"), ("infinite", "returned -inf"), ("text", "returned str 'good', not a number"),
    ("raises", "raised ValueError: cannot parse"),
])
def test_a_reward_that_misbehaves_stops_the_run_with_exit_2_naming_the_prompt_and_completion(
        tmp_path, tiny_model_dir, files, user_rewards, capsys, function, problem):
    """It once trained on NaN (exit 0, `score=+nan`) or ended in preftune's traceback (a string, an exception)."""
    out = tmp_path / "run"
    assert main(args_for("rloo", tiny_model_dir, files, out, "--reward", f"user_rewards:{function}")) == 2
    err = capsys.readouterr().err
    assert f"stopped at step 0 of 4, in step 1's rollout: the reward user_rewards:{function} {problem}" in err
    assert named_sample(err) and "No checkpoint was written yet" in err
    if function == "raises":  # the user's own traceback, not preftune's
        assert "The reward's traceback:" in err and 'user_rewards.py", line 19, in raises' in err
        assert "preftune/forward/rewards.py" not in err
    else:
        assert "Traceback" not in err
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_a_reward_failing_mid_run_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir, files,
                                                                                 user_rewards, capsys):
    out = tmp_path / "run"
    assert main(args_for("ppo", tiny_model_dir, files, out, "--save-steps", "2", "--eval-reward", "sentiment",
                         "--reward", "user_rewards:late_nan")) == 2
    err = capsys.readouterr().err
    assert "stopped at step 2 of 4, in step 3's rollout: the reward user_rewards:late_nan returned nan" in err
    assert named_sample(err) and f"The last checkpoint is {out / 'checkpoint-2'}" in err
    assert f"preftune ppo --config {out / CONFIG_FILE} --resume" in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"] and not (out / "model.safetensors").exists()


def test_a_reward_giving_the_wrong_count_is_named():
    from preftune.errors import UserError
    from preftune.forward.rewards import checked

    reward = checked(lambda prompts, completions: [1.0], "<in-memory reward: one>")
    with pytest.raises(UserError, match=r"(?s)the reward <in-memory reward: one> returned a list of 1 for 2 "
                                        r"completions, the first:\n  prompt: 'a'\n  completion: ' b'"):
        reward(["a", "c"], [" b", " d"])
    assert reward(["a"], [" b"]) == [1.0]


@pytest.mark.parametrize("command", ["ppo", "rloo", "online-dpo", "grpo"])
def test_a_reward_that_judges_nothing_trains_nothing(tmp_path, tiny_model_dir, files, user_rewards, command):
    """None ("cannot judge", TRL's form) skips a completion: no loss. A reward that judges none of them leaves the
    policy as it started (zero gradients: AdamW does not move it); the measurement uses --eval-reward."""
    out = tmp_path / "run"
    assert main(args_for(command, tiny_model_dir, files, out, "--reward", "user_rewards:never",
                         "--eval-reward", "sentiment")) == 0
    trained, start = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert all(torch.equal(trained[name], start[name]) for name in start)
    train = [r for r in rows_of(out) if "objective/scores" in r]
    assert len(train) == 4 and all(r["objective/unjudged_fraction"] == 1.0 for r in train)


@pytest.mark.parametrize("command", ["ppo", "rloo", "online-dpo", "grpo"])
def test_a_reward_that_cannot_judge_some_completions_trains_on_the_others(tmp_path, tiny_model_dir, files,
                                                                          user_rewards, command):
    out = tmp_path / "run"
    assert main(args_for(command, tiny_model_dir, files, out, "--reward", "user_rewards:picky",
                         "--eval-reward", "sentiment", "--max-new-tokens", "12")) == 0
    train = [r for r in rows_of(out) if "objective/scores" in r]
    assert all(math.isfinite(value) for r in train for value in r.values() if isinstance(value, float))
    assert 0 < sum(r["objective/unjudged_fraction"] for r in train) < 4


def test_a_held_out_measurement_needs_every_completion_judged(tmp_path, tiny_model_dir, files, user_rewards, capsys):
    """Held-out means leaving out what the reward cannot judge would compare the policy and the reference on
    different samples: an error that says what to do."""
    out = tmp_path / "run"
    assert main(args_for("rloo", tiny_model_dir, files, out, "--reward", "user_rewards:never")) == 2
    err = capsys.readouterr().err
    assert "the reward user_rewards:never returned None (cannot judge) in a held-out measurement" in err
    assert "--eval-reward" in err and named_sample(err) and "Traceback" not in err


def test_rloo_baselines_each_judged_sample_by_the_other_judged_samples_of_its_prompt():
    from preftune.objectives.policy_gradient import leave_one_out_advantages
    from preftune.recipes.rloo import judged_leave_one_out

    rewards = torch.tensor([1.0, 2.0, 6.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    judged = torch.tensor([True, True, True, True, False, True, True, False, False])
    advantages, trained = judged_leave_one_out(rewards, judged, 3)
    # prompt 1: all three (r - mean of the other two); prompt 2: 4 and 6 against each other; prompt 3: one judged
    # sample has no baseline, so none of the prompt's samples trains
    assert advantages.tolist() == [1 - 4.0, 2 - 3.5, 6 - 1.5, 4 - 6.0, 0.0, 6 - 4.0, 0.0, 0.0, 0.0]
    assert trained.tolist() == [True, True, True, True, False, True, False, False, False]
    every = torch.ones(9, dtype=torch.bool)
    assert torch.equal(judged_leave_one_out(rewards, every, 3)[0], leave_one_out_advantages(rewards, 3))


def tiny_rollout(tokenizer, judged: list[bool]):
    from preftune.forward.rollout import Sample, completion_mask
    from preftune.recipes.online import Rollout

    torch.manual_seed(0)
    prompt = tokenizer("The movie was")["input_ids"]
    completions = [[300, 301], [302], [303, 304, 305], [306, 307]]
    samples = [Sample(i // 2, prompt, ids, "") for i, ids in enumerate(completions)]
    mask = completion_mask(samples, 3)
    logps, ref_logps = -torch.rand(4, 3) * mask, -torch.rand(4, 3) * mask
    scores = torch.tensor([0.1, 0.7, 0.3, 0.9])
    return Rollout(samples, mask, logps, ref_logps, scores, scores.clone(), torch.tensor(judged))


def test_ppo_trains_on_the_judged_samples_as_if_the_others_were_not_sampled(tiny_model_dir):
    """A sample the reward could not judge: its rows leave the advantages' whitening, the value and policy losses;
    the rollout scores and trains as the rollout without it."""
    import contextlib
    import warnings
    from types import SimpleNamespace

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from preftune.config import Config
    from preftune.recipes.ppo import PolicyAndValue, PPOObjective

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        critic = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model = PolicyAndValue(AutoModelForCausalLM.from_pretrained(tiny_model_dir), critic, tokenizer.pad_token_id)
    group = SimpleNamespace(unwrap=lambda m: m, accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
    run = SimpleNamespace(group=group, model=model, tokenizer=tokenizer, state=SimpleNamespace(kl_coef=0.05))
    objective = PPOObjective(Config())
    with_unjudged = tiny_rollout(tokenizer, [True, False, True, True])
    without = with_unjudged.rows(torch.tensor([0, 2, 3]))
    without.judged = torch.ones(3, dtype=torch.bool)
    results = []
    for rollout in (with_unjudged, without):
        scored = objective.score(run, rollout)
        loss, metrics = objective.loss(model, rollout)
        results.append((loss.item(), {**scored, **{k: v.item() for k, v in metrics.items()}}))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-6)
    assert with_unjudged.extras["advantages"][1].abs().sum() == 0


def test_online_dpo_leaves_a_pair_undecided_when_a_sample_is_unjudged(tiny_model_dir):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from preftune.config import Config, loss_params
    from preftune.recipes.online_dpo import OnlineDPOObjective

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = Config()
    objective = OnlineDPOObjective(config, loss_params(config.loss), pad_token_id=tokenizer.pad_token_id)
    rollout = tiny_rollout(tokenizer, [True, True, True, False])
    scored = objective.score(SimpleNamespace(), rollout)
    assert rollout.extras["decided"].tolist() == [True, True, False, False]
    assert scored == pytest.approx({"objective/chosen_scores": 0.7, "objective/rejected_scores": 0.1,
                                    "objective/scores_margin": 0.6, "objective/tie_rate": 0.0})
    loss, _ = objective.loss(policy, rollout)
    first_pair = rollout.rows(torch.tensor([0, 1]))
    objective.score(SimpleNamespace(), first_pair)
    assert loss.item() == pytest.approx(objective.loss(policy, first_pair)[0].item(), abs=1e-6)


SEVEN_PROMPTS = [{"prompt": p} for p in ["The movie was", "I think the ending", "Review:", "Honestly, this film",
                                         "The plot", "My friend said it", "At the cinema"]]


def test_prompts_that_leave_a_remainder_give_only_full_rollouts(tmp_path, tiny_model_dir, files, monkeypatch):
    """7 prompts, 2 per rollout, 2 epochs: 3 full rollouts an epoch (the 7th prompt skipped, as TRL's drop_last),
    each of 2 x 2 completions in --num-mini-batches 4 minibatches of 1. Before, each epoch ended on a rollout of 1
    prompt, which torch.chunk split into 2 minibatches."""
    from preftune.recipes import online

    write_jsonl(files["prompts"], SEVEN_PROMPTS)
    sizes, minibatches = [], []
    collect, rows = online.collect, online.Rollout.rows
    # the loop's own name for it (train is in online/loop.py)
    monkeypatch.setattr(online.loop, "collect", lambda run, at: sizes.append(len(at)) or collect(run, at))
    monkeypatch.setattr(online.Rollout, "rows", lambda self, index: minibatches.append(len(index)) or rows(self, index))
    out = tmp_path / "run"
    assert main(args_for("rloo", tiny_model_dir, files, out, "--max-steps", "-1", "--num-epochs", "2",
                         "--num-mini-batches", "4", *LENGTH_REWARD)) == 0
    train = [r for r in rows_of(out) if "objective/scores" in r]
    assert [(r["step"], r["episode"]) for r in train] == [(s, 4 * s) for s in range(1, 7)]
    assert sizes == [2] * 6 and minibatches == [1] * 24
    assert json.loads((out / "rl_report.json").read_text())["completions_generated"] == 24


def test_fewer_prompts_than_one_rollout_exit_2_before_anything_is_written(tmp_path, tiny_model_dir, files, capsys):
    write_jsonl(files["prompts"], SEVEN_PROMPTS[:3])
    out = tmp_path / "run"
    assert main(args_for("rloo", tiny_model_dir, files, out, "--rollout-batch-size", "4", *LENGTH_REWARD)) == 2
    err = capsys.readouterr().err
    assert "3 distinct prompts are fewer than one rollout's 4" in err and "--rollout-batch-size" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_a_kl_horizon_too_short_for_an_external_launch_exit_2_before_any_model_loads(tmp_path, tiny_model_dir, files,
                                                                                      monkeypatch, capfd):
    """--kl-horizon 1 passes validation for 1 process (4 completions a rollout) but not for the 2 processes torchrun
    starts without --num-processes (8): both stop with exit 2 naming --kl-horizon, before the run folder is made.
    Before, the run failed with a traceback after its first rollout."""
    from preftune.runtime.accelerator import launch_processes

    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{Path(__file__).resolve().parents[1]}")  # the reward, for torchrun's
    out = tmp_path / "run"
    argv = args_for("rloo", tiny_model_dir, files, out, "--kl-target", "1", "--kl-horizon", "1", *LENGTH_REWARD)
    assert launch_processes(2, argv) == 2
    err = capfd.readouterr().err
    assert "--kl-horizon must be more than a fifth of a rollout's 8 completions" in err and "x 2 processes" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_two_processes_drop_the_short_last_rollout_of_an_epoch_and_stay_in_step(tmp_path, tiny_model_dir, files,
                                                                               monkeypatch):
    """7 prompts, 2 processes x 2 prompts: each epoch is one full rollout of 4 prompts (the last 3 dropped, as TRL's
    drop_last). Before, the short last one split 1 and 2 prompts between the processes, which then took 2 and 4
    minibatch steps (--num-mini-batches 4) and fell out of step in DDP's gradient all-reduce."""
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{Path(__file__).resolve().parents[1]}")  # the reward, for torchrun's
    write_jsonl(files["prompts"], SEVEN_PROMPTS)
    out = tmp_path / "run"
    assert main(["rloo", "--model", str(tiny_model_dir), "--prompts", str(files["prompts"]), "--max-new-tokens", "4",
                 "--num-epochs", "2", "--rollout-batch-size", "2", "--num-processes", "2", "--num-mini-batches", "4",
                 "--report-to", "none", "--output-dir", str(out), *LENGTH_REWARD]) == 0
    train = [r for r in rows_of(out) if "objective/scores" in r]
    assert [(r["step"], r["episode"]) for r in train] == [(1, 8), (2, 16)]
