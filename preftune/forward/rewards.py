"""Ground-truth rewards: `reward(prompts, completion texts) -> one float per completion` (or None: cannot judge).

The prompts come as given (a string, or chat messages), because a reward model must read prompt and completion in
the form it was trained on (the chat template with its end of turn), as TRL's trainers format them for one. The
kinds, named by `--reward`: 'sentiment' (VADER's compound score, the default job's ground truth), 'accuracy' and
'format' (the arithmetic task's checker, forward/answers.py), 'module:function' (a Python callable, imported only
because the user named it: called as TRL's GRPOTrainer calls a reward function, `f(prompts=..., completions=...,
completion_ids=..., **columns)`, when its signature takes those keywords, else per sample as `f(prompt, completion)`
on texts), or a sequence-classification reward model (a folder or hub id). Several, comma-separated, are `Rewards`:
each completion's reward is their weighted sum (--reward-weights), as TRL combines its reward_funcs.

Every reward preftune calls is `checked`: one value per completion, each a finite real number, or None where the
reward cannot judge a completion (TRL's form for a reward function that does not apply to a sample), which the
training loops skip. Anything else (an exception, a wrong count, a string, NaN or infinity) is a `RewardError`
(exit 2) naming the reward, the prompt and the completion.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import statistics
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.config import parse_reward_list
from preftune.data.read import Text, prompt_text
from preftune.errors import UserError

RewardFunction = Callable[[Sequence[Text], Sequence[str]], list[float | None]]
Columns = Mapping[str, Sequence[Any]]  # the prompts file's other columns, one value per completion (TRL's kwargs)
# the names of the rewards built in, besides a reward model's folder and 'module:function'
BUILT_IN_REWARDS = ("sentiment", "accuracy", "format")


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
    spec) names it in the RewardError of a failure, `label` in the metrics (rewards/<label>/mean: a function's
    name, a reward model's folder name, as TRL names them; unset: `name`). `keywords`: `function` is called as
    TRL's GRPOTrainer calls a reward function, `function(prompts=..., completions=..., completion_ids=...,
    **columns)`, with completions as TRL gives them (chat prompts: `[{"role": "assistant", "content": text}]`);
    otherwise as `function(prompts, completion texts)`."""

    function: Callable[..., Any]
    name: str
    keywords: bool = False
    label: str | None = None

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None,
                 columns: Columns | None = None) -> list[float | None]:
        """One value or None per completion. `completion_ids` (the sampled token ids, EOS included) and `columns`
        (one value per completion each) are given to a keyword-form function and ignored by the others."""
        if not completions:
            return []
        try:
            if self.keywords:
                values = self.function(prompts=list(prompts), completions=trl_completions(prompts, completions),
                                       completion_ids=None if completion_ids is None else list(completion_ids),
                                       **{key: list(value) for key, value in (columns or {}).items()})
            else:
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


def trl_completions(prompts: Sequence[Text], completions: Sequence[str]) -> list:
    """The completions as TRL's GRPOTrainer gives them to a reward function: after a chat prompt, the assistant's
    message `[{"role": "assistant", "content": text}]`; after a text prompt, the text."""
    return [[{"role": "assistant", "content": c}] if isinstance(p, list) else c for p, c in zip(prompts, completions)]


def checked(function: Callable[..., Any], name: str) -> CheckedReward:
    """`function` checked on every call (a reward already checked is kept as it is)."""
    return function if isinstance(function, (CheckedReward, Rewards)) else CheckedReward(function, name)


def takes_keywords(function: Callable[..., Any]) -> bool:
    """Whether `function` is a reward function of TRL's form, called with keywords (it names `prompts`,
    `completions` or `completion_ids`, or takes **kwargs), rather than preftune's `f(prompt, completion)` on one
    sample's texts."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the two-argument form
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name in ("prompts", "completions", "completion_ids")
               for p in parameters)


def callable_name(function: Callable[..., Any]) -> str:
    """A function's name as TRL names its reward metrics (`get_callable_name`): a partial's function, a callable
    object's class."""
    while isinstance(function, functools.partial):
        function = function.func
    return getattr(function, "__name__", type(function).__name__)


def user_function(function: Callable[..., Any], name: str) -> CheckedReward:
    """A reward function a user wrote, checked: TRL's keyword form or the per-sample (prompt, completion) form,
    decided by its signature (`takes_keywords`)."""
    if takes_keywords(function):
        return CheckedReward(function, name, keywords=True, label=callable_name(function))
    return CheckedReward(per_sample(function, name), name, label=callable_name(function))


def weighted_sum(per_function: Sequence[Sequence[float | None]], weights: Sequence[float]) -> list[float | None]:
    """r = sum_i w_i r_i over the functions that judged the completion (TRL's nansum of the weighted rewards), None
    where none did (TRL's unscorable row). (F lists of N values, F weights) -> N values."""
    totals: list[float | None] = []
    for values in zip(*per_function):
        judged = [w * v for w, v in zip(weights, values) if v is not None]
        totals.append(math.fsum(judged) if judged else None)
    return totals


def judged_mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and standard deviation (n - 1, as TRL's nanstd) of the values that are not None: the logged
    rewards/<function>/mean and /std; 0 where there are none (one value: std 0)."""
    judged = [v for v in values if v is not None]
    if not judged:
        return 0.0, 0.0
    return statistics.fmean(judged), statistics.stdev(judged) if len(judged) > 1 else 0.0


@dataclass
class Rewards:
    """Several checked rewards with their weights (TRL's reward_funcs and reward_weights): a completion's reward is
    the weighted sum of the functions' values that are not None (`weighted_sum`), None where every function
    returned None. Called as one `CheckedReward` is; `each` gives every function's values."""

    functions: list[CheckedReward]
    weights: list[float] = field(default_factory=list)  # unset: 1 each

    def __post_init__(self) -> None:
        self.weights = list(self.weights) or [1.0] * len(self.functions)
        if len(self.weights) != len(self.functions):
            raise ValueError(f"{len(self.weights)} reward weights for {len(self.functions)} reward functions")

    @property
    def name(self) -> str:
        return ",".join(f.name for f in self.functions)

    @property
    def labels(self) -> list[str]:
        """The functions' metric names (rewards/<label>/mean), the second of a name as <label>_2 and so on."""
        labels: list[str] = []
        for f in self.functions:
            label, n = f.label, 1
            while label in labels:
                n += 1
                label = f"{f.label}_{n}"
            labels.append(label)
        return labels

    def each(self, prompts: Sequence[Text], completions: Sequence[str],
             completion_ids: Sequence[Sequence[int]] | None = None,
             columns: Columns | None = None) -> list[list[float | None]]:
        """Every function's values, (F lists of N)."""
        return [f(prompts, completions, completion_ids, columns) for f in self.functions]

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str],
                 completion_ids: Sequence[Sequence[int]] | None = None,
                 columns: Columns | None = None) -> list[float | None]:
        return weighted_sum(self.each(prompts, completions, completion_ids, columns), self.weights)


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


def load_rewards(spec: str, weights: str | None = None, device: torch.device | str = "cpu",
                 batch_size: int = 16) -> Rewards:
    """--reward (one spec, or several comma-separated) with --reward-weights, each `load_reward`."""
    try:
        specs, values = parse_reward_list(spec, weights)
    except ValueError as error:
        raise UserError(str(error)) from None
    return Rewards([load_reward(name, device, batch_size) for name in specs], values)


def load_reward(spec: str, device: torch.device | str = "cpu", batch_size: int = 16) -> CheckedReward:
    """'sentiment', 'accuracy', 'format', 'module:function', or a reward model (scoring `batch_size` completions
    per forward), `checked`; a bad spec is a UserError saying which it tried."""
    if spec == "sentiment":
        return CheckedReward(sentiment_reward(), spec)
    if spec in ("accuracy", "format"):
        from preftune.forward import answers

        return CheckedReward(getattr(answers, f"{spec}_reward"), spec, keywords=True)
    if ":" in spec and not Path(spec).exists():
        return user_function(imported_function(spec), spec)
    return CheckedReward(reward_model(spec, device, batch_size), spec, label=Path(spec.rstrip("/")).name)


def imported_function(spec: str) -> Callable[..., Any]:
    """The callable 'module:function' names (the module found beside the user's data too, as `python -m` would)."""
    module_name, _, function_name = spec.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"--reward {spec}: cannot import {function_name} from {module_name} ({error})") from None
    finally:
        sys.path.pop(0)


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
            f"--reward {name}: not 'sentiment', 'accuracy', 'format', 'module:function' or a loadable reward model "
            f"({error})"
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
