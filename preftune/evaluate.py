"""Evaluation on top of the training log-prob path: preference metrics, sampling, and a KL estimate.

`evaluate_pairs` runs exactly the forward and loss of a training step without gradients, so its rewards are
the training rewards. `sample` and `kl_from_samples` serve the default job's before/after report.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from preftune.batching import collate_padded, iterate_batches, pad_rows
from preftune.config import Config
from preftune.errors import UserError
from preftune.logprobs import completion_logps, sequence_logps
from preftune.losses import LossParams, compute_loss
from preftune.metrics import MetricTotals, pair_sums
from preftune.reference import ReferenceSource
from preftune.runtime import sharded_model
from preftune.tokenize import TokenizedPair


def evaluate_totals(
    policy: torch.nn.Module,
    reference: ReferenceSource,
    pairs: Sequence[TokenizedPair],
    *,
    batch_size: int,
    pad_token_id: int,
    params: LossParams,
    device: torch.device | str = "cpu",
    layout: str = "padded",
    lockstep: tuple[int, TokenizedPair] | None = None,
) -> MetricTotals:
    """Per-pair sums of the TRL-named preference metrics over `pairs`, without gradients.

    `lockstep=(batches, filler)`: run exactly `batches` forwards, the ones past `pairs`' own on `filler` alone and
    not counted. Under FSDP every forward is a collective, so processes with shares of unequal length must run
    the same number of them.
    """
    was_training = policy.training
    policy.eval()
    totals = MetricTotals()
    batches = list(iterate_batches(pairs, batch_size, pad_token_id, layout=layout))
    counted = len(batches)
    if lockstep is not None:
        wanted, filler = lockstep
        batches += [collate_padded([filler], pad_token_id)] * (wanted - counted)
    with torch.no_grad():
        for position, batch in enumerate(batches):
            batch = batch.to(device)
            policy_logps = sequence_logps(policy, batch, params.length_split, params.use_weighting)
            output = compute_loss(policy_logps, reference(batch), params)
            if position < counted:
                totals.add(pair_sums(output, policy_logps), batch.num_pairs)
    policy.train(was_training)
    return totals


def evaluate_pairs(policy: torch.nn.Module, reference: ReferenceSource, pairs: Sequence[TokenizedPair],
                   **kwargs) -> dict[str, float]:
    """The preference metrics over `pairs` (pair-weighted means) and `num_pairs`; arguments as evaluate_totals."""
    totals = evaluate_totals(policy, reference, pairs, **kwargs)
    return {**totals.means(), "num_pairs": totals.num_pairs}


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]  # as sampled, ending at the first EOS (kept) or at max_new_tokens
    text: str  # the completion decoded without special tokens


def sample(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
) -> list[Sample]:
    """Sample `num_samples` completions per prompt, in prompt order. With the defaults (temperature 1, no top-k,
    top-p 1) the samples follow the model's own distribution, as a KL estimate needs. Deterministic for a given
    seed and batch size."""
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    sharded = sharded_model(model)
    if sharded:
        # peft's generate calls the inner model, past the root's FSDP hooks: gather the root's own weights
        # (embeddings, final norm, head) for the whole generation; the layers gather theirs in their forwards
        model.unshard()
    jobs = [(i, list(ids)) for i, ids in enumerate(prompt_ids) for _ in range(num_samples)]
    samples: list[Sample] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        width = max(len(ids) for _, ids in chunk)
        # left padding: every prompt ends at the same column, where generation starts
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, ids) in enumerate(chunk):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                # sharded weights (FSDP): every forward is a collective, so a process whose samples all ended
                # keeps running forwards until every process's have
                synced_gpus=sharded,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
        for row, (prompt_index, ids) in enumerate(chunk):
            completion = output[row, width:].tolist()
            if eos in completion:
                completion = completion[: completion.index(eos) + 1]
            text = tokenizer.decode(completion, skip_special_tokens=True)
            samples.append(Sample(prompt_index, ids, completion, text))
    torch.random.set_rng_state(generator_state)
    if sharded:
        model.reshard()
    model.train(was_training)
    return samples


def sequence_logps_of_samples(
    model: torch.nn.Module, samples: Sequence[Sample], pad_token_id: int, batch_size: int = 32
) -> torch.Tensor:
    """Summed log-prob of each sample's completion under `model`, shape (len(samples),)."""
    totals = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            rows = pad_rows([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk], pad_token_id)
            sums, _ = completion_logps(model, *rows)
            totals.append(sums.float())
    return torch.cat(totals)


@dataclass
class KLEstimate:
    mean: float  # estimated KL(policy || reference) per sequence, in nats
    stderr: float
    num_samples: int


def kl_from_samples(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> KLEstimate:
    """Monte-Carlo KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)], from samples of the policy."""
    ratios = (policy_logps - reference_logps).double()
    n = ratios.numel()
    stderr = ratios.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return KLEstimate(ratios.mean().item(), stderr, n)


def run_eval(config: Config) -> dict[str, float]:
    """`preftune eval`: the preference metrics of --model against --ref-model (default: itself) on --data."""
    from preftune.data import describe_skipped, load_pairs
    from preftune.models import load_model, load_tokenizer, resolve_model
    from preftune.reference import reference_source
    from preftune.tokenize import tokenize_pairs

    d, m = config.data, config.model
    loaded = load_pairs(d.data, split=d.split, skip_invalid=d.skip_invalid)
    if loaded.skipped:
        print(describe_skipped(loaded.skipped), file=sys.stderr)
    source = resolve_model(m.model, m.cache_dir)
    tokenizer = load_tokenizer(source, m.trust_remote_code)
    pairs, dropped = tokenize_pairs(loaded.pairs, tokenizer, d.max_length or None, d.truncation_mode)
    if dropped:
        print(f"dropped {dropped} pairs whose prompt alone fills max_length={d.max_length}", file=sys.stderr)
    if not pairs:
        raise UserError(f"no pairs left after truncation to max_length={d.max_length}")
    from preftune.runtime import make_accelerator

    accelerator = make_accelerator(m.bf16)
    policy = load_model(source, m.trust_remote_code, m.attn_implementation).to(accelerator.device)
    params = LossParams.from_config(config.loss)
    reference_model = policy
    if m.ref_model is not None:
        reference_model = load_model(resolve_model(m.ref_model, m.cache_dir), m.trust_remote_code,
                                     m.attn_implementation)
        reference_model.to(accelerator.device)
    with accelerator.autocast():
        return evaluate_pairs(
            policy,
            reference_source(policy, reference_model, params.length_split, params.reference_free),
            pairs,
            batch_size=config.train.eval_batch_size,
            pad_token_id=tokenizer.pad_token_id,
            params=params,
            device=accelerator.device,
            layout=config.train.batch_layout,
        )
