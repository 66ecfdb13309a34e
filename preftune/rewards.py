"""Ground-truth rewards: `reward(prompt texts, completion texts) -> one float per completion`.

Three kinds, named by `--reward`: 'sentiment' (VADER's compound score, the default job's ground truth),
'module:function' (a Python callable taking (prompt, completion) texts, imported only because the user named it),
or a sequence-classification reward model (a folder or hub id).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from preftune.errors import UserError

RewardFunction = Callable[[Sequence[str], Sequence[str]], list[float]]


class SentimentReward:
    """VADER's compound sentiment of a completion, in [-1, 1]."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, text: str) -> float:
        return float(self.analyzer.polarity_scores(text)["compound"])


def sentiment_reward() -> RewardFunction:
    vader = SentimentReward()
    return lambda prompts, completions: [vader(c) for c in completions]


def load_reward(spec: str, device: torch.device | str = "cpu") -> RewardFunction:
    """'sentiment', 'module:function', or a reward model; a bad spec is a UserError saying which it tried."""
    if spec == "sentiment":
        return sentiment_reward()
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
