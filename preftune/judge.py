"""`preftune judge` and `preftune generate`: sampling, ground-truth rewards, win rates and KL.

Win rate of the policy over the reference: each prompt is sampled from both (same seed, same count), each
sample scored by a ground-truth reward, and sample i of the policy compared with sample i of the reference:
a win counts 1, a tie 1/2. The 95% interval is the normal approximation, mean +- 1.96 * s / sqrt(n), with s the
sample standard deviation of those outcomes. KL(policy || reference) is estimated from the policy's own samples.
"""

from __future__ import annotations

import importlib
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.config import Config
from preftune.data import Text, load_prompts
from preftune.errors import UserError
from preftune.evaluate import kl_from_samples, sample, sequence_logps_of_samples
from preftune.models import load_for_inference
from preftune.runtime import make_accelerator
from preftune.tokenize import prompt_ids

# reward(prompt texts, completion texts) -> one float per completion
RewardFunction = Callable[[Sequence[str], Sequence[str]], list[float]]


def prompt_text(prompt: Text) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def load_reward(spec: str, device: torch.device | str = "cpu") -> RewardFunction:
    """'sentiment', 'module:function' (imported only now, because the user named it), or a reward model."""
    if spec == "sentiment":
        from preftune.sentiment import SentimentReward

        vader = SentimentReward()
        return lambda prompts, completions: [vader(c) for c in completions]
    if ":" in spec and not Path(spec).exists():
        module_name, _, function_name = spec.partition(":")
        sys.path.insert(0, str(Path.cwd()))  # a module beside the user's data, as `python -m` would find it
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as error:
            raise UserError(f"--reward {spec}: cannot import {function_name} from {module_name} ({error})") from None
        finally:
            sys.path.pop(0)
        return lambda prompts, completions: [float(function(p, c)) for p, c in zip(prompts, completions)]
    return reward_model(spec, device)


def reward_model(name: str, device: torch.device | str) -> RewardFunction:
    """A sequence-classification reward model: its single logit, or with several labels the log-probability of
    the last label (the 'positive' one by convention)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
    except OSError as error:
        raise UserError(
            f"--reward {name}: not 'sentiment', 'module:function' or a loadable reward model ({error})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def score(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        results: list[float] = []
        for start in range(0, len(prompts), 16):
            batch = tokenizer([p + c for p, c in zip(prompts[start:start + 16], completions[start:start + 16])],
                              return_tensors="pt", padding=True, truncation=True).to(device)
            with torch.no_grad():
                logits = model(**batch).logits.float()
            values = logits[:, 0] if logits.shape[-1] == 1 else torch.log_softmax(logits, -1)[:, -1]
            results += values.tolist()
        return results

    return score


@dataclass
class WinRate:
    rate: float  # wins + ties / 2, over comparisons
    low: float  # 95% interval, clipped to [0, 1]
    high: float
    wins: int
    ties: int
    losses: int


def win_rate(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> WinRate:
    """Pairwise comparison of sample i of the policy with sample i of the reference; ties count half."""
    outcomes = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_rewards, reference_rewards,
                                                                        strict=True)]
    n = len(outcomes)
    rate = statistics.fmean(outcomes)
    half_width = 1.96 * statistics.stdev(outcomes) / math.sqrt(n) if n > 1 else float("nan")
    return WinRate(rate, max(0.0, rate - half_width), min(1.0, rate + half_width), outcomes.count(1.0),
                   outcomes.count(0.5), outcomes.count(0.0))


def run_generate(config: Config) -> list[dict]:
    """`preftune generate`: samples from --model for every prompt of --prompts, as records."""
    s = config.sample
    accelerator = make_accelerator(config.model.bf16)
    policy, _, tokenizer = load_for_inference(config.model, accelerator.device, with_reference=False)
    prompts = load_prompts(s.prompts)
    with accelerator.autocast():
        samples = sample(policy, tokenizer, [prompt_ids(p.prompt, tokenizer) for p in prompts],
                         num_samples=s.num_samples, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                         top_p=s.top_p, batch_size=config.train.eval_batch_size, seed=config.train.seed)
    return [{"location": prompts[x.prompt_index].location, "prompt": prompts[x.prompt_index].prompt,
             "sample_index": i % s.num_samples, "completion": x.text} for i, x in enumerate(samples)]


def run_judge(config: Config) -> tuple[dict, list[dict]]:
    """`preftune judge`: win rate of --model over --ref-model under --reward, and KL(policy || reference)."""
    s = config.sample
    if s.temperature != 1.0 or s.top_p != 1.0:
        raise UserError("judge samples from the models' own distributions (its KL estimate needs them): "
                        "leave --temperature and --top-p at 1")
    accelerator = make_accelerator(config.model.bf16)
    reward = load_reward(s.reward, accelerator.device)  # before the models: a bad --reward fails fast
    policy, reference, tokenizer = load_for_inference(config.model, accelerator.device)
    prompts = load_prompts(s.prompts)
    ids = [prompt_ids(p.prompt, tokenizer) for p in prompts]
    settings = dict(num_samples=s.num_samples, max_new_tokens=s.max_new_tokens,
                    batch_size=config.train.eval_batch_size, seed=config.train.seed)
    with accelerator.autocast():
        policy_samples = sample(policy, tokenizer, ids, **settings)
        reference_samples = sample(reference, tokenizer, ids, **settings)
        kl = kl_from_samples(sequence_logps_of_samples(policy, policy_samples, tokenizer.pad_token_id),
                             sequence_logps_of_samples(reference, policy_samples, tokenizer.pad_token_id))
    texts = [prompt_text(prompts[x.prompt_index].prompt) for x in policy_samples]
    policy_rewards = reward(texts, [x.text for x in policy_samples])
    reference_rewards = reward(texts, [x.text for x in reference_samples])
    result = win_rate(policy_rewards, reference_rewards)
    summary = {
        "win_rate": result.rate, "win_rate_95ci": [result.low, result.high], "wins": result.wins,
        "ties": result.ties, "losses": result.losses, "comparisons": len(policy_rewards),
        "policy_reward_mean": statistics.fmean(policy_rewards),
        "reference_reward_mean": statistics.fmean(reference_rewards),
        "kl_policy_reference": kl.mean, "kl_stderr": kl.stderr, "reward": s.reward,
    }
    records = [{"location": prompts[p.prompt_index].location, "sample_index": i % s.num_samples,
                "policy": p.text, "reference": r.text, "policy_reward": pr, "reference_reward": rr}
               for i, (p, r, pr, rr) in enumerate(zip(policy_samples, reference_samples, policy_rewards,
                                                      reference_rewards))]
    return summary, records
