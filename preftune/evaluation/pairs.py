"""Preference metrics and implicit rewards of a model pair on pairs or candidate responses, without gradients.

`evaluate_totals` runs exactly the forward and loss of a training step, so its rewards are the training rewards.
`score_pairs` and `score_candidates` give each response its implicit reward r(x, y) = beta * log(pi / pi_ref)
(`preftune score`); candidates also get their rank among their prompt's (best-of-N reranking).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from preftune.data.batching import Batch, collate_padded, iterate_batches, pad_rows
from preftune.data.read import PreferencePair, PromptRecord
from preftune.data.tokenize import TokenizedPair, tokenize_completion
from preftune.evaluation.measure import implicit_reward
from preftune.forward.logprobs import completion_logps, sequence_logps
from preftune.forward.reference import ReferenceSource
from preftune.objectives.losses import LossParams, compute_loss
from preftune.objectives.metrics import MetricTotals, pair_sums


def batch_totals(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    score: Callable[[Batch], dict[str, float]],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device | str = "cpu",
    layout: str = "padded",
    lockstep: tuple[int, TokenizedPair] | None = None,
) -> MetricTotals:
    """`score(batch)` (per-pair metric sums) added over `pairs`, without gradients, `model` in eval mode.

    `lockstep=(batches, filler)`: run exactly `batches` forwards, the ones past `pairs`' own on `filler` alone and
    not counted. Under FSDP every forward is a collective, so processes with shares of unequal length must run
    the same number of them.
    """
    was_training = model.training
    model.eval()
    totals = MetricTotals()
    batches = list(iterate_batches(pairs, batch_size, pad_token_id, layout=layout))
    counted = len(batches)
    if lockstep is not None:
        wanted, filler = lockstep
        batches += [collate_padded([filler], pad_token_id)] * (wanted - counted)
    with torch.no_grad():
        for position, batch in enumerate(batches):
            sums = score(batch.to(device))
            if position < counted:
                totals.add(sums, batch.num_pairs)
    model.train(was_training)
    return totals


def evaluate_totals(
    policy: torch.nn.Module,
    reference: ReferenceSource,
    pairs: Sequence[TokenizedPair],
    *,
    params: LossParams,
    **batching,
) -> MetricTotals:
    """Per-pair sums of the TRL-named preference metrics over `pairs`: the training step's forward and loss,
    without gradients (batching arguments as `batch_totals`)."""

    def score(batch: Batch) -> dict[str, float]:
        policy_logps = sequence_logps(policy, batch, params.length_split, params.use_weighting)
        return pair_sums(compute_loss(policy_logps, reference(batch), params), policy_logps)

    return batch_totals(policy, pairs, score, **batching)


def evaluate_pairs(policy: torch.nn.Module, reference: ReferenceSource, pairs: Sequence[TokenizedPair],
                   **kwargs) -> dict[str, float]:
    """The preference metrics over `pairs` (pair-weighted means) and `num_pairs`; arguments as evaluate_totals."""
    totals = evaluate_totals(policy, reference, pairs, **kwargs)
    return {**totals.means(), "num_pairs": totals.num_pairs}


def score_pairs(
    policy: torch.nn.Module, reference: torch.nn.Module, pairs: Sequence[PreferencePair],
    tokenized: Sequence[TokenizedPair], *, beta: float, batch_size: int, pad_token_id: int,
    device: torch.device | str,
) -> list[dict]:
    """One record per tokenized pair (`pairs`: the loaded pairs its indices point into): the implicit rewards of
    chosen and rejected, their margin and the four log-probs, through the training log-prob path."""
    records = []
    with torch.no_grad():
        for batch in iterate_batches(tokenized, batch_size, pad_token_id):
            batch = batch.to(device)
            ours, theirs = sequence_logps(policy, batch), sequence_logps(reference, batch)
            chosen_rewards = implicit_reward(ours.chosen, theirs.chosen, beta)
            rejected_rewards = implicit_reward(ours.rejected, theirs.rejected, beta)
            for i, index in enumerate(batch.pair_indices):
                pair = pairs[index]
                chosen, rejected = chosen_rewards[i], rejected_rewards[i]
                records.append({
                    "source": pair.source, "location": pair.location, "chosen_reward": chosen,
                    "rejected_reward": rejected, "margin": chosen - rejected,
                    "policy_logp_chosen": ours.chosen[i].item(), "policy_logp_rejected": ours.rejected[i].item(),
                    "reference_logp_chosen": theirs.chosen[i].item(),
                    "reference_logp_rejected": theirs.rejected[i].item(),
                })
    return records


def score_candidates(
    policy: torch.nn.Module, reference: torch.nn.Module, tokenizer, prompts: Sequence[PromptRecord], *, beta: float,
    batch_size: int, device: torch.device | str,
) -> list[dict]:
    """One record per candidate response: its implicit reward, both log-probs, and its rank among its prompt's
    candidates (1: the one best-of-N reranking by the implicit reward picks)."""
    rows = [(p, j, *tokenize_completion(p.prompt, response, tokenizer, source=p.source, location=p.location,
                                        field=f"responses[{j}]"))
            for p in prompts for j, response in enumerate(p.responses)]
    rewards: list[tuple[float, float, float]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            tensors = [t.to(device) for t in pad_rows([r[2] for r in chunk], [r[3] for r in chunk],
                                                      tokenizer.pad_token_id)]
            ours, _ = completion_logps(policy, *tensors)
            theirs, _ = completion_logps(reference, *tensors)
            rewards += zip(implicit_reward(ours, theirs, beta), ours.tolist(), theirs.tolist())
    records = []
    for (prompt, index, *_), (reward, ours, theirs) in zip(rows, rewards):
        records.append({"source": prompt.source, "location": prompt.location, "response_index": index,
                        "reward": reward, "policy_logp": ours, "reference_logp": theirs})
    by_prompt: dict[str, list[dict]] = {}
    for record in records:
        by_prompt.setdefault(record["location"], []).append(record)
    for candidates in by_prompt.values():
        for rank, record in enumerate(sorted(candidates, key=lambda r: -r["reward"]), start=1):
            record["rank"] = rank
    return records
