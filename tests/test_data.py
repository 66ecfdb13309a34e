"""preftune.data.read: every source format, the three record forms, and a precise message for every bad record."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.data.read import (
    LoadResult,
    PreferencePair,
    common_prefix_length,
    describe_blank,
    describe_skipped,
    extract_prompt,
    load_and_report,
    load_pairs,
    pair_from_record,
)
from preftune.errors import DataError, UserError

HH_RLHF = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"

# A comma, quotes, a newline and non-ASCII text: CSV must quote them, and the newline makes record 3 span two lines.
RECORDS = [
    {"prompt": "The movie was", "chosen": " wonderful.", "rejected": " dull."},
    {"prompt": "Review:", "chosen": ' A delight, "truly".', "rejected": " A mess."},
    {"prompt": "Ünïcode ☃ prompt\nsecond line", "chosen": " yes", "rejected": " no"},
]
TRIPLES = [(r["prompt"], r["chosen"], r["rejected"]) for r in RECORDS]


def triples(result: LoadResult) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in result.pairs]


def locations(result: LoadResult) -> list[str]:
    return [p.location for p in result.pairs]


def jsonl_text(records: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text(jsonl_text(records), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def csv_text(records: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


# ------------------------------------------------------------------------------------------ one test per format


def test_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    result = load_pairs(path)
    assert triples(result) == TRIPLES
    assert locations(result) == ["line 1", "line 2", "line 3"]
    assert result.skipped == []
    assert all(p.source == str(path) and not p.is_conversational for p in result.pairs)


def test_jsonl_blank_lines_keep_physical_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n" + json.dumps(RECORDS[0]) + "\n  \n\n" + jsonl_text(RECORDS[1:]) + "\n\n", encoding="utf-8")
    result = load_pairs(str(path))
    assert triples(result) == TRIPLES
    assert locations(result) == ["line 2", "line 5", "line 6"]


def test_jsonl_gz(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_text(RECORDS).encode()))
    result = load_pairs(path)
    assert triples(result) == TRIPLES
    assert locations(result) == ["line 1", "line 2", "line 3"]


def test_jsonl_with_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_text(RECORDS).replace("\n", "\r\n").encode())
    assert triples(load_pairs(path)) == TRIPLES


def test_json_list(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    result = load_pairs(path)
    assert triples(result) == TRIPLES
    assert locations(result) == ["record 1", "record 2", "record 3"]


def test_json_gz_columns(tmp_path: Path) -> None:
    columns = {key: [r[key] for r in RECORDS] for key in ("prompt", "chosen", "rejected")}
    path = tmp_path / "pairs.json.gz"
    path.write_bytes(gzip.compress(json.dumps(columns).encode()))
    result = load_pairs(path)
    assert triples(result) == TRIPLES
    assert locations(result) == ["record 1", "record 2", "record 3"]


def test_json_holding_json_lines_is_read_as_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.json", RECORDS)
    result = load_pairs(path)
    assert triples(result) == TRIPLES
    assert locations(result) == ["line 1", "line 2", "line 3"]


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(csv_text(RECORDS), encoding="utf-8")
    result = load_pairs(path)
    assert triples(result) == TRIPLES
    # Line 1 is the header; record 3's quoted prompt spans lines 4 and 5.
    assert locations(result) == ["line 2", "line 3", "line 4"]


def test_csv_gz_crlf(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv.gz"
    path.write_bytes(gzip.compress(csv_text(RECORDS).replace("\n", "\r\n").encode()))
    result = load_pairs(path)
    # Quoted newlines keep the file's own line end, as csv does with newline="".
    assert triples(result) == [(p.replace("\n", "\r\n"), c, r) for p, c, r in TRIPLES]
    assert locations(result) == ["line 2", "line 3", "line 4"]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "extra": 1} for r in RECORDS]), path)
    result = load_pairs(path)
    assert triples(result) == TRIPLES
    assert locations(result) == ["row 1", "row 2", "row 3"]


def test_save_to_disk_dataset(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_list(RECORDS).save_to_disk(tmp_path / "saved")
    result = load_pairs(tmp_path / "saved", split="ignored for a Dataset")
    assert triples(result) == TRIPLES
    assert locations(result) == ["row 1", "row 2", "row 3"]


def test_save_to_disk_dataset_dict_picks_split(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    other = [{"prompt": "Other", "chosen": " a", "rejected": " b"}]
    DatasetDict({"train": Dataset.from_list(other), "test": Dataset.from_list(RECORDS)}).save_to_disk(tmp_path / "dd")
    result = load_pairs(tmp_path / "dd", split="test")
    assert triples(result) == TRIPLES
    assert locations(result) == ["row 1", "row 2", "row 3"]
    assert triples(load_pairs(tmp_path / "dd")) == [("Other", " a", " b")]
    with pytest.raises(UserError, match="no split 'validation'.*splits: train, test"):
        load_pairs(tmp_path / "dd", split="validation")


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep load_dataset's cache inside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_folder_of_data_files_goes_to_load_dataset(tmp_path: Path, datasets_cache: None) -> None:
    folder = tmp_path / "hubish"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", RECORDS)
    write_jsonl(folder / "test.jsonl", RECORDS[:1])
    result = load_pairs(folder)
    assert triples(result) == TRIPLES
    assert locations(result) == ["row 1", "row 2", "row 3"]
    assert triples(load_pairs(folder, split="test")) == TRIPLES[:1]


def test_hub_name_passes_name_and_split_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_list([{**r, "id": i} for i, r in enumerate(RECORDS)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_pairs("someone/some-prefs", split="test_prefs")
    assert calls == [("someone/some-prefs", "test_prefs")]
    assert triples(result) == TRIPLES
    assert locations(result) == ["row 1", "row 2", "row 3"]
    assert all(p.source == "someone/some-prefs" for p in result.pairs)


def test_hub_failure_is_a_user_error_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def failing(name: str, split: str) -> None:
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(UserError) as info:
        load_pairs("someone/missing")
    message = str(info.value)
    assert "someone/missing" in message
    assert "neither a local file nor a loadable dataset" in message
    assert "doesn't exist on the Hub" in message


def test_hub_dataset_without_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list([{"text": "x"}]))
    with pytest.raises(UserError, match="no 'chosen' column.*found: text"):
        load_pairs("someone/sft-data")


# ------------------------------------------------------------------------------------------ in memory

CONVERSATION = {
    "prompt": [{"role": "user", "content": "Name a colour."}],
    "chosen": [{"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "assistant", "content": "Seven."}],
}
RECORD_LOCATIONS = ["record 1", "record 2", "record 3"]


@pytest.mark.parametrize("container", [list, tuple])
def test_list_of_dicts(container: type) -> None:
    result = load_pairs(container(RECORDS))
    assert triples(result) == TRIPLES
    assert locations(result) == RECORD_LOCATIONS
    assert all(p.source == f"<{container.__name__} of 3 records>" for p in result.pairs)
    assert load_pairs(container(RECORDS), name="train_data").pairs[0].source == f"train_data ({container.__name__})"


def test_in_memory_dataset() -> None:
    from datasets import Dataset

    result = load_pairs(Dataset.from_list([{**r, "id": i} for i, r in enumerate(RECORDS)]), name="train_data")
    assert triples(result) == TRIPLES
    assert locations(result) == RECORD_LOCATIONS
    assert all(p.source == "train_data (datasets.Dataset)" for p in result.pairs)
    assert load_pairs(Dataset.from_list(RECORDS)).pairs[0].source == "<datasets.Dataset of 3 records>"
    # a format set on the dataset (numpy arrays, tensors) does not reach the checks
    (pair,) = load_pairs(Dataset.from_list([CONVERSATION]).with_format("numpy")).pairs
    assert (pair.prompt, pair.chosen, pair.rejected) == (
        CONVERSATION["prompt"], CONVERSATION["chosen"], CONVERSATION["rejected"])


def test_in_memory_iterable_dataset() -> None:
    from datasets import Dataset

    result = load_pairs(Dataset.from_list(RECORDS).to_iterable_dataset())
    assert triples(result) == TRIPLES
    assert locations(result) == RECORD_LOCATIONS


def test_in_memory_dataset_dict_takes_split() -> None:
    from datasets import Dataset, DatasetDict

    other = [{"prompt": "Other", "chosen": " a", "rejected": " b"}]
    both = DatasetDict({"train": Dataset.from_list(other), "test": Dataset.from_list(RECORDS)})
    result = load_pairs(both, split="test", name="eval_data")
    assert triples(result) == TRIPLES
    assert locations(result) == RECORD_LOCATIONS
    assert result.pairs[0].source == "eval_data (datasets.DatasetDict['test'])"
    assert triples(load_pairs(both)) == [("Other", " a", " b")]
    no_split = r"^eval_data \(datasets.DatasetDict\): no split 'validation'.*splits: train, test"
    with pytest.raises(UserError, match=no_split):
        load_pairs(both, split="validation", name="eval_data")


def test_in_memory_dataframe() -> None:
    pd = pytest.importorskip("pandas")
    result = load_pairs(pd.DataFrame([{**r, "score": 1.0} for r in RECORDS]), name="train_data")
    assert triples(result) == TRIPLES
    assert locations(result) == RECORD_LOCATIONS
    assert all(p.source == "train_data (pandas.DataFrame)" for p in result.pairs)
    assert all(type(p.prompt) is str for p in result.pairs)


def test_dataframe_from_a_conversational_dataset() -> None:
    pd = pytest.importorskip("pandas")
    from datasets import Dataset

    frame = Dataset.from_list([CONVERSATION]).to_pandas()  # messages as numpy arrays of dicts
    assert isinstance(frame, pd.DataFrame)
    (pair,) = load_pairs(frame).pairs
    assert (pair.prompt, pair.chosen, pair.rejected) == (
        CONVERSATION["prompt"], CONVERSATION["chosen"], CONVERSATION["rejected"])


def test_dataframe_missing_cells_are_bad_fields() -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame([RECORDS[0], {"prompt": "x", "chosen": " y"}, RECORDS[1]])  # record 2: rejected is NaN
    with pytest.raises(DataError) as info:
        load_pairs(frame, name="train_data")
    assert str(info.value) == (
        "train_data (pandas.DataFrame): record 2: field 'rejected': expected a string or a list of messages, "
        "got NaN (a missing value)"
    )
    assert (info.value.location, info.value.field) == ("record 2", "rejected")
    result = load_pairs(frame, skip_invalid=True)
    assert locations(result) == ["record 1", "record 3"]
    assert [(e.location, e.field) for e in result.skipped] == [("record 2", "rejected")]
    typed = pd.DataFrame({"prompt": ["a", "b"], "chosen": [" x", None], "rejected": [" y", " z"]}, dtype="string")
    with pytest.raises(DataError, match=r"record 2: field 'chosen': .*got a missing value \(pandas.NA\)"):
        load_pairs(typed)


def test_bad_in_memory_record_is_located() -> None:
    from datasets import Dataset

    bad = [RECORDS[0], {"prompt": "x", "chosen": 3, "rejected": " y"}, RECORDS[1]]
    with pytest.raises(DataError) as info:
        load_pairs(bad, name="train_data")
    assert str(info.value) == (
        "train_data (list): record 2: field 'chosen': expected a string or a list of messages, got int"
    )
    empty = r"^train_data \(datasets.Dataset\): record 2: field 'prompt': expected a non-empty string"
    with pytest.raises(DataError, match=empty):
        load_pairs(Dataset.from_list([RECORDS[0], {**RECORDS[1], "prompt": ""}]), name="train_data")


def test_non_dict_items_are_data_errors() -> None:
    records = [RECORDS[0], "not a record", RECORDS[1], None]
    with pytest.raises(DataError) as info:
        load_pairs(records)
    assert (info.value.location, info.value.field) == ("record 2", None)
    assert str(info.value).endswith("got str")
    result = load_pairs(records, skip_invalid=True)
    assert locations(result) == ["record 1", "record 3"]
    assert [e.location for e in result.skipped] == ["record 2", "record 4"]


def test_in_memory_source_without_columns() -> None:
    from datasets import Dataset

    with pytest.raises(UserError, match=r"^train_data \(datasets.Dataset\): no 'chosen' column.*found: text, label\)$"):
        load_pairs(Dataset.from_list([{"text": "x", "label": 1}]), name="train_data")
    pd = pytest.importorskip("pandas")
    with pytest.raises(UserError, match=r"^train_data \(pandas.DataFrame\): no 'rejected' column.*found: chosen\)$"):
        load_pairs(pd.DataFrame({"chosen": ["x"]}), name="train_data")


def test_empty_in_memory_sources() -> None:
    from datasets import Dataset

    with pytest.raises(UserError, match=r"^train_data \(list\): no preference pairs found \(empty list\)$"):
        load_pairs([], name="train_data")
    with pytest.raises(UserError, match=r"no preference pairs found \(empty dataset\)$"):
        load_pairs(Dataset.from_list([]), skip_invalid=True)
    with pytest.raises(UserError, match=r"no preference pairs found \(empty dataset\)$"):
        load_pairs(Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}))
    pd = pytest.importorskip("pandas")
    with pytest.raises(UserError, match=r"no preference pairs found \(empty DataFrame\)$"):
        load_pairs(pd.DataFrame())


def test_all_invalid_in_memory_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"^<list of 2 records>: no valid preference pairs \(all 2 records"):
        load_pairs([{"chosen": "x"}, 5], skip_invalid=True)


def test_unsupported_in_memory_type() -> None:
    expected = r"^train_data: expected a path.*a list of dicts.*got dict; for a dict of columns"
    with pytest.raises(UserError, match=expected):
        load_pairs({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]}, name="train_data")
    with pytest.raises(UserError, match=r"^data: expected a path.*got int$"):
        load_pairs(3)


def test_name_does_not_rename_a_path(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    assert load_pairs(path, name="train_data").pairs[0].source == str(path)


def test_load_and_report_logs_skipped_records() -> None:
    lines: list[str] = []
    records = [RECORDS[0], {"prompt": "x", "chosen": 3, "rejected": " y"}]
    result = load_and_report(records, skip_invalid=True, name="train_data", log=lines.append)
    assert locations(result) == ["record 1"]
    assert lines == [describe_skipped(result.skipped)]
    assert lines[0].startswith("skipped 1 invalid record: train_data (list): record 2: field 'chosen'")
    lines.clear()
    load_and_report(RECORDS, skip_invalid=True, log=lines.append)
    assert lines == []  # nothing skipped, nothing said
    with pytest.raises(DataError, match="record 2"):
        load_and_report(records, log=lines.append)


def test_load_and_report_prints_by_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(RECORDS[0]), "{oops"])
    load_and_report(path, split="train", skip_invalid=True)
    out = capsys.readouterr().out
    assert out.startswith(f"skipped 1 invalid record: {path}: line 2: not valid JSON") and out.count("\n") == 1


def test_common_prefix_length_over_any_sequences() -> None:
    assert common_prefix_length("abcd", "abxd") == 2
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_length(CONVERSATION["prompt"] + CONVERSATION["chosen"], CONVERSATION["prompt"]) == 1
    assert common_prefix_length((), [1]) == 0


# ------------------------------------------------------------------------------------------ record forms


def test_conversational_explicit_prompt(tmp_path: Path) -> None:
    record = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
        "score": 3,
    }
    (pair,) = load_pairs(write_jsonl(tmp_path / "chat.jsonl", [record])).pairs
    assert pair.is_conversational
    assert (pair.prompt, pair.chosen, pair.rejected) == (record["prompt"], record["chosen"], record["rejected"])


def test_implicit_hh_style_keeps_shared_reply_start_in_completions() -> None:
    chosen = "\n\nHuman: Do you like cats?\n\nAssistant: I do, they are lovely."
    rejected = "\n\nHuman: Do you like cats?\n\nAssistant: I hate them."
    assert extract_prompt(chosen, rejected) == (
        "\n\nHuman: Do you like cats?\n\nAssistant:",
        " I do, they are lovely.",
        " I hate them.",
    )


def test_implicit_hh_style_multi_turn_ends_after_last_shared_assistant_marker(tmp_path: Path) -> None:
    history = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:"
    record = {"chosen": history + " Why did the chicken cross the road?", "rejected": history + " No."}
    (pair,) = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [record])).pairs
    assert (pair.prompt, pair.chosen, pair.rejected) == (history, " Why did the chicken cross the road?", " No.")


def test_implicit_plain_strings_follow_trl() -> None:
    # TRL's rule: the common start, with the space before the split moved to the completions.
    assert extract_prompt("The sky is blue", "The sky is green") == ("The sky is", " blue", " green")
    assert extract_prompt("Answer: yes", "Answer: no") == ("Answer:", " yes", " no")
    assert extract_prompt("2+2=4", "2+2=5") == ("2+2=", "4", "5")


def test_implicit_message_lists() -> None:
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What colour is the sky?"}]
    chosen = [{"role": "assistant", "content": "It is blue."}]
    rejected = [{"role": "assistant", "content": "It is green."}]
    assert extract_prompt(prompt + chosen, prompt + rejected) == (prompt, chosen, rejected)


def test_implicit_message_lists_multi_turn(tmp_path: Path) -> None:
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "A joke?"},
    ]
    chosen = [{"role": "assistant", "content": "Knock knock."}, {"role": "user", "content": "Who's there?"}]
    rejected = [{"role": "assistant", "content": "No."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"chosen": prompt + chosen, "rejected": prompt + rejected}])
    (pair,) = load_pairs(path).pairs
    assert pair.is_conversational
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, chosen, rejected)


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        ("Yes", "No", "share no prompt"),
        (" Yes", " No", "share no prompt"),
        ("Same", "Same", "chosen is identical to rejected"),
        ([{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}], "share no prompt"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            [{"role": "user", "content": "a"}, {"role": "user", "content": "c"}],
            "expected the first message after the shared prompt to be an assistant message, got 'user'",
        ),
        (
            [{"role": "user", "content": "a"}],
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "expected a reply after the messages shared with rejected, got none",
        ),
        ("text", [{"role": "user", "content": "text"}], "expected a string like 'chosen', got a list of messages"),
    ],
)
def test_extract_prompt_errors(chosen, rejected, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        extract_prompt(chosen, rejected)
    assert reason in str(info.value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12), st.text(max_size=12), st.text(max_size=12))
def test_extract_prompt_splits_without_losing_text(prompt: str, chosen: str, rejected: str) -> None:
    full_chosen, full_rejected = prompt + chosen, prompt + rejected
    try:
        p, c, r = extract_prompt(full_chosen, full_rejected)
    except ValueError:
        return
    assert p + c == full_chosen and p + r == full_rejected
    assert p.strip() and c != r  # a completion may be blank, the prompt may not


def test_pair_from_record_directly() -> None:
    pair = pair_from_record({"prompt": "P", "chosen": " a", "rejected": " b"}, "mem", "record 9")
    assert pair == PreferencePair("P", " a", " b", "mem", "record 9")
    with pytest.raises(DataError, match=r"^mem: record 9: expected an object with keys .*, got list$"):
        pair_from_record(["P", "a", "b"], "mem", "record 9")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ bad records


GOOD = [json.dumps(r) for r in RECORDS]
MSG = {"role": "assistant", "content": "fine"}

BAD_LINES = [
    ('{"prompt": "a" "chosen": " b", "rejected": " c"}', None, "not valid JSON (Expecting ',' delimiter at column 16)"),
    ("[1, 2]", None, "expected a JSON object, got list"),
    ('{"prompt": "a", "rejected": " c", "id": 4}', "chosen",
     "missing (expected keys: prompt, chosen, rejected, or chosen, rejected; found: prompt, rejected, id)"),
    ('{"prompt": "a", "chosen": 5, "rejected": " c"}', "chosen", "expected a string or a list of messages, got int"),
    ('{"prompt": "a", "chosen": " b", "rejected": null}', "rejected",
     "expected a string or a list of messages, got null"),
    ('{"prompt": "", "chosen": " b", "rejected": " c"}', "prompt", "expected a non-empty string, got an empty string"),
    ('{"prompt": "  ", "chosen": " b", "rejected": " c"}', "prompt",
     "expected a non-empty string, got only whitespace"),
    ('{"prompt": [], "chosen": [], "rejected": []}', "prompt",
     "expected a non-empty list of messages, got an empty list"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": ["hi"], "rejected": [MSG]}), "chosen[0]",
     "expected a message (an object with 'role' and 'content'), got str"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [MSG], "rejected": [{"role": "assistant"}]}),
     "rejected[0].content", "missing (a message needs 'role' and 'content'; found keys: role)"),
    (json.dumps({"prompt": [{"role": "bot", "content": "q"}], "chosen": [MSG], "rejected": [MSG]}), "prompt[0].role",
     "expected one of system, user, assistant, tool, got 'bot'"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "user", "content": ["x"]}], "chosen": [MSG],
                 "rejected": [MSG]}), "prompt[1].content", "expected a string, got list"),
    (json.dumps({"prompt": [{"role": "user", "content": " "}], "chosen": [MSG], "rejected": [MSG]}), "prompt",
     "expected some non-empty message content, got only empty messages"),
    ('{"prompt": "a", "chosen": " b", "rejected": " b"}', "rejected", "chosen is identical to rejected"),
    ('{"chosen": "a b", "rejected": "a b"}', "rejected", "chosen is identical to rejected"),
    (json.dumps({"prompt": "q", "chosen": [MSG], "rejected": " c"}), "chosen",
     "expected a string like 'prompt', got a list of messages"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [MSG], "rejected": " c"}), "rejected",
     "expected a list of messages like 'prompt', got a string"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "q"}, MSG],
                 "rejected": [MSG]}), "chosen[0].role",
     "expected the reply to start with an assistant message, got 'user'"),
    ('{"chosen": "Yes", "rejected": "No"}', "prompt", "chosen and rejected share no prompt"),
    ('{"chosen": " ", "rejected": "  "}', "prompt", "chosen and rejected share no prompt"),
    ('{"prompt": "a", "chosen": "", "rejected": ""}', "rejected", "chosen is identical to rejected"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": [MSG]}), "chosen",
     "expected a non-empty list of messages, got an empty list"),
]


@pytest.mark.parametrize(("line", "field", "problem"), BAD_LINES)
def test_bad_record_names_file_line_and_field(tmp_path: Path, line: str, field: str | None, problem: str) -> None:
    path = write_lines(tmp_path / "bad-data.jsonl", [*GOOD, line])
    with pytest.raises(DataError) as info:
        load_pairs(path)
    error = info.value
    assert (error.source, error.location, error.field, error.problem) == (str(path), "line 4", field, problem)
    message = str(error)
    assert "bad-data.jsonl" in message and "line 4" in message and problem in message
    if field is not None:
        assert f"field '{field}'" in message


def test_bad_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(("\n".join(GOOD) + "\n").encode() + '{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n'
                     .encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: line 4: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        load_pairs(path)
    result = load_pairs(path, skip_invalid=True)
    assert len(result.pairs) == 3 and [e.location for e in result.skipped] == ["line 4"]


def test_bad_utf8_in_csv_names_the_record_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(csv_text(RECORDS).encode() + 'caf\xe9,x,y\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv: line 6: not valid UTF-8"):
        load_pairs(path)


def test_utf16_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "utf16.jsonl"
    path.write_bytes(jsonl_text(RECORDS).encode("utf-16"))
    with pytest.raises(UserError, match=r"utf16\.jsonl: the file is UTF-16 or UTF-32 encoded"):
        load_pairs(path)


def test_csv_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(csv_text(RECORDS) + "only,two\n" + ",c,r\n" + 'p,"same",same\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value) == f"{path}: line 6: expected 3 fields as in the header (prompt, chosen, rejected), got 2"
    result = load_pairs(path, skip_invalid=True)
    assert [str(e) for e in result.skipped] == [
        f"{path}: line 6: expected 3 fields as in the header (prompt, chosen, rejected), got 2",
        f"{path}: line 7: field 'prompt': expected a non-empty string, got an empty string",
        f"{path}: line 8: field 'rejected': chosen is identical to rejected",
    ]


def test_csv_lone_carriage_return_is_located(tmp_path: Path) -> None:
    path = tmp_path / "cr.csv"
    path.write_bytes(b"prompt,chosen,rejected\np,a,b\nx\ry,a,b\n")
    with pytest.raises(DataError, match=r"cr\.csv: line 3: not valid CSV \(a carriage return inside an unquoted field"):
        load_pairs(path)


def test_csv_long_fields(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "long.csv", ["prompt,chosen,rejected", "p," + "x" * 200_000 + ",r"])
    assert len(load_pairs(path).pairs[0].chosen) == 200_000


def test_csv_without_rejected_column(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "cols.csv", ["prompt,chosen,reject", "a,b,c"])
    with pytest.raises(UserError, match=r"cols\.csv: no 'rejected' column .*found: prompt, chosen, reject\)"):
        load_pairs(path)


def test_json_list_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps([*RECORDS, {"prompt": "a", "chosen": 1.5, "rejected": "b"}, 7]), encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.json: record 4: field 'chosen': expected a string or a list of "
                                        r"messages, got float"):
        load_pairs(path)
    result = load_pairs(path, skip_invalid=True)
    assert [str(e) for e in result.skipped][1] == f"{path}: record 5: expected a JSON object, got int"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}', "got an object that is not all lists"),
        ('"just text"', "got str"),
        ('{"chosen": ["a", "b"], "rejected": ["c"]}', "expected columns of equal length, got chosen: 2, rejected: 1"),
        ('[{"prompt": "a",}]',
         "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 17)"),
    ],
)
def test_json_whole_file_problems(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "whole.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_pairs(path)
    assert not isinstance(info.value, DataError)
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


def test_parquet_bad_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    rows = [*RECORDS, {"prompt": "p", "chosen": None, "rejected": " r"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"bad\.parquet: row 4: field 'chosen': expected a string or a list of "
                                        r"messages, got null"):
        load_pairs(path)


def test_saved_dataset_conversational_bad_row(tmp_path: Path) -> None:
    from datasets import Dataset

    user = {"role": "user", "content": "q"}
    rows = [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "critic", "content": "b"}]},
    ]
    Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match=r"saved: row 2: field 'rejected\[0\]\.role': expected one of system, user, "
                                        r"assistant, tool, got 'critic'"):
        load_pairs(tmp_path / "saved")
    result = load_pairs(tmp_path / "saved", skip_invalid=True)
    assert [p.location for p in result.pairs] == ["row 1"]
    assert result.pairs[0].chosen == [{"role": "assistant", "content": "a"}]


# ------------------------------------------------------------------------------------------ empty completions

EMPTY_REPLY = {"role": "assistant", "content": ""}
SPACE_REPLY = {"role": "assistant", "content": " "}
ASK = [{"role": "user", "content": "q"}]
BLANK_RECORDS = [
    ({"prompt": "Q: Hi\nA:", "chosen": "", "rejected": " Hello!"}, ("Q: Hi\nA:", "", " Hello!"), ("chosen",)),
    ({"prompt": "Q: Hi\nA:", "chosen": " Hello!", "rejected": " \t\n"}, ("Q: Hi\nA:", " Hello!", " \t\n"),
     ("rejected",)),
    ({"prompt": "Q:", "chosen": " ", "rejected": "  "}, ("Q:", " ", "  "), ("chosen", "rejected")),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"},
     ("\n\nHuman: Hi\n\nAssistant:", " ", " Hello"), ("chosen",)),
    # no HH marker: the prompt is the whole shorter text (TRL's rule would cut its last character off)
    ({"chosen": "Tell me more", "rejected": "Tell me"}, ("Tell me", " more", ""), ("rejected",)),
    ({"prompt": ASK, "chosen": [EMPTY_REPLY], "rejected": [MSG]},
     (ASK, [EMPTY_REPLY], [MSG]), ("chosen",)),
    ({"prompt": ASK, "chosen": [MSG], "rejected": [SPACE_REPLY]},
     (ASK, [MSG], [SPACE_REPLY]), ("rejected",)),
    ({"chosen": [*ASK, EMPTY_REPLY], "rejected": [*ASK, MSG]},
     (ASK, [EMPTY_REPLY], [MSG]), ("chosen",)),
]


@pytest.mark.parametrize(("record", "split", "blank"), BLANK_RECORDS)
def test_empty_and_whitespace_completions_are_kept(tmp_path: Path, record: dict, split: tuple, blank: tuple) -> None:
    path = write_jsonl(tmp_path / "blank.jsonl", [RECORDS[0], record])
    first, pair = load_pairs(path).pairs
    assert (pair.prompt, pair.chosen, pair.rejected) == split
    assert pair.blank_completions == blank and first.blank_completions == ()


def test_describe_blank_names_count_and_first_places() -> None:
    pairs = [PreferencePair("P", c, r, "d.jsonl", f"line {i}") for i, (c, r) in
             enumerate([(" a", ""), (" ", "  "), (" a", " b"), ("", " b"), ("\n", " b")], 1)]
    assert describe_blank(pairs, limit=3) == (
        "note: 5 completions are empty or whitespace-only, kept and scored as TRL does, by the tokens that end a "
        "reply (EOS after plain text, the chat template's end of turn after messages): d.jsonl: line 1 (rejected); "
        "d.jsonl: line 2 (chosen); d.jsonl: line 2 (rejected); and 2 more"
    )
    assert describe_blank(pairs[:1]).startswith("note: 1 completion is empty or whitespace-only, kept")
    assert describe_blank(pairs[:1]).endswith(": d.jsonl: line 1 (rejected)")
    assert describe_blank(pairs[2:3]) == "no empty or whitespace-only completions"


def test_load_and_report_notes_blank_completions_once(tmp_path: Path) -> None:
    records = [RECORDS[0], {**RECORDS[1], "chosen": ""}, "not a record", {**RECORDS[2], "rejected": " "}]
    path = write_jsonl(tmp_path / "blank.jsonl", records)
    lines: list[str] = []
    result = load_and_report(path, skip_invalid=True, log=lines.append)
    assert locations(result) == ["line 1", "line 2", "line 4"]
    assert lines == [describe_skipped(result.skipped), describe_blank(result.pairs)]
    assert lines[1].startswith("note: 2 completions are empty or whitespace-only")
    assert lines[1].endswith(f"{path}: line 2 (chosen); {path}: line 4 (rejected)")
    lines.clear()
    load_and_report([RECORDS[0], {**RECORDS[1], "chosen": ""}], log=lines.append)  # without skip_invalid too
    assert lines == ["note: 1 completion is empty or whitespace-only, kept and scored as TRL does, by the tokens "
                     "that end a reply (EOS after plain text, the chat template's end of turn after messages): "
                     "<list of 2 records>: record 2 (chosen)"]


# ------------------------------------------------------------------------------------------ skip_invalid


def test_skip_invalid_collects_bad_records_in_file_order(tmp_path: Path) -> None:
    lines = [GOOD[0], "{oops", GOOD[1], "", '{"prompt": "a", "chosen": " b"}', GOOD[2],
             '{"chosen": "x", "rejected": "y"}']
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    with pytest.raises(DataError, match="line 2: not valid JSON"):  # without skip_invalid: the first bad record
        load_pairs(path)
    result = load_pairs(path, skip_invalid=True)
    assert triples(result) == TRIPLES
    assert locations(result) == ["line 1", "line 3", "line 6"]
    assert [(e.location, e.field) for e in result.skipped] == [("line 2", None), ("line 5", "rejected"),
                                                                ("line 7", "prompt")]
    summary = describe_skipped(result.skipped)
    assert summary.startswith(f"skipped 3 invalid records: {path}: line 2: not valid JSON")
    assert f"{path}: line 7: field 'prompt': chosen and rejected share no prompt" in summary


def test_skip_invalid_with_every_record_invalid(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "allbad.jsonl", ['{"chosen": "a"}', "[]"])
    with pytest.raises(UserError) as info:
        load_pairs(path, skip_invalid=True)
    message = str(info.value)
    assert "allbad.jsonl: no valid preference pairs (all 2 records are invalid)" in message
    assert "line 1: field 'rejected': missing" in message


def test_describe_skipped_limit() -> None:
    errors = [DataError("d.jsonl", f"line {i}", "chosen", "bad") for i in range(1, 6)]
    assert describe_skipped(errors, limit=2) == (
        "skipped 5 invalid records: d.jsonl: line 1: field 'chosen': bad; d.jsonl: line 2: field 'chosen': bad; "
        "and 3 more"
    )
    assert describe_skipped(errors[:1]) == "skipped 1 invalid record: d.jsonl: line 1: field 'chosen': bad"


# ------------------------------------------------------------------------------------------ whole-source problems


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n  \n\n"),
        ("empty.jsonl.gz", gzip.compress(b"", mtime=0)),  # mtime 0: the same test id in every xdist worker
        ("empty.json", b"  \n"),
        ("empty-list.json", b"[]"),
        ("empty.csv", b""),
        ("header-only.csv", b"prompt,chosen,rejected\n"),
    ],
)
def test_empty_source(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_pairs(path, skip_invalid=True)
    assert str(info.value) == f"{path}: no preference pairs found (empty file)"


def test_empty_saved_dataset(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    empty.save_to_disk(tmp_path / "empty")
    with pytest.raises(UserError, match=r"empty: no preference pairs found \(empty dataset\)"):
        load_pairs(tmp_path / "empty")
    DatasetDict({"train": Dataset.from_list(RECORDS), "test": empty}).save_to_disk(tmp_path / "dd")
    with pytest.raises(UserError, match=r"dd: no preference pairs found \(empty dataset\)"):
        load_pairs(tmp_path / "dd", split="test")


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/dir/pairs", "./pairs", "data.csv.gz"])
def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a path-like name must not go to the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"^{name}: file not found"):
        load_pairs(name)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "pairs.txt", GOOD)
    with pytest.raises(UserError) as info:
        load_pairs(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown file format; supported: ")
    assert ".jsonl" in message and ".parquet" in message and "save_to_disk" in message


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_text(RECORDS * 50).encode())[:-20])
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz: not a readable gzip file, or truncated"):
        load_pairs(path, skip_invalid=True)


def test_gz_suffix_on_plain_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "plain.csv.gz", RECORDS)
    with pytest.raises(UserError, match=r"plain\.csv\.gz: not a readable gzip file"):
        load_pairs(path)


# ------------------------------------------------------------------------------------------ the real HH-RLHF file


def test_real_hh_rlhf_harmless_test_split() -> None:
    if not HH_RLHF.exists():
        pytest.skip(f"{HH_RLHF} not present")
    # 4 of the 2,312 records have an empty chosen reply: chosen ends with "\n\nAssistant: " where rejected goes on.
    empty_chosen = ["line 87", "line 517", "line 926", "line 1104"]
    lines: list[str] = []
    result = load_and_report(HH_RLHF, log=lines.append)
    print(f"HH-RLHF harmless-base test: {len(result.pairs)} pairs, {len(result.skipped)} skipped")
    assert len(result.pairs) == 2312 and not result.skipped
    blank = [pair for pair in result.pairs if pair.blank_completions]
    assert [(p.location, p.blank_completions, p.chosen) for p in blank] == [(loc, ("chosen",), " ")
                                                                           for loc in empty_chosen]
    assert lines == [describe_blank(result.pairs)]
    assert lines[0].startswith("note: 4 completions are empty or whitespace-only, kept and scored as TRL does")
    assert lines[0].endswith(f"{HH_RLHF}: line 87 (chosen); {HH_RLHF}: line 517 (chosen); {HH_RLHF}: line 926 "
                             f"(chosen); {HH_RLHF}: line 1104 (chosen)")
    assert all(p.prompt.endswith("\n\nAssistant:") for p in result.pairs)
    assert all(p.chosen.startswith(" ") and p.rejected.startswith(" ") for p in result.pairs)
    assert all(p.chosen != p.rejected for p in result.pairs)
    # --skip-invalid has nothing to drop: an empty reply is a valid record
    assert load_pairs(HH_RLHF, skip_invalid=True).pairs == result.pairs
