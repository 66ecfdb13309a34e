"""The Python API: the CLI's recipes from a notebook, with in-memory models and data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import preftune
from preftune.cli import main
from preftune.errors import DataError, UserError
from tests.conftest import PAIRS, write_jsonl

PYTHON_API = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
SETTINGS = {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "seed": 3}


def losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_train_from_a_dataset_and_a_loaded_model_equals_the_cli(tmp_path, tiny_model_dir):
    cli_run = tmp_path / "cli"
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(cli_run),
                 *[f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]]) == 0

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    result = preftune.train(SETTINGS, model=model, tokenizer=tokenizer, train_data=Dataset.from_list(PAIRS),
                            eval_data=PAIRS[:2], output_dir=tmp_path / "api")
    assert losses(result.output_dir) == losses(cli_run)
    assert result.model is model  # trained in place, as TRL's DPOTrainer does
    assert result.final_eval["num_pairs"] == 2
    saved = json.loads((result.output_dir / "eval_results.json").read_text())
    assert saved == result.final_eval
    # the trained model, saved, loads as a plain transformers model
    assert AutoModelForCausalLM.from_pretrained(result.output_dir).config.num_hidden_layers == 2


def test_evaluate_and_score_equal_the_cli(tmp_path, tiny_model_dir, tiny_ref_dir, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["eval", "--model", str(tiny_model_dir), "--ref-model", str(tiny_ref_dir), "--data", str(data)]) == 0
    from_cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from_api = preftune.evaluate(model=model, ref_model=str(tiny_ref_dir), data=Dataset.from_list(PAIRS))
    assert from_api == from_cli
    records = preftune.score({"beta": 0.5}, model=str(tiny_model_dir), ref_model=str(tiny_ref_dir), data=PAIRS)
    assert [r["location"] for r in records] == [f"record {i}" for i in range(1, len(PAIRS) + 1)]
    assert records[0]["chosen_reward"] == pytest.approx(
        0.5 * (records[0]["policy_logp_chosen"] - records[0]["reference_logp_chosen"]))


def test_in_memory_records_get_the_checks_of_files(tmp_path, tiny_model_dir):
    bad = [PAIRS[0], {"prompt": "x", "chosen": 3, "rejected": "y"}]
    with pytest.raises(DataError, match=r"record 2: field 'chosen'"):
        preftune.train(SETTINGS, model=str(tiny_model_dir), train_data=bad, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any folder was made or model loaded


def test_unknown_options_and_missing_data_are_user_errors(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="did you mean 'beta'"):
        preftune.train({"betta": 0.1}, model=str(tiny_model_dir), train_data=PAIRS)
    with pytest.raises(UserError, match="needs train_data"):
        preftune.train(model=str(tiny_model_dir))


def python_example() -> str:
    text = PYTHON_API.read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_python_api_page_example_runs_as_written(tmp_path, tiny_model_dir, monkeypatch):
    code = python_example()
    # the one change: the page's model id (from the hub, unreachable here) becomes the tiny local model
    assert code.count('model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"') == 1
    code = code.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(tiny_model_dir)))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/python-api.md", "exec"), namespace)  # noqa: S102 - the page's own example
    assert (tmp_path / "runs" / "notebook" / "model.safetensors").is_file()
    assert namespace["metrics"]["num_pairs"] == 4


def test_reward_model_from_a_dataset_equals_the_cli(tmp_path, tiny_model_dir):
    cli_run = tmp_path / "cli"
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["reward-model", "--model", str(tiny_model_dir), "--data", str(data), "--eval-data", str(data),
                 "--output-dir", str(cli_run), *[f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]]) == 0
    finished = preftune.reward_model(SETTINGS, model=str(tiny_model_dir), train_data=Dataset.from_list(PAIRS),
                                     eval_data=PAIRS, output_dir=tmp_path / "api")
    assert losses(finished.folder) == losses(cli_run)
    assert finished.final_eval == json.loads((cli_run / "eval_results.json").read_text())


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A batched reward (TRL's reward-function form) the policy can reach, without ties."""
    return [len(c) + 1e-3 * sum(map(ord, c)) for c in completions]


@pytest.mark.parametrize("command", ["ppo", "rloo", "online-dpo", "grpo"])
def test_online_recipes_take_an_in_memory_reward_and_equal_the_cli(tmp_path, tiny_model_dir, monkeypatch, command):
    (tmp_path / "text_reward.py").write_text("def length(prompt, completion):\n"
                                             "    return len(completion) + 1e-3 * sum(map(ord, completion))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    settings = {"model": str(tiny_model_dir), "prompts": str(prompts), "rollout_batch_size": 2, "max_new_tokens": 6,
                "max_steps": 2, "learning_rate": 1e-3, "report_to": "none"}
    cli_run = tmp_path / "cli"
    assert main([command, "--reward", "text_reward:length", "--output-dir", str(cli_run),
                 *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]]) == 0
    function = {"ppo": preftune.ppo, "rloo": preftune.rloo, "online-dpo": preftune.online_dpo,
                "grpo": preftune.grpo}[command]
    finished = function(settings, reward=length_reward, output_dir=tmp_path / "api")

    def trained(folder: Path) -> list[float]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        names = ("objective/scores", "reward" if command == "grpo" else "objective/kl")  # grpo, beta 0: no KL
        return [row[name] for row in rows if "objective/scores" in row for name in names]

    assert len(trained(cli_run)) == 4  # two rollouts
    assert trained(finished.folder) == pytest.approx(trained(cli_run), abs=1e-6)
    assert "<in-memory reward: length_reward>" in (finished.folder / "preftune_config.yaml").read_text()
