"""Every loss option against TRL 1.16: our `preftune eval` metrics equal TRL's `DPOTrainer.evaluate()` on the same
tiny random policy, a *different* tiny random reference and the same pairs, all in one batch (so that the
batch-sorting `aot` losses compare too), to 1e-5 relative.

Two settings make the comparison exact rather than approximate; both are about precision, not semantics:

- `bf16=False` in TRL's config. DPOConfig defaults to bf16=True, and then, before any training, TRL's evaluate
  scores the reference under bfloat16 autocast (accelerate prepared it at init) but the policy in float32 (it is
  prepared only in train()): with bf16 left on, TRL's own reference log-probs differ from a float32 forward of
  the same model by ~1e-3 nats. We compare float32 with float32.
- Sharpened models. The shared fixtures are initialised with std 0.02, so both predict a near-uniform
  distribution over 49k tokens: log-ratios policy/reference of ~0.05 nats out of sums of ~-50 nats, where the
  float32 rounding of the sums alone (~4e-6 nats) moves the rewards by 1.4e-5 relative (measured). Scaling the
  tied embedding by SHARPEN makes the models confident and different, with log-ratios of several nats.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import trl  # noqa: F401 - a hard test dependency (the dev extra): without it these oracle tests fail, not skip
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from preftune.cli import build_config, build_parser, main
from preftune.config import loss_params
from preftune.data.read import load_pairs
from preftune.data.tokenize import TokenizedPair, tokenize_pairs
from preftune.evaluation.pairs import evaluate_pairs
from preftune.forward.reference import reference_source
from preftune.objectives.losses import F_DIVERGENCE_LOSSES, LOSSES, NO_LD_ALPHA
from tests.conftest import PAIRS, write_jsonl

SHARPEN = 30.0
RECORDS = [
    *PAIRS,
    {"prompt": "My verdict:", "chosen": " see it twice, it rewards attention.", "rejected": " skip"},
    {"prompt": "The cast", "chosen": " shines.", "rejected": " seemed lost in a script that never decides"},
]
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
TRL_LOSSES = [name for name in LOSSES if name != "simpo"]  # simpo is beyond TRL's DPOTrainer


def sharpened(source: Path, destination: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(source)
    model.get_input_embeddings().weight.data.mul_(SHARPEN)  # tied: the output logits scale too
    model.save_pretrained(destination)
    AutoTokenizer.from_pretrained(source).save_pretrained(destination)
    return destination


@dataclass
class Setup:
    folder: Path
    policy_dir: Path
    reference_dir: Path
    pairs: Path
    # loaded once; TRL gets fresh copies for each case (its trainer patches their forward)
    policy: torch.nn.Module
    reference: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    tokenized: list[TokenizedPair]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_ref_dir, tmp_path_factory) -> Setup:
    folder = tmp_path_factory.mktemp("trl-oracle")
    policy = sharpened(tiny_model_dir, folder / "policy")
    reference = sharpened(tiny_ref_dir, folder / "reference")
    pairs = write_jsonl(folder / "pairs.jsonl", RECORDS)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenized, dropped = tokenize_pairs(load_pairs(str(pairs)).pairs, tokenizer, max_length=1024)
    assert not dropped
    return Setup(folder, policy, reference, pairs, AutoModelForCausalLM.from_pretrained(policy),
                 AutoModelForCausalLM.from_pretrained(reference), tokenizer, tokenized)


def trl_metrics(setup: Setup, options: dict) -> dict[str, float]:
    """TRL's DPOTrainer.evaluate() on fresh copies of the models, every pair in one batch."""
    from datasets import Dataset, disable_progress_bars
    from trl import DPOConfig, DPOTrainer

    disable_progress_bars()
    args = DPOConfig(output_dir=str(setup.folder / "trl-out"), report_to="none", use_cpu=True, bf16=False,
                     per_device_eval_batch_size=len(RECORDS), prediction_loss_only=True, **options)
    data = Dataset.from_list(RECORDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=copy.deepcopy(setup.policy), ref_model=copy.deepcopy(setup.reference), args=args,
                             train_dataset=data, eval_dataset=data, processing_class=setup.tokenizer)
        results = trainer.evaluate()
    return {name: results[f"eval_{name}"] for name in METRICS}


def eval_argv(setup: Setup, options: dict) -> list[str]:
    """`preftune eval` with TRL's options as flags (TRL's field names with dashes), every pair in one batch."""
    argv = ["eval", "--model", str(setup.policy_dir), "--ref-model", str(setup.reference_dir),
            "--data", str(setup.pairs), "--batch-size", str(len(RECORDS))]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def our_metrics(setup: Setup, options: dict) -> dict[str, float]:
    """What `preftune eval` computes for these flags (config, validation, config.loss_params, the evaluation
    path of training), on the models loaded once: `run_eval` less the loading, which test_cli_eval_equals_trl
    covers."""
    config = build_config(build_parser().parse_args(eval_argv(setup, options)))
    params = loss_params(config.loss)
    source = reference_source(setup.policy, setup.reference, params.length_split, params.reference_free)
    return evaluate_pairs(setup.policy, source, setup.tokenized, batch_size=config.train.eval_batch_size,
                          pad_token_id=setup.tokenizer.pad_token_id, params=params)


def cli_metrics(setup: Setup, options: dict, capsys) -> dict[str, float]:
    """`preftune eval`, whole: the JSON line it prints."""
    assert main(eval_argv(setup, options)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def needed(loss_types: list[str]) -> dict:
    """Options a loss cannot go without (EXO's label smoothing; TRL only checks it is not 0)."""
    return {"label_smoothing": 1e-3} if "exo_pair" in loss_types else {}


CASES: list[dict] = [{"loss_type": [name], **needed([name])} for name in TRL_LOSSES]
CASES += [{"loss_type": [name], "f_divergence_type": kind, **needed([name])}
          for name in F_DIVERGENCE_LOSSES if name != "sft"
          for kind in ("forward_kl", "js_divergence", "alpha_divergence")]
CASES += [
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": ["ipo", "sft"], "f_divergence_type": "js_divergence"},  # sft beside an f-divergence loss
    {"loss_type": ["robust"], "label_smoothing": 0.1},
    {"loss_type": ["exo_pair"], "label_smoothing": 0.1},
    {"loss_type": ["aot"], "label_smoothing": 0.1},
    {"loss_type": ["aot_unpaired"], "label_smoothing": 0.1},
    {"loss_type": ["discopop"], "discopop_tau": 0.5},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},  # MPO
    {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.5},
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl", "ld_alpha": 0.0, "use_weighting": True},
]
CASES += [{"loss_type": [name], "ld_alpha": 0.5, **needed([name])} for name in TRL_LOSSES if name not in NO_LD_ALPHA]
CASES += [{"loss_type": [name], "use_weighting": True, **needed([name])}
          for name in TRL_LOSSES if name not in ("aot", "aot_unpaired", "sft")]


def case_id(options: dict) -> str:
    return "-".join(",".join(map(str, v)) if isinstance(v, list) else f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("options", CASES, ids=case_id)
def test_metrics_equal_trl(setup, options):
    theirs = trl_metrics(setup, options)
    ours = our_metrics(setup, options)
    assert abs(ours["rewards/margins"]) > 0.1  # the models differ: the comparison is not of zeros
    for name in METRICS:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5), name


@pytest.mark.xfail(raises=RuntimeError, strict=True,
                   reason="TRL 1.16 multiplies sft's expanded (stride-0) loss by the WPO weights in place")
def test_trl_cannot_weight_sft(setup):
    """TRL 1.16 fails on sft with use_weighting (`per_sequence_loss *= ...` on `batch_loss.expand(batch_size)`),
    so that case cannot be compared; tests/test_losses.py checks ours against the formula. Strict: when a TRL
    release fixes it, this fails and the case joins CASES."""
    trl_metrics(setup, {"loss_type": ["sft"], "use_weighting": True})


def test_rpo_alpha_is_trls_sft_term(setup, capsys):
    """--rpo-alpha a is TRL's loss_type [..., 'sft'] with weight a (TRL dropped its own rpo_alpha)."""
    theirs = trl_metrics(setup, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]})
    ours = cli_metrics(setup, {"loss_type": ["sigmoid"], "rpo_alpha": 0.5}, capsys)
    for name in METRICS:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5), name


@pytest.mark.parametrize("options", [
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "ld_alpha": 0.5},
    {"loss_type": ["ipo"], "f_divergence_type": "js_divergence", "use_weighting": True},
], ids=case_id)
def test_cli_eval_equals_trl(setup, options, capsys):
    """The whole `preftune eval` command (loading, tokenizing, printing) gives TRL's numbers too."""
    theirs = trl_metrics(setup, options)
    ours = cli_metrics(setup, options, capsys)
    for name in METRICS:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5), name
