"""Checkpoints resume exactly, survive kill -9 and SIGTERM, are never taken whole when damaged, and a run
never overwrites what a user made."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import preftune.recipes.dpo
import preftune.runtime.checkpoint
from preftune.cli import main
from preftune.objectives.losses import LossOutput
from tests.conftest import PAIRS, make_tiny_llama, write_jsonl

STEPS = 30
SAVE_EVERY = 5
# Seeds the step at which a run is killed, so that a failure can be reproduced: PREFTUNE_KILL_SEED=N pytest ...
KILL_SEED = int(os.environ.get("PREFTUNE_KILL_SEED", "20261202"))


def run_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--max-steps", str(STEPS), "--save-steps", str(SAVE_EVERY), "--learning-rate", "1e-3",
            "--warmup-ratio", "0.2", "--seed", "7", *extra]


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", PAIRS * 3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, data) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(run_args(tiny_model_dir, data, out)) == 0
    return out


def start_and_stop(args: list[str], out: Path, stop_signal: int) -> subprocess.CompletedProcess:
    """Start a training process, wait until it has logged a seeded random step between checkpoints, send a
    signal."""
    target = random.Random(f"{KILL_SEED}-{int(stop_signal)}").randint(SAVE_EVERY + 1, STEPS - SAVE_EVERY - 1)
    print(f"stopping with signal {int(stop_signal)} after logged step {target} (PREFTUNE_KILL_SEED={KILL_SEED})")
    process = subprocess.Popen([sys.executable, "-m", "preftune.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= target:
            process.send_signal(stop_signal)
            break
        time.sleep(0.002)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_resume_after_kill_9_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, data, uninterrupted):
    out = tmp_path / "killed"
    args = run_args(tiny_model_dir, data, out)
    killed = start_and_stop(args, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    logged = len(train_rows(out))
    assert logged < STEPS
    assert main([*args, "--resume"]) == 0
    assert max_weight_difference(out, uninterrupted) == 0.0
    rows, expected = train_rows(out), train_rows(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once, none missing
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_resumes_exactly(tmp_path, tiny_model_dir, data, uninterrupted, stop_signal):
    out = tmp_path / "terminated"
    args = run_args(tiny_model_dir, data, out)
    stopped = start_and_stop(args, out, stop_signal)
    assert stopped.returncode == 128 + stop_signal, stopped.stderr[-2000:]
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    step = len(train_rows(out))
    assert (out / f"checkpoint-{step}").is_dir()  # written at the step it stopped on
    assert main([*args, "--resume"]) == 0
    assert max_weight_difference(out, uninterrupted) == 0.0
    assert [r["step"] for r in train_rows(out)] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_model_dir, data, uninterrupted):
    out = tmp_path / "damaged"
    args = run_args(tiny_model_dir, data, out)
    assert main(args) == 0
    newest = out / f"checkpoint-{STEPS}"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*checkpoint-{STEPS}"):
        assert main([*args, "--resume"]) == 0
    assert max_weight_difference(out, uninterrupted) == 0.0
    assert [r["step"] for r in train_rows(out)] == list(range(1, STEPS + 1))


def test_resume_refuses_settings_that_change_the_math(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "run"
    assert main([*run_args(tiny_model_dir, data, out), "--max-steps", "5"]) == 0
    code = main([*run_args(tiny_model_dir, data, out), "--max-steps", "5", "--beta", "0.2", "--resume"])
    assert code == 2
    err = capsys.readouterr().err
    assert "loss.beta: 0.1 in the checkpoint, 0.2 now" in err
    # options that do not change the math may differ
    assert main([*run_args(tiny_model_dir, data, out), "--max-steps", "5", "--logging-steps", "2", "--resume"]) == 0


def test_save_total_limit_keeps_the_newest(tmp_path, tiny_model_dir, data):
    out = tmp_path / "limited"
    assert main([*run_args(tiny_model_dir, data, out), "--max-steps", "8", "--save-steps", "2",
                 "--save-total-limit", "2"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert not list(out.glob(".checkpoint-*"))  # no staging folder left behind


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, data, monkeypatch, capsys):
    real_save = preftune.runtime.checkpoint.save_file
    calls = []

    def save_until_the_disk_fills(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(preftune.runtime.checkpoint, "save_file", save_until_the_disk_fills)
    out = tmp_path / "full"
    assert main([*run_args(tiny_model_dir, data, out), "--max-steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "checkpoint-5" in err and "intact" in err
    assert preftune.runtime.checkpoint.checkpoint_problem(out / "checkpoint-5") is None
    assert not (out / "checkpoint-10").exists() and not list(out.glob(".checkpoint-*"))


def test_non_finite_loss_skips_the_step_then_stops(tmp_path, tiny_model_dir, data, monkeypatch, capsys):
    real_loss = preftune.recipes.dpo.compute_loss
    calls = {"n": 0}

    def loss_that_breaks_after_step_2(*args, **kwargs) -> LossOutput:
        output = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 2:
            output.losses = output.losses * torch.tensor(float("nan"))
        return output

    monkeypatch.setattr(preftune.recipes.dpo, "compute_loss", loss_that_breaks_after_step_2)
    out = tmp_path / "nan"
    with pytest.warns(RuntimeWarning, match=r"step 3: non-finite loss; step skipped \(pairs: .*pairs.jsonl line \d+"):
        code = main([*run_args(tiny_model_dir, data, out), "--max-bad-steps", "2", "--save-steps", "2"])
    assert code == 2
    assert "2 steps in a row had a non-finite loss" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "skipped" in r] == [3, 4]
    assert all(r["pair_indices"] for r in rows if "skipped" in r)
    # the skipped steps 3 and 4 left the weights alone; the stop wrote a checkpoint
    assert max_weight_difference(out / "checkpoint-2", out / "checkpoint-4") == 0.0


def test_non_empty_output_dir_needs_resume_or_overwrite(tmp_path, tiny_model_dir, data, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(run_args(tiny_model_dir, data, out)) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*run_args(tiny_model_dir, data, out), "--max-steps", "2", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces run files, never deletes others


def test_lora_checkpoint_resumes_the_adapter_exactly(tmp_path, tiny_model_dir, data):
    out = tmp_path / "lora"
    args = [*run_args(tiny_model_dir, data, out), "--lora", "--lora-r", "4", "--max-steps", "6", "--save-steps", "3"]
    assert main(args) == 0
    finished = load_file(out / "adapter_model.safetensors")
    saved = load_file(out / "checkpoint-3" / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # only the trainable adapter is checkpointed
    shutil.rmtree(out / "checkpoint-6")
    assert main([*args, "--resume"]) == 0  # continues from step 3
    resumed = load_file(out / "adapter_model.safetensors")
    assert max((finished[k] - resumed[k]).abs().max().item() for k in finished) == 0.0


# Checkpoints written before the package was cut into layers (commit 0e72190, the flat modules): a LoRA DPO run and
# a LoRA RLOO run on the conftest's tiny model (seed 0), 4 steps with --save-steps 2, kept as a kill after step 2
# leaves them (checkpoint-2, the run's config and metrics). Written from a folder holding `tiny/`, `pairs.jsonl`,
# `prompts.jsonl` and `text_reward.py`, with the relative paths below, so that they resume from any folder laid out
# the same way. Checkpoints hold tensors (safetensors, torch.load(weights_only=True)) and JSON, no pickled classes,
# so a module's new place cannot break them; this test keeps it so.
BEFORE_LAYERS = Path(__file__).parent / "fixtures" / "checkpoints-before-layers"
BEFORE_LAYERS_RUNS = {
    "dpo": ["train", "--data", "pairs.jsonl", "--batch-size", "2"],
    "rloo": ["rloo", "--prompts", "prompts.jsonl", "--rollout-batch-size", "2", "--max-new-tokens", "6", "--reward",
             "text_reward:length"],
}


@pytest.mark.parametrize("run", sorted(BEFORE_LAYERS_RUNS))
def test_a_checkpoint_written_before_the_layers_resumes(tmp_path, tokenizer_dir, monkeypatch, run):


    make_tiny_llama(tmp_path / "tiny", tokenizer_dir, seed=0)
    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    (tmp_path / "text_reward.py").write_text("def length(prompt, completion):\n"
                                             "    return len(completion) + 1e-3 * sum(map(ord, completion))\n")
    shutil.copytree(BEFORE_LAYERS / run, tmp_path / run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = load_file(tmp_path / run / "checkpoint-2" / "model.safetensors")
    args = [*BEFORE_LAYERS_RUNS[run], "--model", "tiny", "--output-dir", run, "--max-steps", "4", "--save-steps", "2",
            "--learning-rate", "1e-3", "--report-to", "none", "--lora", "--lora-r", "4", "--resume"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r or "objective/kl" in r] == [1, 2, 3, 4]  # 1-2 before, 3-4 after
    resumed = load_file(tmp_path / run / "checkpoint-4" / "model.safetensors")
    assert resumed.keys() == saved.keys() and any(not torch.equal(saved[k], resumed[k]) for k in saved)
    assert (tmp_path / run / "adapter_model.safetensors").is_file()
