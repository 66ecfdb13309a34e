"""Ground-truth rewards: `reward(prompts, completion texts) -> one float per completion` (or None: cannot judge).

The prompts come as given (a string, or chat messages), because a reward model must read prompt and completion in
the form it was trained on (the chat template with its end of turn), as TRL's trainers format them for one. Three
kinds, named by `--reward`: 'sentiment' (VADER's compound score, the default job's ground truth), 'module:function'
(a Python callable taking (prompt, completion) texts, imported only because the user named it), or a
sequence-classification reward model (a folder or hub id).

Every reward preftune calls is `checked`: one value per completion, each a finite real number, or None where the
reward cannot judge a completion (TRL's form for a reward function that does not apply to a sample), which the
training loops skip. Anything else (an exception, a wrong count, a string, NaN or infinity) is a `RewardError`
(exit 2) naming the reward, the prompt and the completion.
"""

from __future__ import annotations

import importlib
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from preftune.data.read import Text, prompt_text
from preftune.errors import UserError

RewardFunction = Callable[[Sequence[Text], Sequence[str]], list[float | None]]


class RewardError(UserError):
    """A reward that failed on a completion (raised, or gave something other than a finite number or None)."""


def shown(text: Text, limit: int = 300) -> str:
    """A prompt or completion as a message quotes it: repr, cut to `limit` characters."""
    quoted = repr(prompt_text(text) if isinstance(text, list) else text)
    return quoted if len(quoted) <= limit else quoted[:limit] + "...'"


def reward_error(name: str, problem: str, prompt: Text, completion: str, error: BaseException | None = None,
                 ) -> RewardError:
    """The RewardError of reward `name` on (prompt, completion); `error`: what the reward raised, whose traceback
    (the reward's own frames) follows the message."""
    message = (f"the reward {name} {problem}\n  prompt: {shown(prompt)}\n  completion: {shown(completion)}\n"
               "A reward gives one finite number per completion, or None where it cannot judge one (skipped).")
    if error is not None:
        frames = traceback.format_exception(type(error), error, error.__traceback__.tb_next)
        message += "\n\nThe reward's traceback:\n" + "".join(frames).rstrip()
    return RewardError(message)


def reward_value(value: object, name: str, prompt: Text, completion: str) -> float | None:
    """One reward value as a float (None stays None: cannot judge); a RewardError for anything but a finite real
    number (a one-element tensor or array counts as its number)."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) and callable(getattr(value, "item", None)):
        try:
            value = value.item()  # a one-element tensor or array
        except (ValueError, RuntimeError):
            pass
    if not isinstance(value, numbers.Real):
        raise reward_error(name, f"returned {type(value).__name__} {value!r}, not a number", prompt, completion)
    if not math.isfinite(float(value)):
        raise reward_error(name, f"returned {float(value)}", prompt, completion)
    return float(value)


@dataclass
class CheckedReward:
    """`function` whose every call is checked (one finite number or None per completion); `name` (the --reward
    spec) names it in the RewardError of a failure."""

    function: RewardFunction
    name: str

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float | None]:
        if not completions:
            return []
        try:
            values = self.function(prompts, completions)
        except RewardError:
            raise
        except Exception as error:
            raise reward_error(self.name, f"raised {type(error).__name__} on a batch of {len(completions)} "
                               "completions, the first:", prompts[0], completions[0], error) from None
        values = list(values) if isinstance(values, (list, tuple)) else values
        if not isinstance(values, list) or len(values) != len(completions):
            count = f"a list of {len(values)}" if isinstance(values, list) else f"a {type(values).__name__}"
            raise reward_error(self.name, f"returned {count} for {len(completions)} completions, the first:",
                               prompts[0], completions[0])
        return [reward_value(v, self.name, p, c) for v, p, c in zip(values, prompts, completions)]


def checked(function: RewardFunction, name: str) -> CheckedReward:
    """`function` checked on every call (a reward already checked is kept as it is)."""
    return function if isinstance(function, CheckedReward) else CheckedReward(function, name)


def all_judged(values: Sequence[float | None], reward: Callable, prompts: Sequence[Text],
               completions: Sequence[str]) -> list[float]:
    """`values` of `reward` where every completion must be judged (a held-out measurement: leaving out the
    completions a reward cannot judge would compare means over different samples); a RewardError at the first
    None."""
    for value, prompt, completion in zip(values, prompts, completions):
        if value is None:
            raise reward_error(getattr(reward, "name", "given"), "returned None (cannot judge) in a held-out "
                               "measurement, whose means must cover every sample; give --eval-reward a reward that "
                               "judges every completion. On:", prompt, completion)
    return list(values)


def on_texts(function: Callable[[list[str], list[str]], list[float | None]]) -> RewardFunction:
    """A reward over (prompt texts, completion texts), taking prompts in any form."""
    return lambda prompts, completions: function([prompt_text(p) for p in prompts], list(completions))


def per_sample(function: Callable[[str, str], float | None], name: str) -> RewardFunction:
    """A reward of one (prompt text, completion) at a time, over a batch; an exception names its sample."""

    def call(prompts: Sequence[Text], completions: Sequence[str]) -> list[float | None]:
        values = []
        for prompt, completion in zip(prompts, completions):
            try:
                values.append(function(prompt_text(prompt), completion))
            except Exception as error:
                raise reward_error(name, f"raised {type(error).__name__}: {error}", prompt, completion,
                                   error) from None
        return values

    return call


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


def load_reward(spec: str, device: torch.device | str = "cpu", batch_size: int = 16) -> CheckedReward:
    """'sentiment', 'module:function', or a reward model (scoring `batch_size` completions per forward), `checked`;
    a bad spec is a UserError saying which it tried."""
    return checked(unchecked_reward(spec, device, batch_size), spec)


def unchecked_reward(spec: str, device: torch.device | str, batch_size: int = 16) -> RewardFunction:
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
        return per_sample(function, spec)
    return reward_model(spec, device, batch_size)


def padding_id(model_pad_id: int | None, rows: Sequence[Sequence[int]]) -> int:
    """The id to right-pad `rows` with so that a sequence-classification model reads each row where it reads the
    row alone. transformers reads a row at its last token that is not the config's pad id: with a pad id, that id
    (so a row ending in it, EOS when pad == EOS, is read as it is alone, before it); without one it reads a lone
    row's last token, so an id that ends none of the rows (one of 0..len(rows) is free)."""
    if model_pad_id is not None:
        return model_pad_id
    ends = {row[-1] for row in rows}
    return next(i for i in range(len(rows) + 1) if i not in ends)


def reward_model(name: str, device: torch.device | str, batch_size: int = 16) -> RewardFunction:
    """A sequence-classification reward model: its single logit, or with several labels the log-probability of
    the last label (the 'positive' one by convention). Prompt and completion are tokenized as `preftune
    reward-model` trained on them (`tokenize.tokenize_completion`: a chat prompt gets the completion as the
    assistant's turn, with the template's end of turn; a text prompt the completion and EOS), so a reward model
    scores a sample as it scored its training pairs. Each row is read where the model reads it alone, whatever
    else is in its batch (`padding_id`): its config's pad id decides, not the tokenizer's (a hub model may have
    none, or one the tokenizer lacks). `batch_size` completions per forward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from preftune.data.batching import pad_rows
    from preftune.data.tokenize import tokenize_completion

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
    except OSError as error:
        raise UserError(
            f"--reward {name}: not 'sentiment', 'module:function' or a loadable reward model ({error})"
        ) from None
    text_config = model.config.get_text_config()
    model_pad_id = text_config.pad_token_id

    def score(prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        results: list[float] = []
        for start in range(0, len(prompts), batch_size):
            split = [tokenize_completion(p, c if isinstance(p, str) else [{"role": "assistant", "content": c}],
                                         tokenizer)
                     for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
            text_config.pad_token_id = pad = padding_id(model_pad_id, [s[0] + s[1] for s in split])
            input_ids, attention_mask, _ = pad_rows([s[0] for s in split], [s[1] for s in split], pad)
            with torch.no_grad():
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
            values = logits[:, 0] if logits.shape[-1] == 1 else torch.log_softmax(logits, -1)[:, -1]
            results += values.tolist()
        return results

    return score
