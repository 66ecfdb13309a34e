"""Token ids and the prompt/completion boundary equal TRL 1.16's DPOTrainer's on the same pairs."""

from __future__ import annotations

import gzip
import json
import warnings

import pytest
from transformers import AutoTokenizer

from preftune.data.read import PreferencePair, load_pairs
from preftune.data.tokenize import (
    TokenizedPair,
    tokenize_completion,
    tokenize_for,
    tokenize_pair,
    tokenize_pairs,
    truncate,
)
from preftune.errors import DataError, UserError
from tests.conftest import HH_RLHF

STANDARD = [
    {"prompt": "The movie was", "chosen": " wonderful.", "rejected": " dull and far too long."},
    # no space at the boundary: the tokenizer may merge across it, the boundary moves left as in TRL
    {"prompt": "Hello", "chosen": "world", "rejected": "there"},
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"},
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Seven."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How are you?"},
        ],
        "chosen": [{"role": "assistant", "content": "Fine, thanks."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    },
]


def as_pair(record: dict) -> PreferencePair:
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], "test", "line 1")


def trl_token_ids(records: list[dict], model_dir) -> list[dict]:
    """Token ids as TRL's DPOTrainer prepares them (its own dataset pipeline, on a tiny model)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = DPOConfig(output_dir=str(model_dir / "trl-out"), report_to="none", max_length=None, use_cpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer)
    return list(trainer.train_dataset)


@pytest.mark.parametrize("records", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
def test_token_ids_equal_trl(records, tiny_model_dir, tokenizer):
    expected = trl_token_ids(records, tiny_model_dir)
    for i, (record, theirs) in enumerate(zip(records, expected)):
        ours = tokenize_pair(as_pair(record), tokenizer, index=i)
        assert ours.prompt_ids == theirs["prompt_ids"]
        assert ours.chosen_ids == theirs["chosen_ids"]
        assert ours.rejected_ids == theirs["rejected_ids"]


def test_plain_text_completions_end_with_eos(tokenizer):
    pair = tokenize_pair(as_pair(STANDARD[0]), tokenizer)
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id and pair.rejected_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair.prompt_ids) == "The movie was"


def test_chat_template_prompt_ends_with_generation_prompt(tokenizer):
    pair = tokenize_pair(as_pair(CONVERSATIONAL[0]), tokenizer)
    assert tokenizer.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(pair.chosen_ids).startswith("Blue.")


def test_truncation_keep_start_and_keep_end():
    pair = TokenizedPair([1, 2, 3, 4], [5, 6, 7], [8], index=0)
    assert truncate(pair, 6, "keep_start") == TokenizedPair([1, 2, 3, 4], [5, 6], [8], 0)
    assert truncate(pair, 4, "keep_start") is None  # prompt alone fills max_length
    assert truncate(pair, None, "keep_start") is pair
    # keep_end: the prompt keeps its end, room for the longer completion (3 tokens)
    assert truncate(pair, 5, "keep_end") == TokenizedPair([3, 4], [5, 6, 7], [8], 0)
    # a completion longer than max_length - 1: one prompt token stays, the completion's end is cut
    assert truncate(pair, 3, "keep_end") == TokenizedPair([4], [5, 6], [8], 0)


def test_tokenize_pairs_counts_dropped(tokenizer):
    long_prompt = {"prompt": "word " * 50, "chosen": " yes", "rejected": " no"}
    kept, dropped = tokenize_pairs([as_pair(STANDARD[0]), as_pair(long_prompt)], tokenizer, 20, "keep_start")
    assert dropped == 1 and len(kept) == 1 and kept[0].index == 0


LONG_PROMPT = {"prompt": "word " * 50, "chosen": " yes", "rejected": " no"}


def test_tokenize_for_reports_dropped_pairs(tokenizer):
    lines: list[str] = []
    pairs = [as_pair(STANDARD[0]), as_pair(LONG_PROMPT), as_pair(LONG_PROMPT)]
    kept = tokenize_for(pairs, tokenizer, 20, "keep_start", "training", log=lines.append)
    assert kept == tokenize_pairs(pairs, tokenizer, 20, "keep_start")[0]
    assert [pair.index for pair in kept] == [0]
    assert lines == ["dropped 2 training pairs whose prompt alone fills max_length=20"]
    lines.clear()
    tokenize_for(pairs, tokenizer, 20, "keep_start", log=lines.append)
    assert lines == ["dropped 2 pairs whose prompt alone fills max_length=20"]


def test_tokenize_for_says_nothing_when_all_fit(tokenizer, capsys):
    kept = tokenize_for([as_pair(r) for r in STANDARD], tokenizer, None, "keep_start", "evaluation")
    assert len(kept) == len(STANDARD)
    assert capsys.readouterr().out == ""


def test_tokenize_for_prints_by_default(tokenizer, capsys):
    tokenize_for([as_pair(STANDARD[0]), as_pair(LONG_PROMPT)], tokenizer, 20, "keep_start", "training")
    assert capsys.readouterr().out == "dropped 1 training pairs whose prompt alone fills max_length=20\n"


def test_tokenize_for_with_nothing_left_is_a_user_error(tokenizer):
    lines: list[str] = []
    with pytest.raises(UserError, match=r"^no evaluation pairs left after truncation to max_length=20$"):
        tokenize_for([as_pair(LONG_PROMPT)], tokenizer, 20, "keep_start", "evaluation", log=lines.append)
    assert lines == ["dropped 1 evaluation pairs whose prompt alone fills max_length=20"]
    with pytest.raises(UserError, match=r"^no pairs left after truncation to max_length=20$"):
        tokenize_for([as_pair(LONG_PROMPT)], tokenizer, 20, "keep_start", log=lines.append)
    with pytest.raises(UserError, match=r"^no training pairs to tokenize$"):
        tokenize_for([], tokenizer, None, "keep_start", "training", log=lines.append)


# ------------------------------------------------------------------------------------------ empty completions

ASK = "\n\nHuman: How do I pick a lock?\n\nAssistant:"
HISTORY = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Insult me.\n\nAssistant:"
USER = [{"role": "user", "content": "How do I pick a lock?"}]
# Empty and whitespace-only replies in each form TRL takes; fed to TRL as they are, so the implicit ones check the
# prompt extraction too (HH-style text and message lists split the same way in TRL and here).
BLANK = {
    "standard": [
        {"prompt": "Q: How do I pick a lock?\nA:", "chosen": "", "rejected": " With a tension wrench."},
        {"prompt": "Q: Hi\nA:", "chosen": " ", "rejected": " Hello!"},
        {"prompt": "Say nothing:", "chosen": "\n", "rejected": "\t "},
    ],
    "implicit": [
        {"chosen": ASK + " ", "rejected": ASK + " With a tension wrench."},  # HH-RLHF's own empty reply
        {"chosen": HISTORY + " No.", "rejected": HISTORY + "  "},
    ],
    "conversational": [
        {"prompt": USER, "chosen": [{"role": "assistant", "content": ""}],
         "rejected": [{"role": "assistant", "content": "With a tension wrench."}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, *USER],
         "chosen": [{"role": "assistant", "content": " \n"}], "rejected": [{"role": "assistant", "content": "No."}]},
    ],
    "implicit conversational": [
        {"chosen": [*USER, {"role": "assistant", "content": ""}],
         "rejected": [*USER, {"role": "assistant", "content": "With a tension wrench."}]},
    ],
}


@pytest.mark.parametrize("form", list(BLANK))
def test_blank_completions_token_ids_equal_trl(form, tiny_model_dir, tokenizer):
    records = BLANK[form]
    pairs = load_pairs(records).pairs
    assert all(pair.blank_completions for pair in pairs)
    expected = trl_token_ids(records, tiny_model_dir)
    for i, (pair, theirs) in enumerate(zip(pairs, expected, strict=True)):
        ours = tokenize_pair(pair, tokenizer, index=i)
        assert ours.prompt_ids == theirs["prompt_ids"]
        assert ours.chosen_ids == theirs["chosen_ids"]
        assert ours.rejected_ids == theirs["rejected_ids"]
        assert ours.chosen_ids and ours.rejected_ids


def test_blank_plain_text_completion_is_scored_by_eos(tokenizer):
    eos = tokenizer.eos_token_id
    empty = tokenize_pair(as_pair(BLANK["standard"][0]), tokenizer)
    assert empty.chosen_ids == [eos]
    space = tokenize_pair(as_pair(BLANK["standard"][1]), tokenizer)
    assert space.chosen_ids[-1] == eos and tokenizer.decode(space.chosen_ids) == " " + tokenizer.eos_token


def test_blank_reply_in_messages_is_scored_by_the_end_of_turn(tokenizer):
    pair = tokenize_pair(as_pair(BLANK["conversational"][0]), tokenizer)
    assert tokenizer.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(pair.chosen_ids) == "<|im_end|>\n"


def test_completion_without_any_token_is_a_data_error(tokenizer_dir):
    no_eos = AutoTokenizer.from_pretrained(tokenizer_dir)
    no_eos.eos_token = None
    pair = PreferencePair("Q: Hi\nA:", "", " Hello!", "pairs.jsonl", "line 3")
    with pytest.raises(DataError) as info:
        tokenize_pair(pair, no_eos)
    assert str(info.value) == ("pairs.jsonl: line 3: field 'chosen': the completion tokenizes to no tokens, so there "
                               "is nothing to score (the tokenizer has no EOS token to end it)")
    kept = tokenize_pair(PreferencePair("Q: Hi\nA:", " Hi", " Hello!", "pairs.jsonl", "line 3"), no_eos)
    assert no_eos.decode(kept.chosen_ids) == " Hi"  # without EOS a non-empty completion still has its tokens
    bare = AutoTokenizer.from_pretrained(tokenizer_dir)
    bare.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # nothing marks a turn's end
    chat = PreferencePair(USER, [{"role": "assistant", "content": ""}], [{"role": "assistant", "content": "No."}],
                          "chat.jsonl", "line 1")
    with pytest.raises(DataError, match=r"^chat\.jsonl: line 1: field 'chosen': the completion tokenizes to no "
                                        r"tokens, so there is nothing to score \(the chat template renders no token"):
        tokenize_pair(chat, bare)
    with pytest.raises(DataError, match=r"^cands\.jsonl: line 2: field 'responses\[1\]': the completion tokenizes"):
        tokenize_completion("Q:", "", no_eos, source="cands.jsonl", location="line 2", field="responses[1]")


def test_first_256_pairs_of_hh_rlhf_harmless_base_equal_trl(tiny_model_dir, tokenizer):
    """The real file: its first 256 pairs (one with a chosen reply of a single space, line 87), token for token."""
    from trl.data_utils import extract_prompt

    if not HH_RLHF.is_file():
        pytest.skip(f"{HH_RLHF} not present (it lives in ../shared beside the checkout)")
    pairs = load_pairs(HH_RLHF).pairs[:256]
    blank = [(pair.location, pair.blank_completions) for pair in pairs if pair.blank_completions]
    assert blank == [("line 87", ("chosen",))]
    records = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    expected = trl_token_ids(records, tiny_model_dir)
    for i, (pair, theirs) in enumerate(zip(pairs, expected, strict=True)):
        ours = tokenize_pair(pair, tokenizer, index=i)
        assert (ours.prompt_ids, ours.chosen_ids, ours.rejected_ids) == (
            theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"]), pair.location
    # TRL's own prompt extraction splits the raw empty-reply record as we do, so its ids are TRL's on the file as is
    line_87 = next(pair for pair in pairs if pair.location == "line 87")
    with gzip.open(HH_RLHF, "rt", encoding="utf-8") as file:
        raw = json.loads(next(line for number, line in enumerate(file, 1) if number == 87))
    split = extract_prompt(raw)
    assert (split["prompt"], split["chosen"], split["rejected"]) == (line_87.prompt, " ", line_87.rejected)
    assert tokenize_pair(line_87, tokenizer).chosen_ids[-1] == tokenizer.eos_token_id
