"""`preftune score`: the implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) of responses.

Two inputs: a preference file (`--data`), scored pair by pair through the training log-prob path, so a pair's
rewards are exactly the `rewards/*` that `preftune eval` averages; or a prompts file with N candidate responses
each (`--prompts`), where every candidate gets its reward and its rank among the prompt's candidates (best-of-N
reranking by the implicit reward).
"""

from __future__ import annotations

import sys

import torch

from preftune.batching import iterate_batches, pad_rows
from preftune.config import Config
from preftune.data import describe_skipped, load_pairs, load_prompts
from preftune.errors import UserError
from preftune.logprobs import completion_logps, sequence_logps
from preftune.models import load_for_inference
from preftune.runtime import make_accelerator
from preftune.tokenize import tokenize_completion, tokenize_pairs


def score_pairs(policy, reference, tokenizer, config: Config, device) -> list[dict]:
    d, beta = config.data, config.loss.beta
    loaded = load_pairs(d.data, split=d.split, skip_invalid=d.skip_invalid)
    if loaded.skipped:
        print(describe_skipped(loaded.skipped), file=sys.stderr)
    pairs, dropped = tokenize_pairs(loaded.pairs, tokenizer, d.max_length or None, d.truncation_mode)
    if dropped:
        print(f"dropped {dropped} pairs whose prompt alone fills max_length={d.max_length}", file=sys.stderr)
    records = []
    with torch.no_grad():
        for batch in iterate_batches(pairs, config.train.eval_batch_size, tokenizer.pad_token_id):
            batch = batch.to(device)
            ours, theirs = sequence_logps(policy, batch), sequence_logps(reference, batch)
            for i, index in enumerate(batch.pair_indices):
                pair = loaded.pairs[index]
                chosen = beta * (ours.chosen[i] - theirs.chosen[i]).item()
                rejected = beta * (ours.rejected[i] - theirs.rejected[i]).item()
                records.append({
                    "source": pair.source, "location": pair.location, "chosen_reward": chosen,
                    "rejected_reward": rejected, "margin": chosen - rejected,
                    "policy_logp_chosen": ours.chosen[i].item(), "policy_logp_rejected": ours.rejected[i].item(),
                    "reference_logp_chosen": theirs.chosen[i].item(),
                    "reference_logp_rejected": theirs.rejected[i].item(),
                })
    return records


def score_candidates(policy, reference, tokenizer, config: Config, device) -> list[dict]:
    prompts = load_prompts(config.sample.prompts, with_responses=True)
    rows = [(p, j, *tokenize_completion(p.prompt, response, tokenizer))
            for p in prompts for j, response in enumerate(p.responses)]
    rewards: list[tuple[float, float, float]] = []
    size = config.train.eval_batch_size
    with torch.no_grad():
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            tensors = [t.to(device) for t in pad_rows([r[2] for r in chunk], [r[3] for r in chunk],
                                                      tokenizer.pad_token_id)]
            ours, _ = completion_logps(policy, *tensors)
            theirs, _ = completion_logps(reference, *tensors)
            rewards += [(config.loss.beta * (o - t).item(), o.item(), t.item()) for o, t in zip(ours, theirs)]
    records = []
    for (prompt, index, *_), (reward, ours, theirs) in zip(rows, rewards):
        records.append({"source": prompt.source, "location": prompt.location, "response_index": index,
                        "reward": reward, "policy_logp": ours, "reference_logp": theirs})
    by_prompt: dict[str, list[dict]] = {}
    for record in records:
        by_prompt.setdefault(record["location"], []).append(record)
    for candidates in by_prompt.values():  # rank 1: the candidate best-of-N reranking would pick
        for rank, record in enumerate(sorted(candidates, key=lambda r: -r["reward"]), start=1):
            record["rank"] = rank
    return records


def run_score(config: Config) -> list[dict]:
    if (config.data.data is None) == (config.sample.prompts is None):
        raise UserError("preftune score needs exactly one of --data (preference pairs) or --prompts (prompts with "
                        "candidate responses)")
    accelerator = make_accelerator(config.model.bf16)
    policy, reference, tokenizer = load_for_inference(config.model, accelerator.device)
    with accelerator.autocast():
        if config.data.data is not None:
            return score_pairs(policy, reference, tokenizer, config, accelerator.device)
        return score_candidates(policy, reference, tokenizer, config, accelerator.device)
