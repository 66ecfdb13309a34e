"""Ground-truth rewards: `reward(prompts, completion texts) -> one float per completion`.

The prompts come as given (a string, or chat messages), because a reward model must read prompt and completion in
the form it was trained on (the chat template with its end of turn), as TRL's trainers format them for one. Three
kinds, named by `--reward`: 'sentiment' (VADER's compound score, the default job's ground truth), 'module:function'
(a Python callable taking (prompt, completion) texts, imported only because the user named it), or a
sequence-classification reward model (a folder or hub id).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from preftune.data import Text, prompt_text
from preftune.errors import UserError

RewardFunction = Callable[[Sequence[Text], Sequence[str]], list[float]]


def on_texts(function: Callable[[list[str], list[str]], list[float]]) -> RewardFunction:
    """A reward over (prompt texts, completion texts), taking prompts in any form."""
    return lambda prompts, completions: [float(x) for x in function([prompt_text(p) for p in prompts],
                                                                     list(completions))]


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


def load_reward(spec: str, device: torch.device | str = "cpu", batch_size: int = 16) -> RewardFunction:
    """'sentiment', 'module:function', or a reward model (scoring `batch_size` completions per forward); a bad spec
    is a UserError saying which it tried."""
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
        return on_texts(lambda prompts, completions: [function(p, c) for p, c in zip(prompts, completions)])
    return reward_model(spec, device, batch_size)


def reward_model(name: str, device: torch.device | str, batch_size: int = 16) -> RewardFunction:
    """A sequence-classification reward model: its single logit, or with several labels the log-probability of
    the last label (the 'positive' one by convention). Prompt and completion are tokenized as `preftune
    reward-model` trained on them (`tokenize.tokenize_completion`: a chat prompt gets the completion as the
    assistant's turn, with the template's end of turn; a text prompt the completion and EOS), so a reward model
    scores a sample as it scored its training pairs. `batch_size` completions per forward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from preftune.batching import pad_rows
    from preftune.tokenize import tokenize_completion

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
    except OSError as error:
        raise UserError(
            f"--reward {name}: not 'sentiment', 'module:function' or a loadable reward model ({error})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def score(prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        results: list[float] = []
        for start in range(0, len(prompts), batch_size):
            split = [tokenize_completion(p, c if isinstance(p, str) else [{"role": "assistant", "content": c}],
                                         tokenizer)
                     for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
            input_ids, attention_mask, _ = pad_rows([s[0] for s in split], [s[1] for s in split],
                                                    tokenizer.pad_token_id)
            with torch.no_grad():
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
            values = logits[:, 0] if logits.shape[-1] == 1 else torch.log_softmax(logits, -1)[:, -1]
            results += values.tolist()
        return results

    return score
