"""The Bradley-Terry reward model: the loss by hand, per-step losses equal TRL 1.16 RewardTrainer's, exact resume,
and the saved folder read back by `judge --reward`."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from preftune.cli import main
from preftune.recipes.reward_model import bradley_terry_losses
from tests.conftest import PAIRS, write_jsonl

RECORDS = [
    *PAIRS,
    {"prompt": "My verdict:", "chosen": " see it twice, it rewards attention.", "rejected": " skip"},
    {"prompt": "The cast", "chosen": " shines.", "rejected": " seemed lost in a script that never decides"},
]


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + e^-d): d = 2, 0, -2
    expected = torch.tensor([math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.exp(2))])
    assert torch.allclose(bradley_terry_losses(chosen, rejected), expected)
    # centering adds c (r_w + r_l)^2: 4, 0, 0 times 0.01
    centred = bradley_terry_losses(chosen, rejected, 0.01)
    assert torch.allclose(centred, expected + torch.tensor([0.04, 0.0, 0.0]))
    # a margin m asks for r_w - r_l > m: the loss is -log sigmoid(d - m); d - m = 1, -1, -2.5
    with_margins = bradley_terry_losses(chosen, rejected, margins=torch.tensor([1.0, 1.0, 0.5]))
    assert torch.allclose(with_margins, torch.log1p(torch.exp(-torch.tensor([1.0, -1.0, -2.5]))))
    # the loss falls as the margin grows, and is symmetric: swapping the pair gives loss(-d)
    assert torch.allclose(bradley_terry_losses(rejected, chosen), torch.log1p(torch.exp(torch.tensor([2.0, 0, -2]))))


@pytest.fixture(scope="module")
def reward_base(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama with a seeded one-output score head, saved, so both trainers start from the same head."""
    folder = tmp_path_factory.mktemp("reward-base")
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)  # rewards that differ from the start: the steps are not of constants
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def reward_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["reward-model", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--learning-rate", "1e-2", "--warmup-ratio", "0", "--no-shuffle", *extra]


def step_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.mark.parametrize(("centering", "margins"), [(None, False), (0.01, False), (None, True), (0.01, True)],
                         ids=["plain", "centred", "margins", "centred-margins"])
def test_training_steps_equal_trls_reward_trainer(tmp_path, reward_base, centering, margins):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    records = [{**r, "margin": 0.25 * i} for i, r in enumerate(RECORDS)] if margins else RECORDS
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    extra = ["--center-rewards-coefficient", str(centering)] if centering is not None else []
    assert main(reward_args(reward_base, data, tmp_path / "ours", "--max-steps", "3", *extra)) == 0
    ours = step_losses(tmp_path / "ours")

    class Losses(TrainerCallback):
        values: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.values.append(logs["loss"])

    losses = Losses()
    config = RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=3,
                          learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1,
                          save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                          train_sampling_strategy="sequential", center_rewards_coefficient=centering)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(reward_base, num_labels=1),
                                args=config, train_dataset=Dataset.from_list(records),
                                processing_class=AutoTokenizer.from_pretrained(reward_base), callbacks=[losses])
        trainer.train()
    assert len(ours) == len(losses.values) == 3
    assert abs(ours[-1] - ours[0]) > 1e-3  # the steps move the model: the comparison is not of constants
    for step, (a, b) in enumerate(zip(ours, losses.values), start=1):
        assert a == pytest.approx(b, abs=1e-5), f"step {step}"


def test_resume_continues_exactly_and_judge_reads_the_folder(tmp_path, reward_base, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", PAIRS)
    out = tmp_path / "run"
    args = reward_args(reward_base, data, out, "--max-steps", "4", "--save-steps", "2", "--eval-data",
                       str(held_out))
    assert main(args) == 0
    first_losses, first_weights = step_losses(out), load_file(out / "model.safetensors")
    assert "held-out preference accuracy" in capsys.readouterr().out
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_pairs"] == len(PAIRS) and 0 <= results["accuracy"] <= 1 and results["accuracy_stderr"] >= 0
    # continue from step 2 in the same folder: steps 3 and 4 again, to the same weights
    assert main([*args, "--resume", str(out / "checkpoint-2")]) == 0
    assert step_losses(out) == first_losses
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[name], first_weights[name]) for name in first_weights)

    # the folder is a plain sequence-classification model that judge's --reward reads
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "The movie was"}, {"prompt": "Review:"}])
    capsys.readouterr()
    assert main(["judge", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--reward", str(out),
                 "--max-new-tokens", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["comparisons"] == 2 and summary["reward"] == str(out)


def test_lora_reward_model_is_saved_merged(tmp_path, reward_base):
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    out = tmp_path / "lora"
    assert main(reward_args(reward_base, data, out, "--max-steps", "2", "--lora")) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(reward_base)
    # the score head is trained in full under LoRA (peft's SEQ_CLS task): it moved
    assert not torch.equal(merged.score.weight, base.score.weight)


def test_reward_model_refuses_dpo_options(tmp_path, reward_base, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    with pytest.raises(SystemExit):
        main(reward_args(reward_base, data, tmp_path / "x", "--beta", "0.1"))
    assert "--beta" in capsys.readouterr().err
    assert main(reward_args(reward_base, data, tmp_path / "y", "--center-rewards-coefficient", "-1")) == 2
    assert "--center-rewards-coefficient must be >= 0" in capsys.readouterr().err


def test_margins_must_be_numbers_on_every_pair_or_none(tmp_path, reward_base, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**RECORDS[0], "margin": "a lot"}, *RECORDS[1:]])
    assert main(reward_args(reward_base, bad, tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "'margin'" in err and "expected a number" in err and "Traceback" not in err
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{**RECORDS[0], "margin": 1.0}, *RECORDS[1:]])
    assert main(reward_args(reward_base, mixed, tmp_path / "y")) == 2
    assert "line 2: no 'margin', while other pairs have one" in capsys.readouterr().err
    assert not (tmp_path / "y" / "model.safetensors").exists()


@pytest.mark.parametrize("conversational", [False, True])
def test_a_reward_model_scores_a_sample_as_it_scored_its_training_pairs(reward_base, conversational):
    """--reward FOLDER (ppo, rloo, online-dpo, judge) reads prompt and completion in the training form: the chat
    template with its end of turn, or the text with EOS. (It once scored prompt text + completion text, no
    template: a different input from the one the reward model learned on.)"""
    from preftune.data.batching import collate_padded
    from preftune.data.read import PreferencePair
    from preftune.data.tokenize import tokenize_pair
    from preftune.forward.rewards import load_reward
    from preftune.recipes.reward_model import sequence_rewards

    def reply(text: str):
        return [{"role": "assistant", "content": text}] if conversational else text

    pairs = [PreferencePair([{"role": "user", "content": p["prompt"]}] if conversational else p["prompt"],
                            reply(p["chosen"]), reply(p["rejected"]), "test", f"record {i}")
             for i, p in enumerate(PAIRS)]
    tokenizer = AutoTokenizer.from_pretrained(reward_base)
    model = AutoModelForSequenceClassification.from_pretrained(reward_base).eval()
    batch = collate_padded([tokenize_pair(pair, tokenizer, i) for i, pair in enumerate(pairs)], tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = sequence_rewards(model, batch)

    score = load_reward(str(reward_base))
    prompts = [pair.prompt for pair in pairs]
    assert score(prompts, [p["chosen"] for p in PAIRS]) == pytest.approx(chosen.tolist(), abs=1e-5)
    assert score(prompts, [p["rejected"] for p in PAIRS]) == pytest.approx(rejected.tolist(), abs=1e-5)


def test_the_default_job_reward_model_fits_longer_unless_told(tmp_path, tiny_model_dir, monkeypatch):
    """Without --data, `preftune reward-model` trains on the default job's pairs with its own settings (3 epochs at
    5e-5, 4 pairs a step); what the user sets wins. The pairs are stood in for by a file (building them needs the
    real model)."""
    import yaml

    import preftune.tasks.sentiment

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    monkeypatch.setattr(preftune.tasks.sentiment, "preference_files", lambda config, source: (data, data))
    for extra, expected in (([], (3.0, 5e-5, 4)), (["--learning-rate", "1e-4", "--num-epochs", "1"], (1.0, 1e-4, 4))):
        out = tmp_path / f"run{len(extra)}"
        assert main(["reward-model", "--model", str(tiny_model_dir), "--output-dir", str(out), "--max-steps", "1",
                     "--report-to", "none", *extra]) == 0
        train = yaml.safe_load((out / "preftune_config.yaml").read_text())["train"]
        assert (train["num_epochs"], train["learning_rate"], train["batch_size"]) == expected


@pytest.mark.parametrize("model_pad_id", [None, 0], ids=["no-pad-id", "pad-not-eos"])
def test_a_hub_reward_model_reads_each_row_of_a_batch_where_it_reads_it_alone(tmp_path, tiny_model_dir,
                                                                              model_pad_id):
    """A reward model from elsewhere whose tokenizer has no pad token, and whose config has no pad id (transformers
    refuses a batch > 1) or a pad id other than EOS (rows padded with EOS were read at their padding): each row of
    a batch scores as the model scores it alone, read at its last token (EOS, for a text prompt)."""
    from preftune.data.tokenize import tokenize_completion
    from preftune.forward.rewards import load_reward

    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)
    model.config.pad_token_id = model_pad_id
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()

    prompts = [p["prompt"] for p in PAIRS] * 2
    completions = [p["chosen"] for p in PAIRS] + [p["rejected"] for p in PAIRS]  # of different lengths
    alone = []
    for prompt, completion in zip(prompts, completions):
        ids, completion_ids = tokenize_completion(prompt, completion, tokenizer)
        assert completion_ids[-1] == tokenizer.eos_token_id
        with torch.no_grad():
            alone.append(model(input_ids=torch.tensor([ids + completion_ids])).logits[0, 0].item())
    score = load_reward(str(tmp_path))
    assert score(prompts, completions) == pytest.approx(alone, abs=1e-5)
    assert [score([p], [c])[0] for p, c in zip(prompts, completions)] == pytest.approx(alone, abs=1e-5)
