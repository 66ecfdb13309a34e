"""`preftune export --gguf`: transformers' GGUF loader reads the file back to the saved model's logits and ids.

Tiny random Llama, Mistral and Qwen2 models; most use a small byte-level BPE tokenizer trained here (writing a
49k-token vocabulary costs the gguf writer about 10 s), one the real SmolLM2 tokenizer of the default model.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from preftune.cli import main
from preftune.config import ModelConfig
from preftune.models import export
from preftune.models.load import add_lora, save_model

CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The movie was wonderful and moving.", "I think the ending was rushed and silly, sadly.",
          "Honestly, this film made me smile in 2024; café scenes, 東京 at night.", "A delight from start to finish!",
          "Review: a mess.\n\n  Two spaces, tabs\tand newlines."] * 4
TEXTS = ["The movie was wonderful, 2024 café 東京!", "  leading spaces\n\nand <think> tags\t",
         "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"]
LOGIT_PROMPTS = ["The movie was wonderful and moving.", "Honestly, this film made me smile"]
# max |logit difference| / max |logit| against the saved fp32 model, measured on the tiny models below (weights
# std 0.2, logits up to ~6): f16 1.4e-3 to 1.7e-3, q8_0 3.2e-2 to 4.1e-2; the bounds leave about 3x (f16) and
# 2.5x (q8_0) room. Against the saved model with its matrices rounded the same way the file is exact (1e-5).
RELATIVE_TOLERANCE = {"f32": 1e-6, "f16": 5e-3, "q8_0": 0.1}


def small_tokenizer(folder: Path, split: str | None = None) -> Path:
    """A byte-level BPE tokenizer of ~400 tokens (SmolLM2's special tokens first), GPT-2's split or `split`."""
    backend = Tokenizer(models.BPE())
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # Qwen2's layout in tokenizer.json: the regex split, then bytes without GPT-2's own regex
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.add_tokens(["<think>"])  # an added token that is not special: USER_DEFINED in the GGUF
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_split_tokenizer(tmp_path_factory) -> Path:
    return small_tokenizer(tmp_path_factory.mktemp("tokenizer-gpt2"))


@pytest.fixture(scope="module")
def qwen2_split_tokenizer(tmp_path_factory) -> Path:
    return small_tokenizer(tmp_path_factory.mktemp("tokenizer-qwen2"), QWEN2_SPLIT)


def sharpen(model: torch.nn.Module) -> None:
    """Weights large enough that attention is far from uniform (a q/k layout error then shows in the logits),
    and norms and biases that are not all ones or zeros (a swapped norm or a dropped bias shows too)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.2)
            else:
                parameter.normal_(0.0, 0.2)


def tiny_model(kind: str, tokenizer_dir: Path, folder: Path, extra_rows: int = 0, tie: bool = True) -> Path:
    """A 2-layer random model of `kind` saved with the tokenizer; `extra_rows` embedding rows no token uses."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[kind]
    config = config_class(vocab_size=len(tokenizer) + extra_rows, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = model_class(config)
    sharpen(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logits(model: torch.nn.Module, tokenizer, prompts: list[str] = LOGIT_PROMPTS) -> torch.Tensor:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[batch.attention_mask.bool()]


def read_back(path: Path):
    folder, name = str(path.parent), path.name
    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder, gguf_file=name))


def metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    values = {key: field.contents() for key, field in reader.fields.items()}
    values["tensor_types"] = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    return values


def assert_same_tokenizer(saved, loaded) -> None:
    for text in TEXTS:
        assert loaded(text).input_ids == saved(text).input_ids, text
    assert loaded.chat_template == saved.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        saved.bos_token_id, saved.eos_token_id, saved.pad_token_id)


def test_real_tokenizer_llama_round_trip_f32(tmp_path, tiny_model_dir):
    """The default model's tokenizer (49,152 tokens, chat template) and a tied Llama: logits within 1e-5 and the
    same token ids; a run of the default model keeps the embedded GGUF's pre-tokenizer name."""
    run = shutil.copytree(tiny_model_dir, tmp_path / "run")
    (run / "preftune_config.yaml").write_text("model:\n  model: null\n")  # as the default job writes it
    out = export.export_gguf(run, tmp_path / "model.gguf", "f32")
    saved_model, saved_tokenizer = AutoModelForCausalLM.from_pretrained(run).eval(), AutoTokenizer.from_pretrained(run)
    loaded_model, loaded_tokenizer = read_back(out)
    assert (logits(loaded_model, saved_tokenizer) - logits(saved_model, saved_tokenizer)).abs().max() <= 1e-5
    assert_same_tokenizer(saved_tokenizer, loaded_tokenizer)
    meta = metadata(out)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm"  # from the embedded GGUF, as llama.cpp named it
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) == 48900
    assert meta["tokenizer.ggml.token_type"][:17] == [gguf.TokenType.CONTROL] * 17  # SmolLM2's special tokens
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.padding_token_id"] == 2 and meta["tokenizer.chat_template"]
    assert "output.weight" not in meta["tensor_types"]  # tied: llama.cpp reuses token_embd


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_outtypes_round_trip_within_measured_tolerance(tmp_path, gpt2_split_tokenizer, outtype):
    run = tiny_model("llama", gpt2_split_tokenizer, tmp_path / "run", tie=False)
    out = export.export_gguf(run, tmp_path / f"model-{outtype}.gguf", outtype)
    saved_model, tokenizer = AutoModelForCausalLM.from_pretrained(run).eval(), AutoTokenizer.from_pretrained(run)
    loaded_model, loaded_tokenizer = read_back(out)
    expected, got = logits(saved_model, tokenizer), logits(loaded_model, tokenizer)
    assert (got - expected).abs().max() <= RELATIVE_TOLERANCE[outtype] * expected.abs().max()
    # exactly the saved model with each matrix rounded as --outtype stores it (gguf's own Q8_0 reference code
    # here, transformers' de-quantizer in the loader)
    rounded = copy.deepcopy(saved_model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            if parameter.ndim == 2 and outtype == "f16":
                parameter.copy_(parameter.half().float())
            elif parameter.ndim == 2 and outtype == "q8_0":
                kind = gguf.GGMLQuantizationType.Q8_0
                parameter.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(
                    parameter.numpy(), kind), kind)))
    assert (got - logits(rounded, tokenizer)).abs().max() <= 1e-5
    assert_same_tokenizer(tokenizer, loaded_tokenizer)
    meta = metadata(out)
    matrix_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[outtype]
    assert meta["tensor_types"]["blk.0.attn_q.weight"] == matrix_type
    assert meta["tensor_types"]["output.weight"] == matrix_type
    assert meta["tensor_types"]["blk.0.attn_norm.weight"] == "F32"  # 1-D stays f32, as in llama.cpp
    assert meta["general.file_type"] == export.OUTTYPES[outtype][0]
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    types = meta["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<think>")] == gguf.TokenType.USER_DEFINED
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL


def test_unpermuted_q_k_would_be_caught(tmp_path, gpt2_split_tokenizer, monkeypatch):
    """The round trip is sensitive to llama.cpp's rotary layout: without the q/k permutation the logits differ."""
    run = tiny_model("llama", gpt2_split_tokenizer, tmp_path / "run")
    monkeypatch.setitem(export.ARCHITECTURES, "llama", export.Architecture(gguf.MODEL_ARCH.LLAMA, False, False))
    out = export.export_gguf(run, tmp_path / "wrong.gguf", "f32")
    tokenizer = AutoTokenizer.from_pretrained(run)
    difference = (logits(read_back(out)[0], tokenizer)
                  - logits(AutoModelForCausalLM.from_pretrained(run).eval(), tokenizer)).abs().max().item()
    assert difference > 1e-2


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_mistral_and_qwen2_round_trip_f32(tmp_path, gpt2_split_tokenizer, qwen2_split_tokenizer, kind):
    """Mistral leaves as llama.cpp's llama (read back as a Llama: the same model below its sliding window); Qwen2
    as qwen2, with its q/k/v biases, its regex split and an embedding padded past the vocabulary."""
    tokenizer_dir = qwen2_split_tokenizer if kind == "qwen2" else gpt2_split_tokenizer
    run = tiny_model(kind, tokenizer_dir, tmp_path / f"tiny-{kind}", extra_rows=7 if kind == "qwen2" else 0,
                     tie=kind == "qwen2")
    out = export.export_gguf(run, tmp_path / "model.gguf", "f32")
    saved_model, tokenizer = AutoModelForCausalLM.from_pretrained(run).eval(), AutoTokenizer.from_pretrained(run)
    loaded_model, loaded_tokenizer = read_back(out)
    assert type(loaded_model).__name__ == {"mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind]
    assert (logits(loaded_model, tokenizer) - logits(saved_model, tokenizer)).abs().max() <= 1e-5
    assert_same_tokenizer(tokenizer, loaded_tokenizer)
    meta = metadata(out)
    if kind == "qwen2":
        assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.pre"] == "qwen2"
        assert "blk.1.attn_k.bias" in meta["tensor_types"]
        assert meta["tokenizer.ggml.tokens"][-1] == f"[PAD{len(tokenizer) + 6}]"
        assert meta["tokenizer.ggml.token_type"][-7:] == [gguf.TokenType.UNUSED] * 7
    else:
        assert meta["general.architecture"] == "llama" and "output.weight" in meta["tensor_types"]


def test_lora_run_is_merged_first(tmp_path, gpt2_split_tokenizer, capsys):
    """A --lora run folder (the adapter only): the GGUF holds base + adapter, through the CLI."""
    base = tiny_model("llama", gpt2_split_tokenizer, tmp_path / "base")
    policy = add_lora(AutoModelForCausalLM.from_pretrained(base), ModelConfig(lora=True, lora_r=4))
    with torch.no_grad():  # a trained adapter: B is not zero
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    run = tmp_path / "run"
    save_model(policy, AutoTokenizer.from_pretrained(base), run)
    assert (run / "adapter_config.json").is_file() and not (run / "config.json").is_file()
    out = tmp_path / "merged.gguf"
    assert main(["export", str(run), "--gguf", str(out), "--outtype", "f32"]) == 0
    assert "wrote" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(run)
    with_adapter = logits(AutoModelForCausalLM.from_pretrained(run).eval(), tokenizer)  # peft, unmerged
    loaded = logits(read_back(out)[0], tokenizer)
    # merged weights round differently from the adapter applied on the side: measured 2.4e-5 here
    assert (loaded - with_adapter).abs().max() <= 1e-4
    assert (loaded - logits(AutoModelForCausalLM.from_pretrained(base).eval(), tokenizer)).abs().max() > 1e-2


def test_refusals_exit_2_and_leave_no_file(tmp_path, gpt2_split_tokenizer, capsys):
    run = tiny_model("llama", gpt2_split_tokenizer, tmp_path / "run")
    out = tmp_path / "taken.gguf"
    out.write_bytes(b"keep me")

    def refused(args: list[str], message: str) -> None:
        assert main(["export", *args]) == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error

    refused([str(run), "--gguf", str(out)], "already exists; pass --force")
    assert out.read_bytes() == b"keep me"
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("{}\n")
    refused([str(empty), "--gguf", str(tmp_path / "a.gguf")], "no model in it")
    refused([str(tmp_path / "missing"), "--gguf", str(tmp_path / "a.gguf")], "not a folder")
    refused([str(run), "--gguf", str(tmp_path / "no-such-folder" / "a.gguf")], "no such folder")

    gpt2 = tmp_path / "gpt2-run"
    GPT2LMHeadModel(GPT2Config(vocab_size=410, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(gpt2_split_tokenizer).save_pretrained(gpt2)
    refused([str(gpt2), "--gguf", str(tmp_path / "a.gguf")], "this model is 'gpt2'")
    scaled = tmp_path / "scaled-run"
    model = AutoModelForCausalLM.from_pretrained(run)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model.save_pretrained(scaled)
    AutoTokenizer.from_pretrained(run).save_pretrained(scaled)
    refused([str(scaled), "--gguf", str(tmp_path / "a.gguf")], "rope scaling 'linear'")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(run), "--gguf", str(tmp_path / "a.gguf"), "--outtype", "q4_k"])
    assert exit_info.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["taken.gguf"]  # no partial files

    assert main(["export", str(run), "--gguf", str(out), "--outtype", "q8_0", "--force"]) == 0
    assert metadata(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_tensor_types_follow_llama_cpp():
    """1-D tensors stay f32; q8_0 needs rows of whole 32-value blocks and falls back to f16 otherwise."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    rows = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    assert export.encode_tensor(rows, q8)[1] == q8
    assert export.encode_tensor(rows[:, :48], q8)[1] == gguf.GGMLQuantizationType.F16
    assert export.encode_tensor(rows[0], q8)[1] == gguf.GGMLQuantizationType.F32
    assert export.encode_tensor(rows, gguf.GGMLQuantizationType.F16)[0].dtype == np.float16
