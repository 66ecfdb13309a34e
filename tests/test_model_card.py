"""Model cards: the card's text as a pure function of config, facts and metrics; the base's license carried; and
README.md in every folder that tiny-model CLI runs save (full, LoRA adapter, merged LoRA, reward model), read back
with yaml.safe_load and its loading snippet run."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from preftune.cli import main
from preftune.config import Config
from preftune.data.read import is_hub_dataset
from preftune.evaluation.report import TrainingMeans, last_epoch_means
from preftune.objectives.losses import LOSSES
from preftune.recipes.model_card import (
    BaseModel,
    SavedModel,
    base_model_of,
    front_matter,
    hub_id_of_cache_path,
    model_card,
    read_front_matter,
)
from tests.conftest import PAIRS, write_jsonl

HUB_DATA = "Anthropic/hh-rlhf"


def saved(recipe: str = "dpo", form: str = "full", base: BaseModel | None = None, path: str = "runs/my-run"):
    return SavedModel(recipe=recipe, form=form, name=Path(path).name, path=path, tokenizer_path=path,
                      base=base or BaseModel("org/base-model", True, {"license": "mit"}), num_train_pairs=242,
                      num_eval_pairs=61, steps=31)


def config(**sections) -> Config:
    c = Config()
    c.data.data = HUB_DATA
    for section, values in sections.items():
        for name, value in values.items():
            setattr(getattr(c, section), name, value)
    return c


def card_parts(text: str) -> tuple[dict, str]:
    """(front matter as yaml.safe_load reads it, the body): the layout the hub expects, --- lines first."""
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


TRAINING = TrainingMeans({"loss": 0.61234, "rewards/accuracies": 0.75}, first_step=1, last_step=31, num_rows=31,
                         whole_run=True)
EVAL = {"loss": 0.6627786, "rewards/accuracies": 0.639344, "num_pairs": 61}


# ---- pure functions ------------------------------------------------------------------------------------------
def test_dpo_card_front_matter_and_body():
    c = config(loss={"loss_type": "ipo", "beta": 0.25, "rpo_alpha": 0.5}, train={"learning_rate": 5e-7})
    meta, body = card_parts(model_card(c, saved(), EVAL, TRAINING))
    assert meta == {"base_model": "org/base-model", "base_model_relation": "finetune", "library_name": "transformers",
                    "license": "mit", "datasets": [HUB_DATA], "tags": ["preftune", "dpo", "ipo", "sft"],
                    "pipeline_tag": "text-generation"}
    assert "[org/base-model](https://huggingface.co/org/base-model)" in body
    # the method's papers: DPO, and each loss's row of the table, linked
    for paper in ("2305.18290", "2310.12036", "2404.19733"):
        assert f"[arXiv:{paper}](https://arxiv.org/abs/{paper})" in body
    assert "- `ipo` (weight 1): " + LOSSES["ipo"].meaning in body and "- `sft` (weight 0.5): " in body
    # hyperparameters: the summary and the resolved config's sections DPO reads (not sample / default_job)
    assert "| beta | 0.25 |" in body and "| learning rate | 5e-07 (AdamW" in body
    assert "| optimizer steps | 31 (num_epochs 1) |" in body
    resolved = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert list(resolved) == ["model", "data", "loss", "train"]
    assert resolved["loss"] == c.to_dict()["loss"] and resolved["train"]["learning_rate"] == 5e-7
    # metrics: the held-out evaluation and the training means, each value shown
    assert "(61 pairs; `eval_results.json`)" in body and "| loss | 0.6628 |" in body
    assert "| rewards/accuracies | 0.6393 |" in body and "| num_pairs |" not in body
    assert "mean of the 31 logged steps 1-31 (all of training" in body and "| loss | 0.6123 |" in body
    assert "AutoModelForCausalLM.from_pretrained('runs/my-run')" in body
    assert "(hub dataset, split `train`), 242 pairs" in body


def test_adapter_card_is_a_peft_card_and_options_cite_their_papers():
    c = config(model={"lora": True, "lora_r": 4}, loss={"f_divergence_type": "js_divergence", "ld_alpha": 0.5},
               train={"sync_ref_model": True})
    c.data.data = "pairs.jsonl"  # a local file: no datasets field
    meta, body = card_parts(model_card(c, saved(form="adapter"), None, None))
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
    assert "datasets" not in meta and meta["tags"] == ["preftune", "dpo", "sigmoid", "lora"]
    for paper in ("2309.16240", "2409.06411", "2404.09656", "2106.09685"):  # f-DPO, LD-DPO, TR-DPO, LoRA
        assert f"arXiv:{paper}" in body
    assert "arXiv:2406.11827" not in body  # WPO is off
    assert "AutoPeftModelForCausalLM.from_pretrained('runs/my-run')" in body and "| LoRA | r 4, alpha 32" in body
    assert "No held-out evaluation" in body and "No optimizer step was logged." in body
    assert "the policy with its LoRA adapter switched off" in body


def test_reward_model_card():
    plain = model_card(config(), saved("reward-model"), {"accuracy": 0.8, "num_pairs": 10}, None)
    meta, body = card_parts(plain)
    assert meta["tags"] == ["preftune", "reward-model", "bradley-terry"]
    assert meta["pipeline_tag"] == "text-classification" and meta["library_name"] == "transformers"
    assert "arXiv:2203.02155" in body and "Bradley and Terry 1952" in body and "arXiv:2305.18290" not in body
    assert "arXiv:2312.09244" not in body and "AutoModelForSequenceClassification.from_pretrained" in body
    resolved = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert list(resolved) == ["model", "data", "train", "reward_model"]
    centred = card_parts(model_card(config(reward_model={"center_rewards_coefficient": 0.01}), saved("reward-model"),
                                    None, None))[1]
    assert "arXiv:2312.09244" in centred and "| center_rewards_coefficient | 0.01 |" in centred


def test_front_matter_stays_valid_yaml_and_unknown_base_is_left_out():
    awkward = BaseModel("my: base #1 'quoted' \"x\"", False, {"license": "other", "license_name": "a: b"})
    meta = card_parts(model_card(config(), saved(base=awkward), None, None))[0]
    assert meta["base_model"] == awkward.name and meta["license_name"] == "a: b"
    assert meta == front_matter(config(), saved(base=awkward))
    unknown = card_parts(model_card(config(), saved(base=BaseModel(None)), None, None))
    assert "base_model" not in unknown[0] and "license" not in unknown[0] and "an in-memory model" in unknown[1]
    with pytest.raises(ValueError, match="form"):
        model_card(config(), saved(form="gguf"), None, None)


def test_every_loss_cites_its_paper():
    for name, spec in LOSSES.items():
        assert re.search(r"\d{4}, .+, arXiv:\d{4}\.\d{4,5}", spec.paper), name


def test_training_means_are_of_the_last_epoch():
    rows = [{"step": step, "epoch": epoch, "loss": loss, "rewards/accuracies": 0.5}
            for step, epoch, loss in [(1, 0.5, 9.0), (2, 1.0, 9.0), (3, 1.5, 1.0), (4, 2.0, 2.0)]]
    rows.insert(2, {"step": 2, "epoch": 1.0, "eval_loss": 5.0})
    means = last_epoch_means(rows, ("loss", "rewards/accuracies", "margin"))  # margin: not logged, left out
    assert means == TrainingMeans({"loss": 1.5, "rewards/accuracies": 0.5}, 3, 4, 2, whole_run=False)
    assert last_epoch_means(rows[2:3]) is None


def test_read_front_matter():
    assert read_front_matter("---\nlicense: mit\nlanguage: [en]\n---\n# card\n") == {"license": "mit",
                                                                                    "language": ["en"]}
    assert read_front_matter("# no front matter\n---\nlicense: mit\n---\n") == {}
    assert read_front_matter("---\nlicense: [mit\n---\n") == {}  # broken YAML
    assert read_front_matter("---\n- a list\n---\n") == {}


def test_base_model_of(tmp_path, monkeypatch):
    local = tmp_path / "base"
    local.mkdir()
    assert base_model_of(str(local), str(local)) == BaseModel(str(local), False, {})
    (local / "README.md").write_text("---\nlicense: llama3.2\nlanguage: en\ntags: [not, carried]\n---\ntext\n")
    assert base_model_of(str(local), str(local)) == BaseModel(str(local), False, {"license": "llama3.2",
                                                                                  "language": "en"})
    # the embedded default (no --model) is SmolLM2-135M-Instruct, Apache 2.0
    default = base_model_of(None, str(tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"))
    assert default == BaseModel("HuggingFaceTB/SmolLM2-135M-Instruct", True, {"license": "apache-2.0"})
    assert base_model_of(None, "LlamaForCausalLM") == BaseModel(None)  # an in-memory model with no name
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id_of_cache_path(snapshot) == "org/name" and hub_id_of_cache_path(local) is None
    # a hub id: its card's front matter, or nothing when it cannot be had
    card = tmp_path / "hub-card.md"
    card.write_text("---\nlicense: gemma\n---\n")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo_id, filename: str(card))
    assert base_model_of("org/model", "org/model") == BaseModel("org/model", True, {"license": "gemma"})
    assert base_model_of(str(snapshot), str(snapshot)) == BaseModel("org/name", True, {"license": "gemma"})

    def offline(repo_id, filename):
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    assert base_model_of("org/model", "org/model") == BaseModel("org/model", True, {})


def test_is_hub_dataset(tmp_path):
    local = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert is_hub_dataset(HUB_DATA) and is_hub_dataset("imdb")
    assert not is_hub_dataset(str(local)) and not is_hub_dataset("data/x/pairs.jsonl")
    assert not is_hub_dataset("<in-memory train_data: Dataset>") and not is_hub_dataset(None)


# ---- the cards tiny-model runs write ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def licensed_base(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama with a card of its own, whose license the trained models carry."""
    folder = tmp_path_factory.mktemp("licensed") / "base"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "README.md").write_text("---\nlicense: mit\nlanguage:\n- en\n---\n# tiny base\n", encoding="utf-8")
    return folder


def read_card(folder: Path) -> tuple[dict, str]:
    return card_parts((folder / "README.md").read_text(encoding="utf-8"))


def run_snippet(body: str) -> dict:
    """Run the card's "How to use" code as it is written."""
    code = body.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "model card", "exec"), namespace)  # noqa: S102 - the card's own snippet is under test
    return namespace


def train(base: Path, data: Path, out: Path, *extra: str, command: str = "train") -> None:
    assert main([command, "--model", str(base), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--learning-rate", "1e-2", "--max-new-tokens", "4", *extra]) == 0


def test_full_model_card(tmp_path, licensed_base):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "full"
    train(licensed_base, data, out, "--eval-data", str(data), "--loss-type", "sigmoid,sft", "--beta", "0.3")
    meta, body = read_card(out)
    assert meta == {"base_model": str(licensed_base), "base_model_relation": "finetune",
                    "library_name": "transformers", "license": "mit", "language": ["en"],
                    "tags": ["preftune", "dpo", "sigmoid", "sft"], "pipeline_tag": "text-generation"}
    assert (licensed_base / "README.md").read_text().endswith("# tiny base\n")  # the base's card is untouched
    assert "| beta | 0.3 |" in body and "| optimizer steps | 2 (max_steps 2) |" in body
    assert "| pairs per optimizer step | 2 (batch 2 x grad_accum 1 x 1 process) |" in body
    held_out = json.loads((out / "eval_results.json").read_text())
    assert f"({len(PAIRS)} pairs; `eval_results.json`)" in body
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert f"| {name} | {held_out[name]:.4g} |" in body
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss_mean = statistics.fmean(row["loss"] for row in rows if "loss" in row)
    assert last_epoch_means(rows).means["loss"] == pytest.approx(loss_mean)
    assert f"| loss | {loss_mean:.4g} |" in body.split("Training metrics")[1]
    snippet = run_snippet(body)
    assert type(snippet["model"]).__name__ == "LlamaForCausalLM" and isinstance(snippet["output"][0, 0].item(), int)


def test_lora_adapter_card(tmp_path, licensed_base):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "adapter"
    train(licensed_base, data, out, "--lora", "--lora-r", "4", "--loss-type", "ipo")
    meta, body = read_card(out)
    assert meta["library_name"] == "peft" and meta["base_model"] == str(licensed_base)
    assert meta["base_model_relation"] == "adapter" and meta["license"] == "mit"
    assert meta["tags"] == ["preftune", "dpo", "ipo", "lora"] and "datasets" not in meta
    assert "LoRA adapter of the trained policy" in body and "No held-out evaluation" in body
    assert "| LoRA | r 4, alpha 32, dropout 0, targets all-linear |" in body
    from peft import PeftModel

    assert not isinstance(run_snippet(body)["model"], PeftModel)  # merge_and_unload: a plain model


def test_merged_lora_cards(tmp_path, licensed_base):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "merged"
    train(licensed_base, data, out, "--lora", "--lora-r", "4", "--merge")
    merged, merged_body = read_card(out)
    adapter, adapter_body = read_card(out / "adapter")
    assert merged["library_name"] == "transformers" and adapter["library_name"] == "peft"
    assert merged["license"] == adapter["license"] == "mit" and "lora" in merged["tags"]
    assert "the adapter itself is in `adapter/`" in merged_body
    assert "# merged (LoRA adapter)" in adapter_body and "preftune" in adapter["tags"]  # not peft's own card
    run_snippet(adapter_body)


@pytest.mark.parametrize("lora", [False, True])
def test_reward_model_cards(tmp_path, licensed_base, lora):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "reward"
    train(licensed_base, data, out, "--eval-data", str(data), "--center-rewards-coefficient", "0.01",
          *(["--lora", "--lora-r", "4"] if lora else []), command="reward-model")
    meta, body = read_card(out)
    assert meta["tags"] == ["preftune", "reward-model", "bradley-terry", *(["lora"] if lora else [])]
    assert meta["pipeline_tag"] == "text-classification" and meta["license"] == "mit"
    assert meta["library_name"] == "transformers" and meta["base_model"] == str(licensed_base)
    held_out = json.loads((out / "eval_results.json").read_text())
    assert f"| accuracy | {held_out['accuracy']:.4g} |" in body and "| center_rewards_coefficient | 0.01 |" in body
    assert "| margin |" in body.split("Training metrics")[1]
    assert isinstance(run_snippet(body)["reward"], float)
    if lora:
        adapter_meta, adapter_body = read_card(out / "adapter")
        assert adapter_meta["library_name"] == "peft" and adapter_meta["pipeline_tag"] == "text-classification"
        assert isinstance(run_snippet(adapter_body)["reward"], float)
