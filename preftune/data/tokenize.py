"""PreferencePair -> TokenizedPair: chat templates, EOS, the prompt/completion boundary, truncation.

The boundary is settled here and nowhere else, the way TRL 1.x settles it: prompt and prompt+completion are
tokenized separately, and the completion starts where their ids diverge (a tokenizer may merge tokens across
the boundary, or a chat template may render the prompt differently alone). On the same pair our ids equal
TRL's DPOTrainer's.

An empty or whitespace-only completion gets the same treatment, so it is scored by the tokens that end a reply:
EOS after plain text, the chat template's end of turn after messages. One that gets no token at all (no EOS, or a
template that renders nothing for an empty turn) leaves nothing to score and is a `DataError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from preftune.data.read import common_prefix_length, print_flushed
from preftune.errors import DataError, UserError

if TYPE_CHECKING:
    from preftune.data.read import PreferencePair, Text


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair; `index` points back to the pair in the loaded list."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int


def _ids(tokenizer: PreTrainedTokenizerBase, text: Text, add_generation_prompt: bool = False) -> list[int]:
    if isinstance(text, list):
        rendered = tokenizer.apply_chat_template(
            text, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
        )
        return list(rendered["input_ids"])
    return list(tokenizer(text=text)["input_ids"])


def _split(
    prompt: Text, completions: Sequence[Text], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and each completion's ids: chat template for messages, EOS appended to plain-text completions,
    and the completion starting where the prompt's ids and every prompt+completion's diverge (as TRL)."""
    if isinstance(prompt, list):
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full = [_ids(tokenizer, prompt + completion) for completion in completions]
    else:
        eos = tokenizer.eos_token or ""  # without one nothing is appended; an empty completion is then caught below
        prompt_ids = _ids(tokenizer, prompt)
        full = [_ids(tokenizer, prompt + (c if c.endswith(eos) else c + eos)) for c in completions]
    boundary = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:boundary], [ids[boundary:] for ids in full]


def _check_scored(ids: list[int], prompt: Text, source: str, location: str | None, field: str | None) -> None:
    if ids:
        return
    ending = ("the chat template renders no token for it" if isinstance(prompt, list)
              else "the tokenizer has no EOS token to end it")
    raise DataError(source, location, field,
                    f"the completion tokenizes to no tokens, so there is nothing to score ({ending})")


def tokenize_completion(
    prompt: Text, completion: Text, tokenizer: PreTrainedTokenizerBase, *, source: str = "completion",
    location: str | None = None, field: str | None = None,
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one response, with the same boundary rule and EOS as `tokenize_pair`;
    `source`, `location` and `field` name the response in the `DataError` for one that gets no token."""
    ids, (completion_ids,) = _split(prompt, [completion], tokenizer)
    _check_scored(completion_ids, prompt, source, location, field)
    return ids, completion_ids


def prompt_ids(prompt: Text, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a model is given to continue `prompt`: chat template with the generation prompt, or plain text."""
    return _ids(tokenizer, prompt, add_generation_prompt=isinstance(prompt, list))


def tokenize_pair(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase, index: int = 0) -> TokenizedPair:
    """Tokenize one pair: chat template for messages, EOS appended to plain-text completions (as TRL).

    Raises `DataError` naming the pair and field when a completion gets no token (nothing to score)."""
    prompt_ids, (chosen_ids, rejected_ids) = _split(pair.prompt, [pair.chosen, pair.rejected], tokenizer)
    for field, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        _check_scored(ids, pair.prompt, pair.source, pair.location, field)
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, index)


def truncate(pair: TokenizedPair, max_length: int | None, mode: str) -> TokenizedPair | None:
    """Fit prompt + completion into `max_length` tokens per sequence; None when nothing trainable is left.

    keep_start (TRL's default): each sequence keeps its first `max_length` tokens; a pair whose prompt alone
    fills `max_length` has no completion token left and is dropped.
    keep_end: the prompt keeps its last tokens, as many as the longer completion leaves room for (the prompt
    stays shared by both completions); if a completion alone does not fit with one prompt token, its end is cut.
    """
    if not max_length:
        return pair
    prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    if mode == "keep_start":
        if len(prompt) >= max_length:
            return None
        room = max_length - len(prompt)
        return TokenizedPair(prompt, chosen[:room], rejected[:room], pair.index)
    if mode == "keep_end":
        longest = max(len(chosen), len(rejected))
        prompt_room = max(1, max_length - longest) if prompt else 0
        prompt = prompt[-prompt_room:] if prompt_room else []
        room = max_length - len(prompt)
        if room <= 0:
            return None
        return TokenizedPair(prompt, chosen[:room], rejected[:room], pair.index)
    raise ValueError(f"unknown truncation mode {mode!r}")


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    truncation_mode: str = "keep_start",
) -> tuple[list[TokenizedPair], int]:
    """Tokenize and truncate every pair; returns the kept pairs and how many were dropped."""
    kept: list[TokenizedPair] = []
    dropped = 0
    for index, pair in enumerate(pairs):
        fitted = truncate(tokenize_pair(pair, tokenizer, index), max_length, truncation_mode)
        if fitted is None:
            dropped += 1
        else:
            kept.append(fitted)
    return kept, dropped


def tokenize_for(
    pairs: Sequence[PreferencePair],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    what: str | None = None,
    log: Callable[[str], None] = print_flushed,
) -> list[TokenizedPair]:
    """`tokenize_pairs` for a run: logs how many pairs were dropped, raises `UserError` when none are left.

    `what` names the pairs in both messages ("training" gives "dropped 3 training pairs ..."); None: just "pairs".
    """
    kept, dropped = tokenize_pairs(pairs, tokenizer, max_length, truncation_mode)
    noun = f"{what} pairs" if what else "pairs"
    if dropped:
        log(f"dropped {dropped} {noun} whose prompt alone fills max_length={max_length}")
    if not kept:
        if not pairs:
            raise UserError(f"no {noun} to tokenize")
        raise UserError(f"no {noun} left after truncation to max_length={max_length}")
    return kept
