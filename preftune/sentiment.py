"""The default job: the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, sec. 6.1) in miniature.

1. Prompts: chat requests for a short review of an invented movie, built from templates and titles
   (training and held-out prompts use disjoint titles).
2. Pairs: two completions per prompt sampled from the reference model; the one with the higher ground-truth
   reward (VADER's compound sentiment score, from the `vaderSentiment` lexicon) is `chosen`. Cached.
3. DPO on those pairs with the ordinary trainer.
4. Report: on held-out prompts, the ground-truth reward of reference vs policy samples (mean and spread),
   held-out preference accuracy, and KL(policy || reference) estimated from the policy's samples.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.config import DEFAULT_JOB_OVERRIDES, Config, apply_unset
from preftune.errors import UserError
from preftune.measure import ModelPair, measure, paired_gain, summarize
from preftune.models import cache_root, load_model, load_tokenizer, resolve_model
from preftune.recipes import dpo
from preftune.rewards import SentimentReward, sentiment_reward
from preftune.rollout import sample

# Bump when prompts, sampling or labelling change, so stale cached pairs are not reused.
DATA_VERSION = 2
REPORT_FILE = "sentiment_report.json"

REQUESTS = (
    "Write a one-sentence review of the movie {title}.",
    "In one sentence, what did you think of {title}?",
    "Give me a short review of the film {title}.",
    "Describe the movie {title} in a sentence, as a critic would.",
    "What is your opinion of {title}? Answer in one sentence.",
    "Review the film {title} briefly.",
    "Tell me about the movie {title} in one or two sentences.",
    "Sum up your reaction to {title} in a sentence.",
)
TITLE_WORDS_A = (
    "Silent", "Crimson", "Last", "Broken", "Golden", "Midnight", "Hidden", "Frozen", "Electric", "Lonely",
    "Savage", "Distant", "Burning", "Paper", "Iron", "Velvet", "Wild", "Quiet", "Endless", "Glass",
)
TITLE_WORDS_B = (
    "Harbor", "Kingdom", "Summer", "Letters", "Highway", "Garden", "Empire", "Signal", "River", "Horizon",
    "Circus", "Orchard", "Station", "Promise", "Mirror", "Frontier", "Lantern", "Voyage", "Echo", "Tide",
)

Messages = list[dict[str, str]]


def make_prompts(count: int, seed: int, held_out: bool) -> list[Messages]:
    """`count` distinct review requests (one user message each); training and held-out prompts never share a
    title, so the held-out report measures what generalises."""
    titles = [f"The {a} {b}" for a in TITLE_WORDS_A for b in TITLE_WORDS_B]
    random.Random(1234).shuffle(titles)  # fixed: the train/held-out title split must not depend on --seed
    cut = len(titles) * 4 // 5
    titles = titles[cut:] if held_out else titles[:cut]
    requests = [request.format(title=f'"{title}"') for title in titles for request in REQUESTS]
    if count > len(requests):
        raise ValueError(f"at most {len(requests)} {'held-out' if held_out else 'training'} prompts available")
    return [[{"role": "user", "content": text}] for text in random.Random(seed + held_out).sample(requests, count)]


def prompt_token_ids(tokenizer, prompts: Sequence[Messages]) -> list[list[int]]:
    """The prompts as the model sees them at generation time: chat template plus the assistant header."""
    return [
        list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for p in prompts
    ]


def build_pairs(
    model: torch.nn.Module, tokenizer, prompts: Sequence[Messages], reward: SentimentReward, max_new_tokens: int,
    seed: int,
) -> tuple[list[dict], int]:
    """Two reference samples per prompt, labelled by the reward; ties (equal reward) are dropped."""
    prompt_ids = prompt_token_ids(tokenizer, prompts)
    samples = sample(model, tokenizer, prompt_ids, num_samples=2, max_new_tokens=max_new_tokens, seed=seed)
    records, ties = [], 0
    for i, prompt in enumerate(prompts):
        first, second = samples[2 * i], samples[2 * i + 1]
        score_first, score_second = reward(first.text), reward(second.text)
        texts = first.text.strip(), second.text.strip()
        if score_first == score_second or texts[0] == texts[1] or not all(texts):  # no preference to learn
            ties += 1
            continue
        chosen, rejected = (first, second) if score_first > score_second else (second, first)
        records.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen.text}],
            "rejected": [{"role": "assistant", "content": rejected.text}],
            "chosen_reward": max(score_first, score_second),
            "rejected_reward": min(score_first, score_second),
        })
    return records, ties


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    staging.replace(path)  # atomic: a killed run never leaves a half-written cache file


def preference_files(config: Config, source: str) -> tuple[Path, Path]:
    """The cached training and held-out pair files for these settings, sampled on first use."""
    job, seed, new_tokens = config.default_job, config.train.seed, config.sample.max_new_tokens
    key = json.dumps([DATA_VERSION, source, job.num_prompts, job.num_eval_prompts, new_tokens, seed])
    folder = cache_root(config.model.cache_dir) / "data" / f"sentiment-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    train_file, eval_file = folder / "train.jsonl", folder / "eval.jsonl"
    if train_file.is_file() and eval_file.is_file():
        print(f"using cached preference pairs in {folder}", flush=True)
        return train_file, eval_file
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tokenizer = load_tokenizer(source, config.model.trust_remote_code)
    model = load_model(source, config.model.trust_remote_code)
    reward = SentimentReward()
    for path, held_out, count in ((train_file, False, job.num_prompts), (eval_file, True, job.num_eval_prompts)):
        prompts = make_prompts(count, seed, held_out)
        records, ties = build_pairs(model, tokenizer, prompts, reward, new_tokens, seed + int(held_out))
        if not records:
            raise UserError("every sampled pair was a tie (equal rewards); raise --num-prompts")
        write_jsonl(path, records)
        print(f"sampled {len(records)} {'held-out' if held_out else 'training'} pairs "
              f"({ties} ties dropped) into {path}", flush=True)
    print(f"built the preference pairs in {time.time() - started:.0f} s", flush=True)
    return train_file, eval_file


def sentiment_report(models: ModelPair, tokenizer, config: Config, final_eval: dict | None) -> dict:
    """Held-out reward of reference vs policy samples, held-out preference accuracy, and the KL estimate. Standard
    errors take each prompt's samples as one cluster; the gain's pairs the two models by prompt
    (`measure.paired_gain`). The per-sample rewards (prompt-major) are kept in the report."""
    job = config.default_job
    per_prompt = job.samples_per_eval_prompt
    prompts = make_prompts(job.num_eval_prompts, config.train.seed, held_out=True)
    measured = measure(models, tokenizer, prompt_token_ids(tokenizer, prompts), num_samples=per_prompt,
                       max_new_tokens=config.sample.max_new_tokens, seed=config.train.seed + 7,
                       reward=sentiment_reward())
    policy_rewards, reference_rewards, kl = measured.policy_rewards, measured.reference_rewards, measured.kl
    gain = paired_gain(policy_rewards, reference_rewards, per_prompt)
    examples = [
        {"prompt": prompts[i][-1]["content"],
         "reference": measured.reference_samples[i * per_prompt].text,
         "policy": measured.policy_samples[i * per_prompt].text}
        for i in range(min(5, len(prompts)))
    ]
    final_eval = final_eval or {}
    return {
        "reward": "VADER compound sentiment of the completion, in [-1, 1]",
        "held_out_prompts": len(prompts),
        "samples_per_prompt": per_prompt,
        "reference_reward": summarize(reference_rewards, per_prompt),
        "policy_reward": summarize(policy_rewards, per_prompt),
        "reward_gain": gain["mean"],
        "reward_gain_stderr": gain["stderr"],  # paired by prompt, clustered by prompt
        "held_out_preference_accuracy": final_eval.get("rewards/accuracies"),
        "held_out_eval": final_eval,
        "kl_policy_reference": {"mean": kl.mean, "stderr": kl.stderr, "num_samples": kl.num_samples},
        "rewards": {"policy": policy_rewards, "reference": reference_rewards},
        "examples": examples,
    }


def prepare_default_job(config: Config, overrides: dict[str, Any] | None = None) -> tuple[str, Path, Path]:
    """Apply the default job's settings the user did not set (`overrides` on top: a command's own); build (or
    reuse) its pairs. Returns the model's source and the training and held-out pair files."""
    apply_unset(config, {**DEFAULT_JOB_OVERRIDES, **(overrides or {})})
    source = resolve_model(config.model.model, config.model.cache_dir)
    return source, *preference_files(config, source)


def run_default_job(config: Config) -> Path:
    """Build (or reuse) the sentiment pairs, train DPO on them, and write the before/after report."""
    started = time.time()
    source, train_file, eval_file = prepare_default_job(config)
    config.data.data, config.data.eval_data = str(train_file), str(eval_file)

    reports: list[dict] = []

    def report_held_out(run: dpo.PairRun) -> None:  # after the model is saved: the run's models are still held
        reports.append(sentiment_report(run.objective.models, run.tokenizer, config, run.final_eval))

    # report.md shows the ground truth beside the implicit reward
    result = dpo.run(config, hooks=dpo.Hooks(on_save=report_held_out), ground_truth=sentiment_reward())
    report = reports[0]
    report["total_seconds"] = round(time.time() - started, 1)
    (result.output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    ref, pol, kl = report["reference_reward"], report["policy_reward"], report["kl_policy_reference"]
    print(
        "\nDefault job (controlled sentiment, held-out prompts):\n"
        f"  reference reward  {ref['mean']:+.3f} (std {ref['std']:.3f}, positive {ref['positive_fraction']:.0%})\n"
        f"  policy reward     {pol['mean']:+.3f} (std {pol['std']:.3f}, positive {pol['positive_fraction']:.0%})\n"
        f"  reward gain       {report['reward_gain']:+.3f} +- {report['reward_gain_stderr']:.3f} (paired by prompt)\n"
        f"  held-out preference accuracy {report['held_out_preference_accuracy']:.3f}\n"
        f"  KL(policy || reference) {kl['mean']:.2f} +- {kl['stderr']:.2f} nats per completion\n"
        f"  report: {result.output_dir / REPORT_FILE}  ({report['total_seconds']:.0f} s in all)",
        flush=True,
    )
    return result.output_dir
