"""The verifiable task (`--task arithmetic`): short problems with an exactly checkable answer, generated in code.

Small-number arithmetic: additions and subtractions within 0..12 and the multiplication table to 10 x 10, each
fact asked in two wordings ("What is 7 + 5?", "What is 7 plus 5?"). Each prompt is one chat request asking for
the number alone; its `answer` column is the exact answer, which forward/answers.py's `accuracy_reward` checks (the
completion's final number) and `format_reward` rewards the form of (the number alone).

The difficulty is set for the default model: SmolLM2-135M-Instruct, sampling at temperature 1 as the online
recipes do, answers about a fifth of the held-out problems right (README, "A verifiable task"). Harder kinds were
measured first and left out: two-digit additions (~2%), counting the items of a list (~4%) and unit conversions
(~1%) leave too few correct samples to learn from.

Every fact (operation and operands) belongs to the training or the held-out set by its hash, whatever --seed and
the counts: the two never share a problem, nor a problem's arithmetic in another wording. --seed picks which
problems of each set a run uses and their order.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from preftune.config import DEFAULT_JOB_OVERRIDES, Config, apply_unset
from preftune.errors import UserError
from preftune.evaluation.measure import ModelPair, measure, paired_gain, summarize
from preftune.forward.answers import accuracy_reward
from preftune.forward.rewards import load_reward
from preftune.forward.rollout import sample
from preftune.models.load import cache_root, load_model, load_tokenizer, resolve_model
from preftune.tasks.sentiment import prompt_token_ids, write_jsonl

Messages = list[dict[str, str]]
Fact = tuple[str, int, int]  # (operation, a, b)
Problem = tuple[str, int]  # (question, answer)
Row = tuple[Messages, dict[str, str]]  # a prompt and its columns

INSTRUCTION = "Answer with the number only."
HELD_OUT_SHARE = 3  # one fact in 3 is held out (by hash)
# the task's settings unless the user sets them (on top of the default job's, for DPO and the online recipes): the
# length the calibration used, and held-out problems enough for an accuracy's standard error ~0.02
TASK_SETTINGS = {"sample.max_new_tokens": 16, "default_job.num_eval_prompts": 200}
# each operation's wordings: every fact is asked in each, and a fact's wordings are all training or all held out
WORDINGS = {
    "+": ("What is {a} + {b}?", "What is {a} plus {b}?", "How much is {a} + {b}?"),
    "-": ("What is {a} - {b}?", "What is {a} minus {b}?", "How much is {a} - {b}?"),
    "x": ("What is {a} x {b}?", "What is {a} times {b}?", "How much is {a} x {b}?"),
}


def facts() -> list[Fact]:
    """Additions of one-digit numbers, subtractions with a one-digit answer and subtrahend (a - b, b in 0..9), and
    the multiplication table to 10 x 10: 300 facts."""
    digits = range(10)
    return ([("+", a, b) for a in digits for b in digits]
            + [("-", a + b, b) for a in digits for b in digits]
            + [("x", a, b) for a in range(1, 11) for b in range(1, 11)])


def answer_of(fact: Fact) -> int:
    operation, a, b = fact
    return a + b if operation == "+" else a - b if operation == "-" else a * b


def is_held_out(fact: Fact) -> bool:
    """Whether a fact is held out: by a hash of the fact alone, so that the sets are disjoint for any seed (a
    held-out problem's arithmetic is never trained on, in any wording)."""
    return int(hashlib.sha256(repr(fact).encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def problem_pool(held_out: bool) -> list[Problem]:
    """Every problem of one set: each of its facts in each wording, in a fixed order."""
    return [(wording.format(a=fact[1], b=fact[2]), answer_of(fact)) for fact in facts()
            if is_held_out(fact) == held_out for wording in WORDINGS[fact[0]]]


def make_problems(count: int, seed: int, held_out: bool) -> list[Problem]:
    """`count` distinct problems of the training or the held-out set, drawn by `seed`."""
    pool = problem_pool(held_out)
    if count > len(pool):
        raise ValueError(f"at most {len(pool)} {'held-out' if held_out else 'training'} problems available")
    return random.Random(seed + int(held_out)).sample(pool, count)


def prompt_of(question: str) -> Messages:
    return [{"role": "user", "content": f"{question} {INSTRUCTION}"}]


def make_rows(count: int, seed: int, held_out: bool) -> list[Row]:
    """The prompts and their columns: (one user message, {"answer": the exact answer as text})."""
    return [(prompt_of(q), {"answer": str(a)}) for q, a in make_problems(count, seed, held_out)]


# --- DPO on the checker's pairs (`preftune train --task arithmetic`) ---

DATA_VERSION = 1  # bump when problems, sampling or labelling change, so stale cached pairs are not reused
REPORT_FILE = "arithmetic_report.json"
SAMPLES_PER_PAIR_PROMPT = 8  # reference samples per problem, among which a correct and a wrong answer are paired
EVAL_PAIR_PROMPTS = 64  # held-out problems whose pairs DPO's evaluation reads (the accuracy uses --num-eval-prompts)


def checked_pairs(rows: Sequence[Row], texts: Sequence[str], samples_per_prompt: int) -> tuple[list[dict], int]:
    """Preference pairs from `samples_per_prompt` completions of each problem (prompt-major `texts`), labelled by the
    checker: a problem with a correct and a wrong completion gives one pair, the first correct one chosen over the
    first wrong one (a problem whose samples are all correct or all wrong gives none). Returns (records, problems
    without a pair)."""
    records, unpaired = [], 0
    for i, (prompt, columns) in enumerate(rows):
        own = texts[i * samples_per_prompt:(i + 1) * samples_per_prompt]
        correct = accuracy_reward(own, [columns["answer"]] * len(own))
        right = [t for t, c in zip(own, correct) if c == 1.0 and t.strip()]
        wrong = [t for t, c in zip(own, correct) if c == 0.0 and t.strip()]
        if not right or not wrong:
            unpaired += 1
            continue
        records.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": right[0]}],
                        "rejected": [{"role": "assistant", "content": wrong[0]}], "answer": columns["answer"],
                        "correct_samples": len(right)})
    return records, unpaired


def pair_files(config: Config, source: str) -> tuple[Path, Path, dict[str, int]]:
    """The cached training and held-out pair files of the reference's own samples for these settings (sampled on
    first use), and the samples they cost."""
    job, seed, new_tokens = config.default_job, config.train.seed, config.sample.max_new_tokens
    key = json.dumps([DATA_VERSION, source, job.num_prompts, new_tokens, seed, SAMPLES_PER_PAIR_PROMPT])
    folder = cache_root(config.model.cache_dir) / "data" / f"arithmetic-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    train_file, eval_file = folder / "train.jsonl", folder / "eval.jsonl"
    counts = {"train_problems": job.num_prompts, "eval_pair_problems": EVAL_PAIR_PROMPTS,
              "samples_per_problem": SAMPLES_PER_PAIR_PROMPT,
              "completions_generated": (job.num_prompts + EVAL_PAIR_PROMPTS) * SAMPLES_PER_PAIR_PROMPT}
    if train_file.is_file() and eval_file.is_file():
        print(f"using cached checker-labelled pairs in {folder}", flush=True)
        return train_file, eval_file, counts
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(source, config.model.trust_remote_code)
    model = load_model(source, config.model.trust_remote_code)
    for path, held_out, count in ((train_file, False, job.num_prompts), (eval_file, True, EVAL_PAIR_PROMPTS)):
        rows = make_rows(count, seed, held_out)
        samples = sample(model, tokenizer, prompt_token_ids(tokenizer, [p for p, _ in rows]),
                         num_samples=SAMPLES_PER_PAIR_PROMPT, max_new_tokens=new_tokens, seed=seed + int(held_out))
        records, unpaired = checked_pairs(rows, [s.text for s in samples], SAMPLES_PER_PAIR_PROMPT)
        if not records:
            raise UserError("no problem had both a correct and a wrong reference sample; raise --num-prompts")
        write_jsonl(path, records)
        print(f"sampled {len(records)} {'held-out' if held_out else 'training'} checker-labelled pairs ({unpaired} "
              f"problems all right or all wrong) into {path}", flush=True)
    return train_file, eval_file, counts


def arithmetic_report(models: ModelPair, tokenizer, config: Config, final_eval: dict | None) -> dict:
    """Held-out accuracy (the mean of `accuracy_reward`) of reference and policy samples on the same problems and
    seeds, with standard errors clustered by problem, the paired gain, and KL(policy || reference)."""
    job = config.default_job
    per_prompt = job.samples_per_eval_prompt
    rows = make_rows(job.num_eval_prompts, config.train.seed, held_out=True)
    measured = measure(models, tokenizer, prompt_token_ids(tokenizer, [p for p, _ in rows]), num_samples=per_prompt,
                       max_new_tokens=config.sample.max_new_tokens, seed=config.train.seed + 7,
                       reward=load_reward("accuracy"), prompts=[p for p, _ in rows], columns=[c for _, c in rows])
    gain = paired_gain(measured.policy_rewards, measured.reference_rewards, per_prompt)
    kl = measured.kl
    return {
        "reward": "accuracy: the final number of the completion equals the problem's answer (1 or 0)",
        "held_out_prompts": len(rows),
        "samples_per_prompt": per_prompt,
        "reference_accuracy": summarize(measured.reference_rewards, per_prompt),
        "policy_accuracy": summarize(measured.policy_rewards, per_prompt),
        "accuracy_gain": gain["mean"],
        "accuracy_gain_stderr": gain["stderr"],
        "held_out_preference_accuracy": (final_eval or {}).get("rewards/accuracies"),
        "kl_policy_reference": {"mean": kl.mean, "stderr": kl.stderr, "num_samples": kl.num_samples},
        "rewards": {"policy": measured.policy_rewards, "reference": measured.reference_rewards},
        "examples": [{"prompt": rows[i][0][-1]["content"], "answer": rows[i][1]["answer"],
                      "reference": measured.reference_samples[i * per_prompt].text,
                      "policy": measured.policy_samples[i * per_prompt].text} for i in range(min(5, len(rows)))],
    }


def prepare_arithmetic_job(config: Config) -> tuple[str, Path, Path, dict[str, int]]:
    """Apply the arithmetic job's settings the user did not set; build (or reuse) its checker-labelled pairs.
    Returns the model's source, the training and held-out pair files and the samples they cost."""
    apply_unset(config, {**DEFAULT_JOB_OVERRIDES, **TASK_SETTINGS})
    source = resolve_model(config.model.model, config.model.cache_dir)
    return source, *pair_files(config, source)
