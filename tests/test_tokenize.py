"""Token ids and the prompt/completion boundary equal TRL 1.16's DPOTrainer's on the same pairs."""

from __future__ import annotations

import warnings

import pytest

from preftune.data import PreferencePair
from preftune.errors import UserError
from preftune.tokenize import TokenizedPair, tokenize_for, tokenize_pair, tokenize_pairs, truncate

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
