"""Where the reference log-probabilities come from.

A separate frozen model, or (LoRA without --ref-model) the policy itself with its adapter switched off, which
costs no extra weights; or none (--reference-free); or a table of log-probs computed once before training and
cached on disk (--precompute-ref-log-probs), so that no reference model is held while training and a beta sweep
pays for the reference once. TR-DPO's reference updates (--sync-ref-model) live here too.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from preftune.data.batching import Batch, iterate_batches
from preftune.data.tokenize import TokenizedPair
from preftune.errors import UserError
from preftune.forward.logprobs import sequence_logps
from preftune.objectives.logps import SequenceLogps
from preftune.runtime.accelerator import reshard

if TYPE_CHECKING:
    from preftune.config import ModelConfig
    from preftune.runtime.processes import ProcessGroup

ReferenceSource = Callable[[Batch], SequenceLogps]


def reference_source(
    policy: torch.nn.Module, reference: torch.nn.Module | None, length_split: bool = False,
    reference_free: bool = False,
) -> ReferenceSource:
    """A function giving the reference's SequenceLogps for a batch, without gradients.

    length_split: with LD-DPO's tails (see `sequence_logps`). reference_free: no forward at all, zeros (the
    losses then read log pi_ref = 0).
    """
    if reference_free:

        def zeros(batch: Batch) -> SequenceLogps:
            counts = batch.token_counts()
            nothing = torch.zeros(counts.shape[0] // 2, device=counts.device)
            return SequenceLogps(nothing, nothing, *counts.chunk(2))

        return zeros

    if reference is not None:

        def from_model(batch: Batch) -> SequenceLogps:
            with torch.no_grad():
                return sequence_logps(reference, batch, length_split=length_split)

        return from_model

    if not hasattr(policy, "disable_adapter"):
        raise ValueError("no reference model, and the policy has no adapter to switch off")

    def from_disabled_adapter(batch: Batch) -> SequenceLogps:
        with torch.no_grad(), policy.disable_adapter():
            return sequence_logps(policy, batch, length_split=length_split)

    return from_disabled_adapter


def check_syncable(policy: torch.nn.Module, reference: torch.nn.Module) -> None:
    """--sync-ref-model mixes the weights one to one: the reference needs the policy's parameter shapes."""
    shapes = [tuple(p.shape) for p in policy.parameters()]
    if shapes != [tuple(p.shape) for p in reference.parameters()]:
        raise UserError("--sync-ref-model needs a reference model with the policy's architecture (the same "
                        "parameters, in the same order); --ref-model has others")


def sync_reference_model(policy: torch.nn.Module, reference: torch.nn.Module, mixup_alpha: float) -> None:
    """TR-DPO's soft update, in place: pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref.

    Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", arXiv:2404.09656 (TR-DPO^alpha);
    the trainer calls it after every --ref-model-sync-steps optimizer steps, as TRL's SyncRefModelCallback.
    """
    with torch.no_grad():
        for model in (policy, reference):  # FSDP: mix each process's slices, not weights left gathered by a forward
            reshard(model)
        for target, source in zip(reference.parameters(), policy.parameters(), strict=True):
            target.mul_(1.0 - mixup_alpha).add_(source.detach(), alpha=mixup_alpha)


# ---- precomputed reference log-probs --------------------------------------------------------------------------
# Bump when the way log-probs are computed changes, so that older cache files are not read back.
CACHE_FORMAT = 1


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names and bytes), LoRA adapters left out: the reference a cache entry is for.

    Reads every parameter once (about a second per 500 MB); peft's name wrapping is undone, so a base model has
    the same fingerprint with or without an adapter attached.
    """
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            continue
        digest.update(name.replace("base_model.model.", "").replace(".base_layer", "").encode())
        if hasattr(parameter, "full_tensor"):  # FSDP's slice: the whole weight (a collective, as the loop is)
            parameter = parameter.full_tensor()
        digest.update(parameter.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(reference_fingerprint: str, pairs: Sequence[TokenizedPair], settings: dict) -> str:
    """What the cached log-probs depend on: the reference weights, every pair's token ids (so also the tokenizer,
    the chat template, max_length and truncation) and `settings` (autocast dtype, attention kernel, LD-DPO tails)."""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "reference": reference_fingerprint,
                                        "settings": settings}, sort_keys=True).encode())
    for pair in pairs:
        digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
    return digest.hexdigest()[:32]


def compute_reference_table(
    source: ReferenceSource, pairs: Sequence[TokenizedPair], batch_size: int, pad_token_id: int,
    device: torch.device | str, length_split: bool, layout: str = "padded",
) -> torch.Tensor:
    """(len(pairs), 2) float32 on the CPU: the reference's chosen and rejected log-probs of each pair, in order;
    with `length_split`, (len(pairs), 4) with the LD-DPO tails after them."""
    rows = []
    for batch in iterate_batches(pairs, batch_size, pad_token_id, layout=layout):
        logps = source(batch.to(device))
        columns = [logps.chosen, logps.rejected]
        if length_split:
            columns += [logps.chosen_tail, logps.rejected_tail]
        rows.append(torch.stack(columns, dim=-1).float().cpu())
    return torch.cat(rows)


def cached_reference_table(
    cache_file: Path, compute: Callable[[], torch.Tensor], write: bool, read: bool = True
) -> tuple[torch.Tensor, bool]:
    """The table in `cache_file` (when `read`), else `compute()`'s (written to `cache_file` when `write`); and
    whether it was read from the cache. Written atomically: a killed run leaves no half-written entry behind."""
    if read and cache_file.exists():
        return load_file(cache_file)["logps"], True
    table = compute()
    if write:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        staging = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        save_file({"logps": table.contiguous()}, staging)
        staging.replace(cache_file)
    return table, False


def table_source(table: torch.Tensor, pairs: Sequence[TokenizedPair]) -> ReferenceSource:
    """A ReferenceSource reading the rows of `table` (as `compute_reference_table` gives for `pairs`): no model."""
    row_of = {pair.index: row for row, pair in enumerate(pairs)}

    def from_table(batch: Batch) -> SequenceLogps:
        values = table[[row_of[i] for i in batch.pair_indices]].to(batch.input_ids.device)
        counts = batch.token_counts()
        logps = SequenceLogps(values[:, 0], values[:, 1], *counts.chunk(2))
        if values.shape[1] == 4:
            logps.chosen_tail, logps.rejected_tail = values[:, 2], values[:, 3]
        return logps

    return from_table


def precomputed_references(
    group: ProcessGroup, model: ModelConfig, policy: torch.nn.Module,
    pair_sets: Sequence[tuple[Sequence[TokenizedPair], str]], *, batch_size: int, pad_token_id: int,
    length_split: bool, layout: str,
) -> list[ReferenceSource | None]:
    """--precompute-ref-log-probs: a table source for each (pairs, what) of `pair_sets` (None where there are no
    pairs), read from the cache or computed now (every process computes what is not cached; the main process
    writes it). The reference is --ref-model, loaded only for this, or the starting policy itself (with LoRA: its
    adapter off); call it before a checkpoint is restored, while the policy is still the starting one."""
    from preftune.models.load import cache_root, load_reference_model

    separate = group.place_frozen(load_reference_model(model)) if model.ref_model else None
    live = reference_source(policy, separate if separate is not None else (None if model.lora else policy),
                            length_split)
    fingerprint = weights_fingerprint(separate if separate is not None else policy)
    settings = {"mixed_precision": group.accelerator.mixed_precision, "attn_implementation": model.attn_implementation,
                "length_split": length_split}
    sources: list[ReferenceSource | None] = []
    for pairs, what in pair_sets:
        if not pairs:  # nothing reads this source (and `live` must not outlive this call)
            sources.append(None)
            continue
        cache_file = cache_root(model.cache_dir) / "reference-logps" / (
            cache_key(fingerprint, pairs, settings) + ".safetensors")
        started = time.time()

        def compute(pairs: Sequence[TokenizedPair] = pairs) -> torch.Tensor:
            return compute_reference_table(live, pairs, batch_size, pad_token_id, group.device, length_split, layout)

        with torch.no_grad(), group.accelerator.autocast():
            # every process reads, or every one computes: under FSDP computing is collective, and the main
            # process may write the file while another is still deciding
            readable = not group.any_process(not cache_file.exists())
            table, cached = cached_reference_table(cache_file, compute, write=group.is_main, read=readable)
        how = "read from" if cached else f"computed in {time.time() - started:.0f} s, cached in"
        group.print(f"reference log-probs of {len(pairs)} {what} pairs {how} {cache_file}")
        sources.append(table_source(table, pairs))
    return sources
