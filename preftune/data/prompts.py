"""The online recipes' prompts: each distinct prompt once, as given (the text or messages the reward reads) and as
the ids the policy continues. Where they come from (a prompts file, pairs, a task) is tasks/sources.py's."""

from __future__ import annotations

import json
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from preftune.data.read import Text, prompt_text
from preftune.data.tokenize import prompt_ids


@dataclass(frozen=True)
class Prompt:
    given: Text  # as given, a string or chat messages: what the reward is called with (a reward model needs the form)
    ids: list[int]  # what the policy continues (chat template with the generation prompt, or plain text)

    @property
    def text(self) -> str:  # shown in reports
        return prompt_text(self.given)


def distinct_texts(texts: list[Text]) -> list[Text]:
    """Each distinct prompt once, in order (known before the tokenizer loads)."""
    seen: dict[str, Text] = {}
    for text in texts:
        seen.setdefault(json.dumps(text), text)
    return list(seen.values())


def distinct_prompts(texts: list[Text], tokenizer: PreTrainedTokenizerBase) -> list[Prompt]:
    """Each distinct prompt once, in order, with the ids the policy continues."""
    return [Prompt(text, prompt_ids(text, tokenizer)) for text in distinct_texts(texts)]
