"""The benchmark scripts run end to end on a tiny model (their numbers are not checked here: speed and memory
targets live in the benchmarks' own output, never in timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PAIRS, write_jsonl

pytestmark = pytest.mark.slow  # whole benchmark runs (one launches several processes): the full suite runs them

ROOT = Path(__file__).resolve().parent.parent


def test_bench_vs_trl_runs_both_sides_on_the_same_batches(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_vs_trl.py"), "--modes", "live,precomputed", "--steps", "3",
         "--warmup", "1", "--batch-size", "2", "--max-length", "64", "--data", str(data), "--model",
         str(tiny_model_dir)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["matmul_fp32_gflops"] > 0
    for mode in ("live", "precomputed"):
        sides = report["modes"][mode]
        for side in ("trl", "preftune"):
            assert len(sides[side]["losses"]) == 3
            assert sides[side]["pairs_per_second"] > 0 and sides[side]["peak_rss_gb"] > 0
        # the same pairs in the same batches from the same weights: the same losses, step by step
        assert sides["max_abs_loss_difference"] < 1e-4
        assert sides["ratios"]["pairs_per_second"] > 0


@pytest.mark.parametrize("recipe", ["train", "rloo"])
def test_bench_sharding_trains_the_same_steps_under_ddp_and_fsdp(tmp_path, tiny_model_dir, recipe):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_sharding.py"), "--recipe", recipe, "--engines", "ddp",
         "fsdp", "--steps", "3", "--max-length", "64", "--max-new-tokens", "6", "--data", str(data), "--model",
         str(tiny_model_dir)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    for engine in ("ddp", "fsdp"):
        measured = report["engines"][engine]
        assert len(measured["per_step"]) == 3
        assert measured["seconds_per_step"] > 0 and measured["peak_rss_gb_largest_process"] > 0
    assert report["compared"] == ("loss" if recipe == "train" else "objective/kl")
    assert report["max_difference_between_engines"] < 1e-4


def test_bench_rloo_vs_trl_smoke_times_both_sides_on_the_same_prompts(tmp_path):
    output = tmp_path / "rloo-vs-trl.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_rloo_vs_trl.py"), "--smoke", "--output", str(output)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert json.loads(output.read_text()) == report
    assert report["settings"]["steps"] == 2 and report["settings"]["max_new_tokens"] == 4
    for side in ("trl", "preftune"):
        measured = report[side]
        assert len(measured["step_seconds"]) == len(measured["losses"]) == len(measured["scores"]) == 2
        assert measured["completions"] == 2 * report["settings"]["completions_per_step"]
        assert 0 < measured["completion_tokens"] <= measured["completions"] * 4
        assert measured["median_step_seconds"] > 0 and measured["completion_tokens_per_second"] > 0
        assert measured["peak_rss_gb"] > 0
        assert abs(measured["mean_loss"]) < 1e-4  # one update per rollout: -mean(leave-one-out advantage) = 0
    assert report["same_prompts_each_step"]
    assert report["ratios"]["steps_per_second"] > 0 and report["ratios"]["completion_tokens_per_second"] > 0


def test_bench_grpo_smoke_times_both_sides_on_the_same_prompts(tmp_path):
    output = tmp_path / "grpo-vs-trl.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_grpo.py"), "--smoke", "--output", str(output)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert json.loads(output.read_text()) == report
    assert report["settings"]["steps"] == 2 and report["settings"]["loss_type"] == "dapo"
    for side in ("trl", "preftune"):
        measured = report[side]
        assert len(measured["step_seconds"]) == len(measured["losses"]) == len(measured["scores"]) == 2
        assert measured["completions"] == 2 * report["settings"]["completions_per_step"]
        assert 0 < measured["completion_tokens"] <= measured["completions"] * 4
        assert measured["median_step_seconds"] > 0 and measured["completion_tokens_per_second"] > 0
    assert report["same_prompts_each_step"]
    assert report["ratios"]["steps_per_second"] > 0


def test_bench_rollout_memory_smoke_measures_one_step_per_rollout_size(tmp_path):
    output = tmp_path / "rollout-memory.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_rollout_memory.py"), "--smoke", "--output", str(output)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert json.loads(output.read_text()) == report
    assert report["settings"]["local_rollout_forward_batch_size"] == 2 and report["machine"]["matmul_fp32_gflops"] > 0
    assert list(report["rollouts"]) == ["4", "8"]
    for samples, measured in report["rollouts"].items():
        assert measured["completions"] == int(samples)
        assert 0 < measured["completion_tokens"] <= int(samples) * 4
        assert measured["step_peak_rss_gb"] >= measured["setup_peak_rss_gb"] > 0 and measured["step_seconds"] > 0
    assert report["step_peak_spread"] >= 0


def test_bench_rollout_memory_ppo_smoke_measures_full_and_lora_ppo(tmp_path):
    output = tmp_path / "ppo-memory.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_rollout_memory.py"), "--ppo", "--smoke", "--output",
         str(output)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert json.loads(output.read_text()) == report
    assert report["settings"]["recipe"] == "ppo" and report["machine"]["matmul_fp32_gflops"] > 0
    for side in ("full", "lora"):
        measured = report["ppo"][side]
        assert measured["rollouts"] == 2 and len(measured["seconds_per_rollout"]) == 1
        assert measured["peak_rss_gb"] > 0 and measured["seconds_per_rollout"][0] > 0
    assert report["lora_over_full_peak_rss"] > 0
