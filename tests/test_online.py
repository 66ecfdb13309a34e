"""`preftune ppo`, `rloo` and `online-dpo` through the CLI on tiny models: what a run writes, TRL's metric names,
held-out measurement, exact resume, LoRA, learning on a reward the policy can reach, iterative DPO's reference
updates, and user errors (exit 2, no traceback, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.model_card import read_front_matter
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
    for name in ["objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "lr", *names]:
        assert all(isinstance(r[name], float) for r in train), name
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


@pytest.mark.parametrize("command", ["ppo", "rloo", "online-dpo"])
def test_resume_from_a_checkpoint_ends_on_the_same_weights(tmp_path, tiny_model_dir, files, command):
    out = tmp_path / "run"
    adaptive = ["--kl-target", "0.5", "--kl-horizon", "20"] if command != "online-dpo" else []
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


@pytest.mark.parametrize("command", ["ppo", "online-dpo"])
def test_lora_takes_its_reference_from_the_adapter_switched_off(tmp_path, tiny_model_dir, files, command):
    out = tmp_path / "run"
    assert main(args_for(command, tiny_model_dir, files, out, "--lora", "--lora-r", "4", *LENGTH_REWARD)) == 0
    assert (out / "adapter_config.json").is_file()
    first = [r for r in rows_of(out) if "objective/kl" in r][0]
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the adapter starts as a no-op


@pytest.mark.parametrize("command", ["ppo", "rloo"])
def test_one_update_moves_probability_towards_the_samples_with_positive_advantage(tmp_path, tiny_model_dir, files,
                                                                                   command):
    """The direction of learning, on one rollout: after the update, sum_i A_i * (log pi_new(y_i) - log pi_old(y_i))
    > 0 (per token for PPO, per sequence for RLOO): the surrogate improved, not only the loss went down."""
    from preftune.cli import build_config, build_parser
    from preftune.recipes import online, ppo, rloo
    from preftune.rollout import token_logps

    argv = args_for(command, tiny_model_dir, files, tmp_path / "run", "--num-ppo-epochs", "1", "--max-steps", "1",
                    "--rollout-batch-size", "4", "--num-generations", "4", "--warmup-ratio", "0")
    config = build_config(build_parser().parse_args(argv))
    run = (ppo if command == "ppo" else rloo).setup(config)
    try:
        rollout = online.collect(run, online.step_positions(run))
        run.objective.score(run, rollout)
        online.optimise(run, rollout)
        with torch.no_grad():
            new = token_logps(run.models.policy, rollout.samples, run.tokenizer.pad_token_id, rollout.width, "cpu")
        change = (new - rollout.logps) * rollout.mask
        advantages = rollout.extras["advantages"]
        improvement = (advantages * change).sum() if command == "ppo" else (advantages * change.sum(1)).sum()
        assert change.abs().max() > 0 and improvement > 0
    finally:
        online.cleanup(run)


def test_online_dpo_step_raises_the_margin_of_its_pairs(tmp_path, tiny_model_dir, files):
    """The direction of learning, on one rollout: after one online DPO update the policy's log-ratio margin
    (log pi(y_w) - log pi(y_l), the reference's cancels) grows on the rollout's decided pairs."""
    from preftune.cli import build_config, build_parser
    from preftune.recipes import online, online_dpo
    from preftune.rollout import token_logps

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
])
def test_bad_options_exit_2_before_anything_is_written(tmp_path, tiny_model_dir, files, capsys, extra, message):
    command = "rloo" if "--num-generations" in extra else "ppo"
    if extra[0] == "online-dpo":
        command, extra = extra[0], extra[1:]
    out = tmp_path / "run"
    extra = [str(files["pairs"]) if value == "PAIRS" else value for value in extra]
    assert main(args_for(command, tiny_model_dir, files, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


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
    metrics, loss = [], run.objective.loss

    def recorded(*args, **kwargs):
        result = loss(*args, **kwargs)
        metrics.append({name: value.item() for name, value in result[1].items()})
        return result

    try:
        assert run.group.accelerator.mixed_precision == "bf16"
        run.objective.loss = recorded
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
@pytest.mark.parametrize("command", ["rloo", "online-dpo"])
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


@pytest.mark.slow
@pytest.mark.parametrize(("command", "loss", "extra"), [("rloo", "loss/policy", ["--normalize-advantages"]),
                                                    ("online-dpo", "loss", [])])
def test_two_processes_sample_and_train_as_one_process_with_twice_the_prompts(tmp_path, tiny_model_dir, files,
                                                                              monkeypatch, command, loss, extra):
    """Rollouts sharded over 2 processes (2 prompts each) equal 1 process with 4 prompts: each sample comes from its
    own seed, so both sample the same completions, and DDP averages the two halves' gradients; RLOO normalises its
    advantages over both processes' (as TRL, after gathering them). Scores, KL and losses at every step, and the
    saved weights, equal to 1e-5. (PPO whitens its advantages over each process's rollout and
    averages its losses over each process's tokens, as TRL's PPOTrainer did, so there 2 x b equals 1 x 2b only in
    expectation.)"""
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{Path(__file__).resolve().parents[1]}")  # the reward, for torchrun's
    common = [command, "--model", str(tiny_model_dir), "--prompts", str(files["prompts"]), "--max-new-tokens", "6",
              "--max-steps", "3", "--learning-rate", "1e-3", "--num-mini-batches", "1", "--report-to", "none",
              "--seed", "3", *extra, *LENGTH_REWARD]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--output-dir", str(one), "--rollout-batch-size", "4"]) == 0
    assert main([*common, "--output-dir", str(two), "--rollout-batch-size", "2", "--num-processes", "2"]) == 0
    one_rows, two_rows = rows_of(one), rows_of(two)
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows] == [1, 2, 3]
    for a, b in zip(one_rows, two_rows, strict=True):
        assert a["episode"] == b["episode"]
        for name in ("objective/scores", "objective/kl", "objective/entropy", loss):
            assert abs(a[name] - b[name]) <= 1e-5 * max(1.0, abs(a[name])), (a["step"], name, a[name], b[name])
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert max((weights_one[n] - start[n]).abs().max() for n in start) > 1e-4  # training moved the weights
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=1e-5, rtol=0.0)
