"""Shared fixtures: the real SmolLM2 tokenizer and tiny random Llama models built from a config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from preftune.models import default_gguf_path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"


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
