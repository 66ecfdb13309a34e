"""The online recipes' prompts: each distinct prompt once, as given (the text or messages the reward reads), as
the ids the policy continues, and with its record's other columns (a reference answer, ...) that the reward
functions receive as TRL gives them. Where they come from (a prompts file, pairs, a task) is tasks/sources.py's."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from preftune.data.read import Text, prompt_text
from preftune.data.tokenize import prompt_ids


@dataclass(frozen=True)
class Prompt:
    given: Text  # as given, a string or chat messages: what the reward is called with (a reward model needs the form)
    ids: list[int]  # what the policy continues (chat template with the generation prompt, or plain text)
    columns: dict[str, Any] = field(default_factory=dict)  # the record's other columns: the reward's keywords

    @property
    def text(self) -> str:  # shown in reports
        return prompt_text(self.given)


@dataclass(frozen=True)
class PromptRow:
    """A prompt before tokenizing: as given, with its record's other columns."""

    prompt: Text
    columns: dict[str, Any] = field(default_factory=dict)


def as_row(item: PromptRow | Text) -> PromptRow:
    return item if isinstance(item, PromptRow) else PromptRow(item)


def distinct_texts(items: Sequence[PromptRow | Text]) -> list[PromptRow]:
    """Each distinct prompt (with its columns) once, in order (known before the tokenizer loads)."""
    seen: dict[str, PromptRow] = {}
    for row in map(as_row, items):
        seen.setdefault(json.dumps([row.prompt, row.columns], sort_keys=True, default=str), row)
    return list(seen.values())


def distinct_prompts(items: Sequence[PromptRow | Text], tokenizer: PreTrainedTokenizerBase) -> list[Prompt]:
    """Each distinct prompt once, in order, with the ids the policy continues and its columns."""
    return [Prompt(row.prompt, prompt_ids(row.prompt, tokenizer), row.columns) for row in distinct_texts(items)]


def columns_of(prompts: Sequence[Prompt], indices: Sequence[int]) -> dict[str, list[Any]]:
    """The columns of prompts[i] for each i of `indices` (one completion each), as TRL gives a reward function the
    dataset's other columns: {name: one value per completion}; a column some prompts lack is None for them."""
    names: dict[str, None] = {}
    for i in indices:
        names.update(dict.fromkeys(prompts[i].columns))
    return {name: [prompts[i].columns.get(name) for i in indices] for name in names}

