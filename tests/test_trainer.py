"""The training loop on tiny random models: accumulation, schedule, evaluation cadence, bf16."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.recipes.pairs import count_steps
from tests.conftest import PAIRS, write_jsonl


def train(tmp_path, name, model_dir, data, *extra: str):
    out = tmp_path / name
    args = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--no-shuffle",
            "--learning-rate", "1e-3", "--warmup-ratio", "0", "--lr-scheduler-type", "constant", *extra]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows


def test_count_steps():
    assert count_steps(3, 1, 1.0, -1) == 3  # 3 micro-batches per epoch
    assert count_steps(3, 2, 1.0, -1) == 2
    assert count_steps(3, 1, 2.5, -1) == 8
    assert count_steps(3, 1, 1.0, 5) == 5


def test_gradient_accumulation_equals_the_big_batch(tmp_path, tiny_model_dir):
    """4 pairs x 1 micro-batch and 2 pairs x 2 micro-batches give the same steps: the loss of a step is the
    mean over its pairs either way, so losses and final weights agree to float32 reassociation."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 2)
    big, big_rows = train(tmp_path, "big", tiny_model_dir, data, "--batch-size", "4", "--max-steps", "2")
    small, small_rows = train(tmp_path, "small", tiny_model_dir, data, "--batch-size", "2", "--grad-accum", "2",
                              "--max-steps", "2")
    for a, b in zip(big_rows, small_rows, strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["rewards/accuracies"] == b["rewards/accuracies"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    big_weights, small_weights = load_file(big / "model.safetensors"), load_file(small / "model.safetensors")
    worst = max((big_weights[k] - small_weights[k]).abs().max().item() for k in big_weights)
    assert worst < 1e-5


def test_warmup_then_linear_decay_and_eval_cadence(tmp_path, tiny_model_dir, pairs_file):
    _, rows = train(tmp_path, "sched", tiny_model_dir, pairs_file, "--batch-size", "2", "--max-steps", "4",
                    "--lr-scheduler-type", "linear", "--warmup-ratio", "0.5", "--eval-data", str(pairs_file),
                    "--eval-steps", "2")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    # 2 warmup steps from 0, then linear decay to 0 over the remaining 2
    assert [r["learning_rate"] for r in train_rows] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
    assert [r["step"] for r in eval_rows] == [2, 4]  # the final evaluation is not logged twice
    assert all(r["epoch"] > 0 for r in rows)


def test_bf16_autocast_trains(tmp_path, tiny_model_dir, pairs_file):
    out, rows = train(tmp_path, "bf16", tiny_model_dir, pairs_file, "--batch-size", "4", "--max-steps", "2",
                      "--bf16")
    assert all(math.isfinite(r["loss"]) for r in rows)
    # weights and optimizer state stay fp32; autocast only changes the matmuls
    assert all(t.dtype == torch.float32 for t in load_file(out / "model.safetensors").values())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_steps(tmp_path, tiny_model_dir, pairs_file, lora):
    extra = ["--lora", "--learning-rate", "1e-3"] if lora else []
    plain, plain_rows = train(tmp_path, "plain", tiny_model_dir, pairs_file, "--batch-size", "2", "--max-steps", "3",
                              *extra)
    checkpointed, checkpointed_rows = train(tmp_path, "gc", tiny_model_dir, pairs_file, "--batch-size", "2",
                                            "--max-steps", "3", "--gradient-checkpointing", *extra)
    for a, b in zip(plain_rows, checkpointed_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(plain / weights), load_file(checkpointed / weights)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_qlora_on_cpu_is_a_clear_error(tmp_path, tiny_model_dir, pairs_file, capsys):
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir",
                 str(tmp_path / "q"), "--lora", "--load-in-4bit"])
    assert code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_attention_implementations_agree(tmp_path, tiny_model_dir, pairs_file, capsys):
    results = {}
    for kernel in ("eager", "sdpa"):
        assert main(["eval", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--ref-model",
                     str(tiny_model_dir), "--attn-implementation", kernel]) == 0
        results[kernel] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["eager"]["logps/chosen"] == pytest.approx(results["sdpa"]["logps/chosen"], rel=1e-5)


def test_training_steps_equal_trls(tmp_path, tiny_model_dir):
    """The same pairs in the same batches (file order), seed, schedule and optimizer settings: preftune's per-step
    training losses equal TRL 1.16 DPOTrainer's (benchmarks/bench_vs_trl.py checks the same on the real model)."""
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    records = PAIRS * 2
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    settings = {"learning_rate": 1e-2, "max_grad_norm": 1.0, "beta": 0.1}
    _, rows = train(tmp_path, "ours", tiny_model_dir, data, "--batch-size", "2", "--max-steps", "4",
                    "--learning-rate", str(settings["learning_rate"]), "--lr-scheduler-type", "linear")
    ours = [r["loss"] for r in rows if "loss" in r]

    class Losses(TrainerCallback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.values.append(logs["loss"])

    losses = Losses()
    config = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=4,
                       lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="no",
                       report_to="none", use_cpu=True, bf16=False, train_sampling_strategy="sequential", **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=config,
                             train_dataset=Dataset.from_list(records),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), callbacks=[losses])
        trainer.train()
    assert len(losses.values) == len(ours) == 4
    assert ours[-1] < ours[0] - 1e-3  # the steps move the policy: the comparison is not of four constants
    for step, (a, b) in enumerate(zip(ours, losses.values), start=1):
        assert a == pytest.approx(b, abs=1e-5), f"step {step}"


@pytest.mark.parametrize("layout", ["shared_prefix", "packed"])
def test_prefix_sharing_layouts_train_as_the_padded_one(tmp_path, tiny_model_dir, pairs_file, layout):
    """The prompt computed once per pair (packed: pairs side by side in a row): per-step losses, rewards and eval
    metrics equal the padded layout's to float32 reassociation, and the weights after the steps too."""
    runs = {}
    for name in ("padded", layout):
        runs[name] = train(tmp_path, name, tiny_model_dir, pairs_file, "--batch-size", "2", "--max-steps", "3",
                             "--eval-data", str(pairs_file), "--batch-layout", name)
    (padded, padded_rows), (shared, shared_rows) = runs["padded"], runs[layout]
    assert len(padded_rows) == len(shared_rows) == 4
    for a, b in zip(padded_rows, shared_rows, strict=True):
        for name in ("loss", "rewards/chosen", "rewards/margins", "eval_loss", "eval_logps/rejected"):
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-5), name
    a, b = load_file(padded / "model.safetensors"), load_file(shared / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
