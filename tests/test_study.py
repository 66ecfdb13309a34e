"""`preftune study` end to end on tiny models (each unit a process of its own), its resume after kill -9, and its
statistics, tables and sentences against values derived by hand."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from preftune.cli import main
from preftune.config import Config
from preftune.study.methods import Cost, Point
from preftune.study.report import Study, decision_table, summary_lines
from preftune.study.stats import (
    Constraints,
    Interval,
    Option,
    best_within,
    decide,
    last_point,
    overtakes,
    paired_difference,
    seed_interval,
    t_quantile,
)
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
REWARD = ("def length(prompt, completion):\n"
          "    return len(completion) / 10 + 1e-4 * sum(map(ord, completion))\n")
PROMPTS = ["The movie was", "I think the ending", "Review:", "Honestly, this film", "The plot", "Its music",
           "The cast", "In short,"]


@pytest.fixture
def user_files(tmp_path, monkeypatch) -> dict[str, Path]:
    """Eight labelled pairs, four held-out prompts and a module:function ground truth beside them (the study's
    processes find it in the working folder, as `preftune ppo --reward module:function` does)."""
    (tmp_path / "gold.py").write_text(REWARD)
    monkeypatch.chdir(tmp_path)
    pairs = [{"prompt": p, "chosen": " a long and lovely answer", "rejected": " no"} for p in PROMPTS]
    return {"pairs": write_jsonl(tmp_path / "pairs.jsonl", pairs),
            "held_out": write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": p} for p in ("A film", "The ending was",
                                                                                        "Acting:", "Overall")])}


def study_args(model: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["study", "--model", str(model), "--data", str(files["pairs"]), "--eval-data", str(files["held_out"]),
            "--ground-truth", "gold:length", "--quick", "--learning-rate", "1e-2", "--output-dir", str(out), *extra]


def numbers(folder: Path) -> dict[str, list]:
    """Every unit's points (the numbers; times and memory left out)."""
    result = {}
    for path in sorted((folder / "units").glob("*-s[0-9].json")):
        record = json.loads(path.read_text())
        result[path.stem] = [(p["step"], p["n"], p["kl"], p["reward"], p["prompt_rewards"]) for p in record["points"]]
    return result


def test_a_study_on_the_users_pairs_runs_end_to_end_and_a_rerun_computes_nothing(tmp_path, tiny_model_dir,
                                                                                 user_files, capsys):
    out = tmp_path / "study"
    args = study_args(tiny_model_dir, user_files, out, "--methods", "dpo,rloo,best-of-n,rloo-gt", "--seeds", "0",
                      "--label-budgets", "4,8")
    assert main(args) == 0
    units = sorted(p.stem for p in (out / "units").glob("*-s0.json"))
    assert units == ["best-of-n-n4-s0", "best-of-n-n8-s0", "dpo-beta0.1-n4-s0", "dpo-beta0.1-n8-s0",
                     "reference-s0", "reward-model-n4-s0", "reward-model-n8-s0", "rloo-gt-s0", "rloo-n4-s0",
                     "rloo-n8-s0"]
    labels = [json.loads(line) for line in (out / "labels" / "labels-n4-s0.jsonl").read_text().splitlines()]
    assert len(labels) == 4 and labels == [json.loads(line) for line in
                                           (out / "labels" / "labels-n8-s0.jsonl").read_text().splitlines()][:4]
    record = json.loads((out / "units" / "rloo-n4-s0.json").read_text())
    assert [p["step"] for p in record["points"]] == [1, 2]  # --quick: 2 rollouts, a point at each
    assert all(p["labels"] == 4 and len(p["prompt_rewards"]) == 4 for p in record["points"])
    for name in ("label_efficiency.png", "reward_kl.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    for name in ("matched_kl.md", "differences.md", "costs.md", "decision.md", "summary.md", "points.csv"):
        assert (out / name).stat().st_size > 0
    assert "| RLOO | 8 |" in (out / "costs.md").read_text()
    capsys.readouterr()
    assert main(args) == 0  # everything cached: no unit runs again
    assert "running" not in capsys.readouterr().out
    assert main([*args[:-1], "4,8,6"]) == 0  # a new budget: its units alone
    ran = [line.split()[1].rstrip(":") for line in capsys.readouterr().out.splitlines() if line.endswith(": running")]
    assert ran == ["reward-model-n6-s0", "dpo-beta0.1-n6-s0", "best-of-n-n6-s0", "rloo-n6-s0"]


def test_the_arithmetic_task_is_judged_by_the_checker_with_each_problems_answer(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """--task arithmetic: the checker's pairs are the labels, the held-out problems carry their answers to the
    ground truth (the checker's accuracy) in every unit's measurement, and GRPO-GT trains on the checker itself.
    The pairs are given here (a tiny random model answers nothing right); `preftune train --task arithmetic` builds
    them from the reference's own samples."""
    from preftune.tasks import arithmetic

    rows = arithmetic.make_rows(8, 0, held_out=False)
    pairs = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": str(columns["answer"])}],
              "rejected": [{"role": "assistant", "content": str(int(columns["answer"]) + 1)}]}
             for prompt, columns in rows]
    train = write_jsonl(tmp_path / "train.jsonl", pairs)
    monkeypatch.setattr(arithmetic, "pair_files", lambda config, source: (train, train, {}))
    out = tmp_path / "study"
    assert main(["study", "--task", "arithmetic", "--model", str(tiny_model_dir), "--quick", "--methods",
                 "dpo,grpo-gt", "--seeds", "0", "--label-budgets", "4", "--output-dir", str(out)]) == 0
    task = json.loads((out / "units" / "grpo-gt-s0.task.json").read_text())
    held_out = arithmetic.make_rows(4, Config().train.seed, held_out=True)  # the task's problems of --seed
    assert task["ground_truth"] == "accuracy" and task["eval_prompts"] == [p for p, _ in held_out]
    assert task["eval_columns"] == [c for _, c in held_out]
    labels = [json.loads(line) for line in (out / "labels" / "labels-n4-s0.jsonl").read_text().splitlines()]
    assert all(label in [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs] for label in labels)
    for unit in ("reference-s0", "dpo-beta0.1-n4-s0", "grpo-gt-s0"):
        points = json.loads((out / "units" / f"{unit}.json").read_text())["points"]
        assert points and all(set(p["prompt_rewards"]) <= {0.0, 1.0} for p in points), unit


def test_a_study_on_the_users_pairs_takes_no_task(capsys, pairs_file):
    assert main(["study", "--task", "arithmetic", "--data", str(pairs_file), "--eval-data", str(pairs_file),
                 "--ground-truth", "sentiment"]) == 2
    assert "leave --task out" in capsys.readouterr().err


def test_a_study_killed_with_sigkill_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, tiny_model_dir,
                                                                                    user_files):
    extra = ("--methods", "dpo,rloo", "--seeds", "0", "--label-budgets", "4,8")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(study_args(tiny_model_dir, user_files, whole, *extra)) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "preftune.cli", *study_args(tiny_model_dir, user_files, killed, *extra)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "units" / "dpo-beta0.1-n4-s0.json").is_file() and time.time() < deadline:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)  # in the middle: after some units, while another runs
    process.wait()
    done = sorted(p.stem for p in (killed / "units").glob("*-s0.json"))
    assert "dpo-beta0.1-n4-s0" in done and "rloo-n8-s0" not in done
    assert main(study_args(tiny_model_dir, user_files, killed, *extra)) == 0
    assert numbers(killed) == numbers(whole)
    assert any(kl > 0 for points in numbers(whole).values() for _, _, kl, _, _ in points)  # the policies moved
    for table in ("matched_kl.md", "differences.md"):  # (costs.md: times and memory differ)
        assert (killed / table).read_text() == (whole / table).read_text()
    assert untimed_points(killed) == untimed_points(whole)  # (a unit run again after the kill takes other seconds)


def untimed_points(folder):
    """points.csv's rows without their training seconds (wall time differs from run to run)."""
    with open(folder / "points.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all("seconds" in row for row in rows)
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def test_lora_reaches_every_method(tmp_path, tiny_model_dir, user_files):
    """--lora: DPO, PPO (its critic from the LoRA reward model) and online DPO train adapters, the reward model
    too (merged, its adapter kept beside it)."""
    out = tmp_path / "study"
    assert main(study_args(tiny_model_dir, user_files, out, "--methods", "dpo,ppo,online-dpo", "--seeds", "0",
                           "--label-budgets", "4", "--lora", "--lora-r", "4")) == 0
    full = sum(t.numel() for t in load_file(tiny_model_dir / "model.safetensors").values())
    for unit in ("dpo-beta0.1-n4-s0", "ppo-n4-s0", "online-dpo-n4-s0"):
        trained = json.loads((out / "units" / f"{unit}.json").read_text())["cost"]["extra"]["trainable_parameters"]
        assert 0 < trained < full / 10, unit
    assert (out / "runs" / "reward-model-n4-s0" / "adapter").is_dir()


def test_the_cache_key_holds_each_methods_code_version(tmp_path, monkeypatch):
    """A change to a method's code recomputes its units (and theirs that use them), not the others'."""
    from preftune.config import Config
    from preftune.study import runner

    versions = {"pairs": "a", "rloo": "a", "reward-model": "a", "reference": "a"}
    monkeypatch.setattr(runner, "code_version", lambda kind: versions[kind])
    inputs = runner.StudyInputs([{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(8)], ["q"],
                                "gold:length", None)
    monkeypatch.setattr(runner, "study_inputs", lambda config: inputs)
    monkeypatch.setattr("preftune.study.report.write_report", lambda *args: None)
    ran: list[str] = []

    def fake(task_path: Path) -> None:
        task = json.loads(task_path.read_text())
        ran.append(Path(task["record"]).stem)
        cost = Cost(task["label"], task["budget"], task["seed"], 1.0, 1.0, 1, 1, "", 0, 0, 0).__dict__
        Path(task["record"]).write_text(json.dumps({"key": task["key"], "points": [], "cost": cost}))
        if task["label"] == "reward model":
            Path(task["folder"]).mkdir(parents=True, exist_ok=True)
            (Path(task["folder"]) / "config.json").write_text("{}")

    config = Config()
    config.train.output_dir = str(tmp_path / "study")
    config.study.methods, config.study.seeds, config.study.label_budgets = "dpo,rloo", "0", "4"
    runner.run_study(config, runner=fake)
    assert ran == ["reference-s0", "reward-model-n4-s0", "dpo-beta0.1-n4-s0", "rloo-n4-s0"]
    ran.clear()
    versions["rloo"] = "b"
    runner.run_study(config, runner=fake)
    assert ran == ["rloo-n4-s0"]
    ran.clear()
    versions["reward-model"] = "b"  # a new reward model: the methods trained against it too
    runner.run_study(config, runner=fake)
    assert ran == ["reward-model-n4-s0", "rloo-n4-s0"]
    ran.clear()
    config.study.epochs = 3.0  # DPO's and the reward model's stopping rule; RLOO's through its reward model
    runner.run_study(config, runner=fake)
    assert ran == ["reward-model-n4-s0", "dpo-beta0.1-n4-s0", "rloo-n4-s0"]


def point(method: str, budget: int | None, seed: int, step: int, kl: float, prompt_rewards: list[float]) -> Point:
    reward = sum(prompt_rewards) / len(prompt_rewards)
    return Point(method, budget, seed, step, None, kl, 0.0, reward, 0.0, prompt_rewards=prompt_rewards)


def test_t_quantiles_match_the_tables():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=2e-3)
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-3)
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-3)


def test_the_seed_interval_by_hand():
    # values 1, 2, 3: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    interval = seed_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.n == 3
    assert interval.low == pytest.approx(2 - 2.4841, abs=1e-3) and interval.high == pytest.approx(2 + 2.4841, abs=1e-3)
    single = seed_interval([0.5])
    assert single.mean == 0.5 and math.isnan(single.low) and single.text() == "+0.500"
    assert seed_interval([]).text() == "n/a"


def test_matched_kl_picks_the_best_reward_within_each_budget():
    points = [point("A", 8, 0, 1, 0.3, [0.1]), point("A", 8, 0, 2, 0.9, [0.5]), point("A", 8, 0, 3, 2.5, [0.9])]
    assert best_within(0.5)(points).step == 1  # only the first is within 0.5 nats
    assert best_within(1.0)(points).step == 2  # 0.5 > 0.1
    assert best_within(3.0)(points).step == 3
    assert best_within(0.2)(points) is None
    assert last_point(points).step == 3
    # the best within is the highest reward, not the last step within
    falling = [point("A", 8, 0, 1, 0.3, [0.7]), point("A", 8, 0, 2, 0.9, [0.2])]
    assert best_within(1.0)(falling).step == 1


def test_the_paired_difference_by_hand():
    # seed 0: DPO - M per prompt = (0.2, 0.4): mean 0.3, se = sd(0.2, 0.4) / sqrt(2) = 0.1414 / 1.4142 = 0.1
    # seed 1: (0.0, 0.2): mean 0.1, se 0.1. Over seeds: mean 0.2, sd 0.1414, half-width 12.706 * 0.1414 / 1.414
    dpo = {0: point("D", 8, 0, 1, 1, [0.5, 0.6]), 1: point("D", 8, 1, 1, 1, [0.3, 0.4])}
    rl = {0: point("M", 8, 0, 1, 1, [0.3, 0.2]), 1: point("M", 8, 1, 1, 1, [0.3, 0.2])}
    difference = paired_difference(dpo, rl)
    assert difference.interval.mean == pytest.approx(0.2)
    assert difference.interval.high - 0.2 == pytest.approx(12.7062 * 0.1, abs=1e-3)
    assert difference.prompt_stderr == pytest.approx(math.sqrt(0.1**2 + 0.1**2) / 2)
    one = paired_difference({0: dpo[0]}, {0: rl[0]})  # one seed: +- 1.96 of the prompts' paired se
    assert one.interval.low == pytest.approx(0.3 - 1.96 * 0.1, abs=1e-3)


def test_overtaking_needs_the_interval_below_zero():
    def difference(mean: float, high: float):
        return type("D", (), {"interval": Interval(mean, mean - 1, high, 3)})()

    assert overtakes({8: difference(0.2, 0.4), 16: difference(-0.1, 0.05), 32: difference(-0.3, -0.1)}) == (32, 16)
    assert overtakes({8: difference(0.2, 0.4), 16: difference(0.1, 0.2)}) == (None, None)


def test_the_decision_is_the_best_reward_within_the_constraints():
    def option(method, budget, reward, gb, minutes, samples=False, truth=False):
        return Option(method, budget, Interval(reward, reward - 0.1, reward + 0.1, 3), gb, minutes, samples, truth)

    options = [option("reference", 0, 0.1, 1, 1), option("DPO", 8, 0.3, 4, 5), option("DPO", 16, 0.4, 4, 8),
               option("RLOO", 16, 0.5, 6, 20, samples=True), option("PPO-GT", 0, 0.9, 9, 30, True, True)]
    assert decide(options, Constraints(16, None, None, False, False)).reward.mean == 0.4  # offline: DPO at 16
    assert decide(options, Constraints(8, None, None, False, False)).budget == 8  # 16 labels not available
    assert decide(options, Constraints(16, None, None, False, True)).method == "RLOO"
    assert decide(options, Constraints(16, 5, None, False, True)).method == "DPO"  # RLOO's 6 GB over the limit
    assert decide(options, Constraints(16, None, 10, False, True)).method == "DPO"  # RLOO's 20 minutes over
    assert decide(options, Constraints(0, None, None, True, True)).method == "PPO-GT"
    assert decide(options, Constraints(0, None, None, False, True)).method == "reference"


def hand_study() -> Study:
    """Two seeds, budgets 8 and 16: DPO ahead at 8, RLOO ahead at 16 in both seeds."""
    points = [point("reference", None, s, 0, 0.0, [0.0, 0.0]) for s in (0, 1)]
    points += [point("DPO beta=0.1", 8, 0, 2, 1.0, [0.4, 0.4]), point("DPO beta=0.1", 8, 1, 2, 1.0, [0.6, 0.6]),
               point("DPO beta=0.1", 16, 0, 4, 1.5, [0.5, 0.5]), point("DPO beta=0.1", 16, 1, 4, 1.5, [0.7, 0.7]),
               point("RLOO", 8, 0, 2, 0.4, [0.1, 0.1]), point("RLOO", 8, 1, 2, 0.4, [0.3, 0.3]),
               point("RLOO", 16, 0, 2, 0.8, [0.9, 0.9]), point("RLOO", 16, 1, 2, 0.8, [1.1, 1.1])]
    costs = [Cost("reference", None, s, 10, 0, 10**9, 1, "reference", 0, 0, 0) for s in (0, 1)]
    for budget in (8, 16):
        for s in (0, 1):
            costs += [Cost("DPO beta=0.1", budget, s, 60, 50, 4 * 10**9, 2, "policy, reference", 0, 0, budget),
                      Cost("reward model", budget, s, 30, 25, 3 * 10**9, 1, "reward model", 0, 0, budget),
                      Cost("RLOO", budget, s, 90, 80, 5 * 10**9, 3, "policy, reference, reward model", 32, 32, budget,
                           True)]
    return Study(points, costs, [8, 16], [1.0], "DPO beta=0.1")


def test_the_gains_over_the_reference_say_which_methods_learned():
    """Each seed's gain is paired by prompt with that seed's reference; a (method, budget) is named when the
    interval of its seeds' gains lies above 0, and when none does the sentence says so."""
    from preftune.study.report import gains_sentence, gains_table, with_gains

    references = [point("reference", None, s, 0, 0.0, [0.0, 0.2]) for s in (0, 1, 2)]
    learned = [point("DPO beta=0.1", 8, s, 2, 1.0, [0.5 + 0.01 * s, 0.7]) for s in (0, 1, 2)]  # gains 0.5 + 0.005 s
    noisy = [point("RLOO", 8, s, 2, 0.4, [g, 0.2 + g]) for s, g in zip((0, 1, 2), (0.3, -0.3, 0.0))]  # gains g
    study = Study(with_gains(references + learned + noisy), [], [8], [1.0], "DPO beta=0.1")
    half = t_quantile(0.975, 2) * 0.005 / math.sqrt(3)  # sd of 0.500, 0.505, 0.510 is 0.005
    assert gains_sentence(study) == (f"Gains over the reference above 0 with 95% confidence over seeds: DPO beta=0.1 "
                                     f"at 8 labels (+0.505 [{0.505 - half:+.3f}, {0.505 + half:+.3f}]).")
    assert f"| RLOO | 8 | +0.000 [{-t_quantile(0.975, 2) * 0.3 / math.sqrt(3):+.3f}, " in "\n".join(gains_table(study))
    only_noise = Study(with_gains(references + noisy), [], [8], [1.0], "DPO beta=0.1")
    assert gains_sentence(only_noise).startswith("No method's gain over the reference")


def test_the_summary_sentences_come_from_the_numbers():
    lines = summary_lines(hand_study(), 2)
    text = "\n".join(lines)
    # DPO at 16: seeds 0.5, 0.7: mean 0.6, half-width 12.706 * 0.1414 / 1.414 = 1.2706
    assert "With 16 labels, DPO beta=0.1 reached +0.600 [-0.671, +1.871] at its last point." in text
    # DPO - RLOO at 16: -0.4 in both seeds: sd 0, so the interval is the point -0.4, below 0
    assert "- RLOO: +1.000 [-0.271, +2.271]; DPO minus RLOO: -0.400 [-0.400, -0.400]." in text
    assert "RLOO overtakes DPO at 16 labels: DPO minus RLOO is -0.400 [-0.400, -0.400], its interval below 0." in text
    # within KL <= 1: DPO at 16 (KL 1.5) has no point; RLOO at 16 (KL 0.8) does
    assert "Within KL <= 1 nats at 16 labels, the highest held-out reward is RLOO's +1.000" in text
    # wall: RLOO 90 s + its reward model's 30 s = 2 min 0 s, 2.0x DPO's 60 s
    assert "At 16 labels RLOO took 2 min 0 s of wall time with its reward model (2.0x DPO's 1 min 0 s)" in text
    assert "- With 16 labels, offline: no sampling: DPO beta=0.1 (+0.600 [-0.671, +1.871])." in text
    assert "- With 16 labels, sampling, reward model only: RLOO" in text


def test_the_decision_table_rows_by_hand():
    rows = decision_table(hand_study())
    # 8 labels, sampling, any resources: DPO 0.5 beats RLOO 0.2
    assert "| 8 | any | any | yes | no | DPO beta=0.1 | +0.500 [-0.771, +1.771] | 8 |" in rows
    # 16 labels, sampling, any: RLOO 1.0; within DPO's 4 GB and 1 minute: DPO
    assert "| 16 | any | any | yes | no | RLOO | +1.000 [-0.271, +2.271] | 16 |" in rows
    assert "| 16 | <= 4.00 GB | <= 1 min 0 s | yes | no | DPO beta=0.1 | +0.600 [-0.671, +1.871] | 16 |" in rows


def test_an_unknown_method_is_a_user_error_under_either_name(capsys):
    for name in ("study", "frontier"):
        assert main([name, "--methods", "dpo,ppo-magic"]) == 2
        assert "--methods: 'ppo-magic' is not a method" in capsys.readouterr().err


def test_user_data_needs_its_ground_truth_and_held_out_prompts(capsys, pairs_file):
    assert main(["study", "--data", str(pairs_file), "--eval-data", str(pairs_file)]) == 2
    assert "preftune study --data needs --ground-truth" in capsys.readouterr().err
    assert main(["study", "--data", str(pairs_file), "--ground-truth", "sentiment"]) == 2
    assert "takes --data and --eval-data together" in capsys.readouterr().err


def length_reward(prompts, completions):  # varies on a random model's text (VADER scores it 0 almost always)
    return [len(c) + 1e-3 * sum(map(ord, c)) for c in completions]


def answer_reward(prompts, completions, answer, **columns):  # TRL's form: each completion's prompt's column
    return [float(a) for a in answer]


def test_a_points_rewards_get_each_prompts_columns(tiny_model_dir, tiny_ref_dir, tokenizer):
    """The ground truth is given each held-out prompt's columns (the arithmetic task's answers), sample by sample,
    in the reference's point and a policy's."""
    from transformers import AutoModelForCausalLM

    from preftune.forward.rewards import user_function
    from preftune.models.load import frozen
    from preftune.study.measure import Measure

    policy = frozen(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    reference = frozen(AutoModelForCausalLM.from_pretrained(tiny_ref_dir))
    columns = [{"answer": 3}, {"answer": 0}, {"answer": 7}]
    measuring = Measure(tokenizer, reference, user_function(answer_reward, "answers"), ["a", "b", "c"], 2, 4,
                        seed=1, columns=columns)
    assert measuring.reference_point().prompt_rewards == [3.0, 0.0, 7.0]
    assert measuring.policy_point(policy, "X", 4, 1).prompt_rewards == [3.0, 0.0, 7.0]


def test_a_points_rewards_are_clustered_by_prompt_and_its_kl_is_measures(tiny_model_dir, tiny_ref_dir, tokenizer):
    """A point: its reward's stderr clustered by prompt (sd of the per-prompt means / sqrt(n)), the per-prompt
    means kept for pairing, its KL the measurement's; best-of-N's choice by the reward model's scores."""
    import torch
    from transformers import AutoModelForCausalLM

    from preftune.data.tokenize import prompt_ids
    from preftune.evaluation.measure import ModelPair, measure
    from preftune.models.load import frozen
    from preftune.study.measure import Measure, best_of_n_choice

    policy = frozen(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    reference = frozen(AutoModelForCausalLM.from_pretrained(tiny_ref_dir))
    prompts = ["The movie", "A film", "Review:", "Overall"]
    measuring = Measure(tokenizer, reference, length_reward, prompts, 3, 6, seed=5)
    got = measuring.policy_point(policy, "X", 8, 1)
    both = measure(ModelPair(policy, reference), tokenizer, [prompt_ids(p, tokenizer) for p in prompts],
                   num_samples=3, max_new_tokens=6, seed=16, reward=length_reward, sample_reference=False)
    ours = torch.tensor(both.policy_rewards, dtype=torch.float64).view(4, 3)
    assert got.reward == pytest.approx(ours.mean().item())
    assert got.prompt_rewards == pytest.approx(ours.mean(dim=1).tolist())
    assert got.reward_stderr == pytest.approx((ours.mean(dim=1).std() / 2).item())
    assert got.kl == pytest.approx(both.kl.mean) and got.kl_stderr == pytest.approx(both.kl.stderr)
    # two prompts of 3 samples: the reward model prefers samples 1 and 5 among the first 2 of each, 2 and 5 of all
    scores, truths = [0.1, 0.9, 2.0, 0.5, 0.7, 3.0], [10, 11, 12, 13, 14, 15]
    assert best_of_n_choice(scores, truths, 3, 1) == [10, 13]
    assert best_of_n_choice(scores, truths, 3, 2) == [11, 14]
    assert best_of_n_choice(scores, truths, 3, 3) == [12, 15]


def test_the_gold_split_is_disjoint_and_seeded():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from hh_gold_split import split
    finally:
        sys.path.pop(0)
    pairs = list(range(100))
    gold, study, held_out = split(pairs, 0.6, 10)
    assert (len(gold), len(study), len(held_out)) == (60, 30, 10)
    assert sorted(gold + study + held_out) == pairs
    assert split(pairs, 0.6, 10) == (gold, study, held_out)


def test_the_gold_split_of_the_hh_pairs(tmp_path):
    from tests.conftest import HH_RLHF

    if not HH_RLHF.is_file():
        pytest.skip(f"{HH_RLHF} not present (it lives in ../shared beside the checkout)")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hh_gold_split.py"), str(HH_RLHF),
                             str(tmp_path)], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, check=True)
    assert json.loads(result.stdout) == {"pairs": 2312, "gold": 1387, "study": 797, "held_out": 128}
    prompts = {json.loads(line)["prompt"] for line in (tmp_path / "held_out.jsonl").read_text().splitlines()}
    assert len(prompts) > 100 and all(p.startswith("\n\nHuman:") for p in prompts)
