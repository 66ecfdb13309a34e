"""The arithmetic task's checker (tasks/arithmetic.py): rewards of TRL's form, `f(completions, answer, **kwargs)`,
one value per completion, usable as `--reward accuracy` and `--reward format` or imported by a user's own code.

- `accuracy_reward`: 1.0 when the completion's final number equals the `answer` column's, 0.0 otherwise (no
  number at all included), None where the answer itself is not a number (cannot judge, as TRL's accuracy_reward);
- `format_reward`: 1.0 when the completion is the number alone (as the prompts ask), 0.0 otherwise.

Completions come as TRL gives them: a text, or (after a chat prompt) `[{"role": "assistant", "content": text}]`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # the comma of 1,000 (not that of "3,4")
ONLY_A_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\.?\s*")


def completion_text(completion: Any) -> str:
    """The text of a completion: itself, or the content of its (last) message."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"])


def final_number(text: str) -> float | None:
    """The last number written in `text` (thousands separators allowed: '1,200' is 1200), None if it has none."""
    numbers = NUMBER.findall(THOUSANDS.sub("", text))
    return float(numbers[-1]) if numbers else None


def accuracy_reward(completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 where the completion's final number equals the answer, else 0.0; None where the answer is not a number.
    `answer`: the prompts' answer column, one per completion (TRL passes the dataset's columns as keyword lists)."""
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        expected = final_number(str(gold)) if gold is not None else None
        if expected is None:
            rewards.append(None)
            continue
        given = final_number(completion_text(completion))
        rewards.append(1.0 if given is not None and abs(given - expected) < 1e-9 else 0.0)
    return rewards


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 where the completion is a number alone (an optional final period and spaces allowed), else 0.0."""
    return [1.0 if ONLY_A_NUMBER.fullmatch(completion_text(c)) else 0.0 for c in completions]
