"""Where the online recipes' prompts come from: a prompts file, the prompts of preference pairs, or the default job's
review requests; each distinct prompt once, as the text the reward reads and the ids the policy continues."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from preftune.config import Config, apply_unset
from preftune.data import Text, load_and_report, load_prompts, prompt_text
from preftune.tokenize import prompt_ids


@dataclass(frozen=True)
class Prompt:
    given: Text  # as given, a string or chat messages: what the reward is called with (a reward model needs the form)
    ids: list[int]  # what the policy continues (chat template with the generation prompt, or plain text)

    @property
    def text(self) -> str:  # shown in reports
        return prompt_text(self.given)


# What the online recipes use on the default job's prompts unless the user sets it (the library defaults suit large
# prompt sets; these move SmolLM2-135M in ~30 rollouts on 2 CPU cores).
DEFAULT_JOB_OVERRIDES: dict[str, Any] = {
    "train.learning_rate": 1e-5,
    "train.warmup_ratio": 0.0,
    "sample.max_new_tokens": 24,
    "sample.eval_reward": "sentiment",  # the ground truth, also when --reward is a reward model fit to its pairs
}


def prompt_sources(config: Config) -> tuple[list[Text], list[Text]]:
    """The training and held-out prompts as texts or message lists: --prompts, else the prompts of --data's pairs,
    else the default job's review requests (and its held-out ones); held-out: --eval-data's prompts. Read and
    checked before anything else loads."""
    c = config
    held_out: list[Text] = []
    if c.sample.prompts is not None:
        train = [record.prompt for record in load_prompts(c.sample.prompts)]
    elif c.data.data is not None:
        train = [pair.prompt for pair in load_and_report(c.data.data, split=c.data.split,
                                                          skip_invalid=c.data.skip_invalid, name="train_data").pairs]
    else:
        from preftune.sentiment import make_prompts

        apply_unset(c, DEFAULT_JOB_OVERRIDES)
        train = make_prompts(c.default_job.num_prompts, c.train.seed, held_out=False)
        held_out = make_prompts(c.default_job.num_eval_prompts, c.train.seed, held_out=True)
    if c.data.eval_data is not None:
        held_out = [pair.prompt for pair in load_and_report(c.data.eval_data, split=c.data.eval_split,
                                                             skip_invalid=c.data.skip_invalid, name="eval_data").pairs]
    return train, held_out


def distinct_texts(texts: list[Text]) -> list[Text]:
    """Each distinct prompt once, in order (known before the tokenizer loads)."""
    seen: dict[str, Text] = {}
    for text in texts:
        seen.setdefault(json.dumps(text), text)
    return list(seen.values())


def distinct_prompts(texts: list[Text], tokenizer: PreTrainedTokenizerBase) -> list[Prompt]:
    """Each distinct prompt once, in order, with the ids the policy continues."""
    return [Prompt(text, prompt_ids(text, tokenizer)) for text in distinct_texts(texts)]
