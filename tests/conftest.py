"""Shared fixtures: the real SmolLM2 tokenizer and tiny random Llama models built from a config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from preftune.models.load import default_gguf_path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"

# The test modules that take longest, started first so that pytest-xdist's workers finish together.
LONGEST_FIRST = ("tests/test_default_job.py", "tests/test_benchmarks.py", "tests/test_distributed.py")


def pytest_configure(config: pytest.Config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # each pytest-xdist worker takes its share of the cores: torch threads beyond it only fight each other
        threads = max(1, len(os.sched_getaffinity(0)) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the processes a test starts (CLI, torchrun) inherit it


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside and between the other modules is kept


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template), read from the embedded GGUF file."""
    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_tiny_llama(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A 2-layer random Llama with the real tokenizer's vocabulary, saved as a HF folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-policy"), tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_ref_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-reference"), tokenizer_dir, seed=1)


PAIRS = [
    {"prompt": "The movie was", "chosen": " wonderful and moving.", "rejected": " dull."},
    {"prompt": "I think the ending", "chosen": " was perfect", "rejected": " was rushed and silly, sadly"},
    {"prompt": "Review:", "chosen": " A delight from start to finish.", "rejected": " A mess."},
    {"prompt": "Honestly, this film", "chosen": " made me smile", "rejected": " bored me to tears"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


def assert_gradients_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor], step: int,
                           atol: float = 1e-5) -> None:
    """Every gradient of `model` equals `expected` (an oracle's, by parameter name) to atol, and is well above it."""
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=atol, rtol=0.0,
                                   msg=lambda m, n=name: f"step {step} {n}: {m}")
    assert max(g.abs().max() for g in grads.values()) > 1e-2  # gradients well above the tolerance


def assert_step_equals(objective, model: torch.nn.Module, weights: dict[str, torch.Tensor], minibatch,
                       expected_loss: float, expected_grads: dict[str, torch.Tensor], step: int):
    """An online objective's loss on `minibatch` with `weights` loaded equals an oracle's loss and gradients (1e-5).
    Returns (loss, metrics)."""
    model.load_state_dict(weights)
    model.zero_grad()
    loss, metrics = objective.loss(model, minibatch)
    assert abs(loss.item() - expected_loss) <= 1e-5, f"step {step}: loss {loss.item()} != {expected_loss}"
    loss.backward()
    assert_gradients_equal(model, expected_grads, step)
    return loss, metrics
