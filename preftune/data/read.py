"""Preference pairs in: files, saved datasets and hub datasets -> validated `PreferencePair`s.

Sources, chosen by path and suffix:

* ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, blank lines ignored; located as "line N".
* ``.json`` / ``.json.gz``: a list of objects ("record N"), or an object of equal-length columns
  ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` ("record N"). A ``.json`` file that holds JSON Lines
  is read as JSON Lines ("line N"), as ``datasets`` does.
* ``.csv`` / ``.csv.gz``: a header row, then one record per row, read as plain text; located by the physical line
  the record starts on ("line N").
* ``.parquet``: one record per row ("row N").
* a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (a DatasetDict gives `split`);
  any other folder goes to ``datasets.load_dataset`` (a folder of data files); "row N".
* anything that is not on disk and does not look like a path: a Hugging Face hub dataset,
  ``datasets.load_dataset(name, split=split)``; "row N".

In memory (the Python API), records located as "record N" (1-based) and the source named by what it is, e.g.
"train_data (datasets.Dataset)":

* a ``datasets.Dataset`` or ``IterableDataset``, or a ``DatasetDict`` (which gives `split`);
* a list or tuple of dicts;
* a ``pandas.DataFrame`` (pandas is not imported unless one is given); a missing cell (NaN) is a bad field.

Every text must be UTF-8. Each record takes one of the forms TRL accepts (other keys are ignored, but for an
optional ``margin``: a number by which chosen's reward should beat rejected's, read by reward models as TRL's):

* explicit prompt, standard: ``{"prompt": str, "chosen": str, "rejected": str}``; the completions are appended to
  the prompt as they are, so they usually start with a space.
* explicit prompt, conversational: the three are lists of ``{"role", "content"}`` messages (roles: system, user,
  assistant, tool); the prompt ends before the reply, and each reply starts with an assistant message.
* implicit prompt: ``{"chosen", "rejected"}`` only, each the whole text or conversation; the prompt is their shared
  start (see `extract_prompt`).

A completion may be empty or only whitespace (a string, or assistant messages with such contents), as TRL allows: in a
harmlessness set, saying nothing is a real answer. It is kept and scored by the tokens that end a reply (EOS after
plain text, the chat template's end of turn after messages); `load_and_report` names such pairs once
(`describe_blank`). Prompts must not be empty.

Records are validated when loaded: a bad record is a `DataError` naming the source, the record and the field,
saying what was expected and what was found. With ``skip_invalid=True`` bad records are dropped and returned in
`LoadResult.skipped` instead; problems with the source as a whole (missing, empty, unreadable) are `UserError`s.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import math
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import DataError, UserError

Message = dict[str, str]  # {"role": ..., "content": ...}
Text = str | list[Message]


def prompt_text(prompt: Text) -> str:
    """A prompt as one text: a string as it is, chat messages their contents one per line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


ROLES = ("system", "user", "assistant", "tool")
EXPECTED_KEYS = "prompt, chosen, rejected, or chosen, rejected"
# Anthropic HH-RLHF's turn marker: an implicit prompt ends right after the last one the two texts share.
HH_ASSISTANT = "\n\nAssistant:"

FILE_FORMATS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".parquet")
SUPPORTED = (
    ", ".join(FILE_FORMATS) + ", a folder written by datasets' save_to_disk, or a Hugging Face hub dataset name"
)


@dataclass(frozen=True)
class PreferencePair:
    """One validated pair: `prompt` then `chosen` is preferred to `prompt` then `rejected`.

    Strings (standard) or lists of messages (conversational), never a mix. A conversational prompt ends before
    the assistant's reply; `chosen` and `rejected` are the reply (usually one assistant message).
    """

    prompt: Text
    chosen: Text
    rejected: Text
    source: str  # file path or dataset name it came from
    location: str  # "line 17", "record 3", "row 5"
    # how much chosen must beat rejected by, from an optional "margin" field (reward models read it, as TRL's)
    margin: float | None = None

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def blank_completions(self) -> tuple[str, ...]:
        """The fields ("chosen", "rejected") whose completion is empty or only whitespace."""
        return tuple(field for field in ("chosen", "rejected") if is_blank(getattr(self, field)))


def is_blank(text: Text) -> bool:
    """Whether a reply says nothing: an empty or whitespace-only string, or messages with only such contents."""
    if isinstance(text, str):
        return not text.strip()
    return not any(message["content"].strip() for message in text)


@dataclass
class LoadResult:
    pairs: list[PreferencePair]
    skipped: list[DataError]  # only non-empty with skip_invalid=True


class _Invalid(ValueError):
    """A problem with one field of a record; `pair_from_record` adds the source and location."""

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem


# ----------------------------------------------------------------------------------------------- records


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and math.isnan(value):
        return "NaN (a missing value)"
    if type(value).__name__ in ("NAType", "NaTType"):  # pandas.NA, pandas.NaT
        return f"a missing value (pandas.{type(value).__name__[:-4]})"
    return type(value).__name__


def _text_kind(text: Text) -> str:
    return "a string" if isinstance(text, str) else "a list of messages"


def _check_text(value: object, field: str, blank_ok: bool = False) -> Text:
    """`value` as a string or messages; `blank_ok` (completions): empty or whitespace-only text is accepted."""
    if isinstance(value, str):
        if not blank_ok and not value.strip():
            found = "an empty string" if not value else "only whitespace"
            raise _Invalid(field, f"expected a non-empty string, got {found}")
        return value
    if isinstance(value, list | tuple):
        return _check_messages(value, field, blank_ok)
    raise _Invalid(field, f"expected a string or a list of messages, got {_kind(value)}")


def _check_messages(value: list | tuple, field: str, blank_ok: bool = False) -> list[Message]:
    if not value:
        raise _Invalid(field, "expected a non-empty list of messages, got an empty list")
    messages: list[Message] = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise _Invalid(where, f"expected a message (an object with 'role' and 'content'), got {_kind(message)}")
        for key in ("role", "content"):
            if key not in message:
                found = ", ".join(map(str, message)) or "none"
                raise _Invalid(f"{where}.{key}", f"missing (a message needs 'role' and 'content'; found keys: {found})")
        role, content = message["role"], message["content"]
        if not isinstance(role, str):
            raise _Invalid(f"{where}.role", f"expected a string, got {_kind(role)}")
        if role not in ROLES:
            raise _Invalid(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _Invalid(f"{where}.content", f"expected a string, got {_kind(content)}")
        # Only role and content: Arrow-backed sources fill absent struct fields with None, which chat templates
        # would render or choke on.
        messages.append({"role": role, "content": content})
    if not blank_ok and is_blank(messages):
        raise _Invalid(field, "expected some non-empty message content, got only empty messages")
    return messages


def _check_reply(messages: list[Message], field: str) -> None:
    role = messages[0]["role"]
    if role != "assistant":
        # Usually the whole conversation was given as the completion while a prompt is given too.
        raise _Invalid(f"{field}[0].role", f"expected the reply to start with an assistant message, got {role!r}")


def _same_kind(reference: Text, reference_field: str, other: Text, other_field: str) -> None:
    if isinstance(reference, str) != isinstance(other, str):
        expected = f"{_text_kind(reference)} like '{reference_field}'"
        raise _Invalid(other_field, f"expected {expected}, got {_text_kind(other)}")


def _validate(record: object) -> tuple[Text, Text, Text]:
    if not isinstance(record, Mapping):
        raise _Invalid(None, f"expected an object with keys {EXPECTED_KEYS}, got {_kind(record)}")
    for key in ("chosen", "rejected"):
        if key not in record:
            found = ", ".join(map(str, record)) or "none"
            raise _Invalid(key, f"missing (expected keys: {EXPECTED_KEYS}; found: {found})")
    prompt = _check_text(record["prompt"], "prompt") if "prompt" in record else None
    # Blank completions pass here; in the implicit form the prompt is taken out of them, and it must not be blank.
    chosen = _check_text(record["chosen"], "chosen", blank_ok=True)
    rejected = _check_text(record["rejected"], "rejected", blank_ok=True)
    if prompt is None:
        return extract_prompt(chosen, rejected)
    _same_kind(prompt, "prompt", chosen, "chosen")
    _same_kind(prompt, "prompt", rejected, "rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        _check_reply(chosen, "chosen")
        _check_reply(rejected, "rejected")
    if chosen == rejected:
        raise _Invalid("rejected", "chosen is identical to rejected")
    return prompt, chosen, rejected


def _check_margin(value: object) -> float | None:
    """An optional "margin" field: a finite number (CSV cells arrive as text); absent or null: None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Invalid("margin", f"expected a number, got {_kind(value)}")
    try:
        margin = float(value)
    except ValueError:
        raise _Invalid("margin", f"expected a number, got {value!r}") from None
    if not math.isfinite(margin):
        raise _Invalid("margin", f"expected a finite number, got {value!r}")
    return margin


def pair_from_record(record: Mapping, source: str, location: str) -> PreferencePair:
    """Validate one record (any of the module's forms) into a pair; raises `DataError` naming the field."""
    try:
        prompt, chosen, rejected = _validate(record)
        margin = _check_margin(record.get("margin"))
    except _Invalid as exc:
        raise DataError(source, location, exc.field, exc.problem) from None
    return PreferencePair(prompt, chosen, rejected, source, location, margin)


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items `a` and `b` share: characters, messages or token ids."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split an implicit-prompt pair into (prompt, chosen completion, rejected completion).

    Strings: the prompt is their common start. If that contains HH-RLHF's ``"\\n\\nAssistant:"``, the prompt ends
    right after the last one (the completions then start with " ..."), so a reply both happen to begin the same
    way ("Assistant: I ...") stays in the completions. Otherwise TRL's rule: the whole common start, less a
    trailing space, which goes to the completions.

    Message lists: the prompt is the longest common run of messages; each remainder must start with an assistant
    message.

    A completion may be empty or only whitespace once the prompt is removed (HH-RLHF's empty replies end with
    ``"\n\nAssistant: "``: the completion is " "); a conversation must still have a reply message after the prompt.

    Raises ValueError saying why when there is no shared prompt, the two are identical or of different kinds,
    or a conversation has no reply after the prompt or one that does not start with an assistant message.
    """
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise _Invalid("rejected", f"expected {_text_kind(chosen)} like 'chosen', got {_text_kind(rejected)}")
    if chosen == rejected:
        raise _Invalid("rejected", "chosen is identical to rejected")
    n = common_prefix_length(chosen, rejected)
    if isinstance(chosen, str) and isinstance(rejected, str):
        marker = chosen.rfind(HH_ASSISTANT, 0, n)
        if marker >= 0:
            n = marker + len(HH_ASSISTANT)
        elif n > 0 and chosen[n - 1] == " ":
            n -= 1
        prompt: Text = chosen[:n]
        if not prompt.strip():
            raise _Invalid("prompt", "chosen and rejected share no prompt")
        return prompt, chosen[n:], rejected[n:]
    if n == 0:
        raise _Invalid("prompt", "chosen and rejected share no prompt (their first messages differ)")
    for field, other, messages in (("chosen", "rejected", chosen), ("rejected", "chosen", rejected)):
        if len(messages) == n:
            raise _Invalid(field, f"expected a reply after the messages shared with {other}, got none")
        if messages[n]["role"] != "assistant":
            raise _Invalid(
                f"{field}[{n}].role",
                f"expected the first message after the shared prompt to be an assistant message, "
                f"got {messages[n]['role']!r}",
            )
    return chosen[:n], chosen[n:], rejected[n:]


# ----------------------------------------------------------------------------------------------- sources

# A reader yields (location, record) where a record that cannot even be parsed is a DataError, not raised, so that
# skip_invalid can drop it like any other bad record.
Records = Iterator[tuple[str, object]]


def _check_columns(source: str, columns: Iterable[str]) -> None:
    columns = list(columns)
    for key in ("chosen", "rejected"):
        if key not in columns:
            found = ", ".join(columns) or "none"
            raise UserError(f"{source}: no '{key}' column (expected columns: {EXPECTED_KEYS}; found: {found})")


def _utf8_problem(raw: bytes, exc: UnicodeDecodeError) -> str:
    column = len(raw[: exc.start].decode("utf-8-sig")) + 1  # in characters, as an editor counts; the start is valid
    return f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); save the file as UTF-8"


def _check_bom(source: str, head: bytes) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(
            f"{source}: the file is UTF-16 or UTF-32 encoded (it starts with a byte-order mark); save it as UTF-8"
        )


def _binary_lines(path: Path, source: str) -> Iterator[tuple[int, bytes]]:
    """Physical lines (numbered from 1, split at \\n) of a plain or gzipped file; read errors are UserErrors."""
    try:
        with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb") as file:
            for number, line in enumerate(file, 1):
                if number == 1:
                    _check_bom(source, line)
                yield number, line
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UserError(f"{source}: not a readable gzip file, or truncated ({exc})") from None
    except OSError as exc:
        raise UserError(f"{source}: cannot read the file ({exc})") from None


def _jsonl_records(lines: Iterable[tuple[int, bytes]], source: str) -> Records:
    for number, raw in lines:
        location = f"line {number}"
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield location, DataError(source, location, None, _utf8_problem(raw, exc))
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield location, DataError(source, location, None, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(value, dict):
            yield location, DataError(source, location, None, f"expected a JSON object, got {_kind(value)}")
            continue
        yield location, value


def _json_records(path: Path, source: str) -> Records:
    data = b"".join(line for _, line in _binary_lines(path, source))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = f"not valid UTF-8 (byte 0x{data[exc.start]:02x}); save it as UTF-8"
        raise UserError(f"{source}: line {line}: {problem}") from None
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json: read it as datasets' "json" loader does
            yield from _jsonl_records(enumerate(data.split(b"\n"), 1), source)
            return
        raise UserError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if isinstance(value, list):
        for i, record in enumerate(value, 1):
            location = f"record {i}"
            if not isinstance(record, dict):
                yield location, DataError(source, location, None, f"expected a JSON object, got {_kind(record)}")
            else:
                yield location, record
        return
    if isinstance(value, dict) and value and all(isinstance(column, list) for column in value.values()):
        lengths = {name: len(column) for name, column in value.items()}
        if len(set(lengths.values())) > 1:
            found = ", ".join(f"{name}: {length}" for name, length in lengths.items())
            raise UserError(f"{source}: expected columns of equal length, got {found}")
        _check_columns(source, value)
        for i, row in enumerate(zip(*value.values()), 1):
            yield f"record {i}", dict(zip(value, row))
        return
    if isinstance(value, dict) and not value:
        return
    found = "an object that is not all lists" if isinstance(value, dict) else _kind(value)
    raise UserError(
        f"{source}: expected a JSON list of records or an object of equal-length column lists, got {found}"
    )


def _csv_records(path: Path, source: str) -> Records:
    bad_lines: dict[int, str] = {}

    def decoded() -> Iterator[str]:
        for number, raw in _binary_lines(path, source):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                bad_lines[number] = _utf8_problem(raw, exc)
                yield raw.decode("utf-8", errors="replace")

    # The default limit (128 KiB a field) is below some real conversations; raising it only relaxes a check.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    # Lines keep their line ends (as with newline=""), so quoted fields may span lines; line_num counts them.
    reader = csv.reader(decoded())
    header: list[str] | None = None
    last = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            problem = f"not valid CSV ({exc})"
            if "new-line character seen in unquoted field" in str(exc):  # csv's own hint is about open(), not us
                problem = (
                    "not valid CSV (a carriage return inside an unquoted field; quote the field or end lines "
                    "with \\n or \\r\\n)"
                )
            raise DataError(source, f"line {reader.line_num}", None, problem) from None
        first, last = last + 1, reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        location = f"line {first}"
        bad = next((bad_lines[n] for n in range(first, last + 1) if n in bad_lines), None)
        if header is None:
            if bad:
                raise UserError(f"{source}: {location}: the header row is {bad}")
            header = [name.strip() for name in row]
            if len(set(header)) != len(header):
                raise UserError(f"{source}: {location}: duplicate column names in the header ({', '.join(header)})")
            _check_columns(source, header)
            continue
        if bad:
            yield location, DataError(source, location, None, bad)
        elif len(row) != len(header):
            problem = f"expected {len(header)} fields as in the header ({', '.join(header)}), got {len(row)}"
            yield location, DataError(source, location, None, problem)
        else:
            yield location, dict(zip(header, row))


def _parquet_records(path: Path, source: str) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        columns = file.schema_arrow.names
        _check_columns(source, columns)
        wanted = [name for name in ("prompt", "chosen", "rejected") if name in columns]
        number = 0
        for batch in file.iter_batches(batch_size=1024, columns=wanted):
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{source}: not a readable Parquet file ({exc})") from None


def _dataset_records(dataset: Any, source: str) -> Records:
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list):
        _check_columns(source, columns)
        # Only the three columns: others (images, metadata) would be decoded for nothing.
        dataset = dataset.select_columns([name for name in ("prompt", "chosen", "rejected") if name in columns])
    for number, row in enumerate(dataset, 1):
        yield f"row {number}", row


def _saved_dataset_records(path: Path, source: str, split: str) -> Records:
    import datasets

    folder = path
    try:
        if (path / "dataset_dict.json").is_file():
            # Pick the split from the index rather than loading every split of the DatasetDict.
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
            if split not in splits:
                raise UserError(f"{source}: no split '{split}' in the saved DatasetDict (splits: {', '.join(splits)})")
            folder = path / split
        if not json.loads((folder / "state.json").read_text(encoding="utf-8")).get("_data_files", True):
            return  # a saved empty Dataset has no data file, and load_from_disk fails on it
        loaded = datasets.load_from_disk(str(folder))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; all mean the folder cannot be read
        raise UserError(f"{source}: cannot load the saved dataset: {type(exc).__name__}: {exc}") from None
    yield from _dataset_records(loaded, source)


def _load_dataset_records(name: str, source: str, split: str, what: str) -> Records:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - network, missing repo, unknown split, bad files: all one message
        raise UserError(f"{source}: {what}: {type(exc).__name__}: {exc}") from None
    yield from _dataset_records(loaded, source)


# ----------------------------------------------------------------------------------------------- in memory

IN_MEMORY = "a datasets.Dataset or DatasetDict, a list of dicts, or a pandas.DataFrame"


def _loaded_module(value: object, module: str) -> Any:
    """`module` if `value` may be one of its objects: it is imported already when such an object exists, so an
    optional dependency (pandas) is never imported just to look."""
    ours = any(cls.__module__.split(".")[0] == module for cls in type(value).__mro__)
    return sys.modules.get(module) if ours else None


def _named(name: str | None, kind: str, count: int | None) -> str:
    if name is not None:
        return f"{name} ({kind})"
    if count is None:
        return f"<{kind}>"
    return f"<{kind} of {count} record{'' if count == 1 else 's'}>"


def _numbered(rows: Iterable[object]) -> Records:
    for number, row in enumerate(rows, 1):
        yield f"record {number}", row


def _in_memory_dataset(dataset: Any, source: str) -> Records:
    if hasattr(dataset, "with_format"):
        dataset = dataset.with_format(None)  # plain Python rows, whatever format the caller set
    for number, (_, row) in enumerate(_dataset_records(dataset, source), 1):
        yield f"record {number}", row


def _plain(value: object) -> object:
    """numpy arrays and scalars (a DataFrame from Dataset.to_pandas() holds messages as arrays) as Python values."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def _frame_records(frame: Any, source: str) -> Records:
    columns = [str(column) for column in frame.columns]
    _check_columns(source, columns)
    wanted = [name for name in ("prompt", "chosen", "rejected") if name in columns]
    duplicated = [name for name in wanted if columns.count(name) > 1]
    if duplicated:
        raise UserError(f"{source}: duplicate columns {', '.join(duplicated)} (columns: {', '.join(columns)})")
    frame = frame.rename(columns=str)[wanted]
    for number, row in enumerate(frame.itertuples(index=False, name=None), 1):
        yield f"record {number}", {key: _plain(value) for key, value in zip(wanted, row)}


def _open_in_memory(data: object, split: str, name: str | None) -> tuple[Records, str, str]:
    """The records of an in-memory source, its name in messages, and what to call it when it has none."""
    datasets = _loaded_module(data, "datasets")
    if datasets is not None:
        if isinstance(data, datasets.DatasetDict | datasets.IterableDatasetDict):
            kind = f"datasets.{type(data).__name__}"
            if split not in data:
                source = _named(name, kind, None)
                raise UserError(f"{source}: no split '{split}' in the {type(data).__name__} "
                                f"(splits: {', '.join(data) or 'none'})")
            data, kind = data[split], f"{kind}['{split}']"
        else:
            kind = f"datasets.{type(data).__name__}"
        if isinstance(data, datasets.Dataset | datasets.IterableDataset):
            count = len(data) if isinstance(data, datasets.Dataset) else None
            source = _named(name, kind, count)
            records = _in_memory_dataset(data, source) if count != 0 else iter(())
            return records, source, "empty dataset"
    pandas = _loaded_module(data, "pandas")
    if pandas is not None and isinstance(data, pandas.DataFrame):
        source = _named(name, "pandas.DataFrame", len(data))
        records = _frame_records(data, source) if len(data) else iter(())
        return records, source, "empty DataFrame"
    if isinstance(data, list | tuple):
        kind = type(data).__name__
        return _numbered(data), _named(name, kind, len(data)), f"empty {kind}"
    hint = "; for a dict of columns, pass datasets.Dataset.from_dict(...)" if isinstance(data, Mapping) else ""
    raise UserError(f"{name or 'data'}: expected a path, a hub dataset name, {IN_MEMORY}; "
                    f"got {type(data).__name__}{hint}")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _looks_like_path(name: str) -> bool:
    """Whether a name that is not on disk was meant as a file; hub ids are "name" or "owner/name"."""
    lowered = name.lower()
    if lowered.endswith((*FILE_FORMATS, ".gz", ".txt", ".tsv", ".arrow")):
        return True
    if name.startswith((".", "~", "/")) or os.path.isabs(name):
        return True
    separators = {os.sep, os.altsep} - {None, "/"}
    return name.count("/") > 1 or any(sep in name for sep in separators)


def is_hub_dataset(source: str | None) -> bool:
    """Whether a --data value names a Hugging Face hub dataset, as `load_pairs` reads it: not on disk, not shaped
    like a path, and not the API's stand-in for in-memory records ("<in-memory ...>")."""
    if not source or source.startswith("<"):
        return False
    return not Path(source).expanduser().exists() and not _looks_like_path(source)


def _open(source: str, split: str) -> tuple[Records, str]:
    """The records of `source` and what to call it when it has none."""
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return _saved_dataset_records(path, source, split), "empty dataset"
        what = "a folder neither written by save_to_disk nor of data files datasets.load_dataset can read"
        return _load_dataset_records(str(path), source, split, what), "empty dataset"
    if path.exists():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _jsonl_records(_binary_lines(path, source), source), "empty file"
        if name.endswith((".json", ".json.gz")):
            return _json_records(path, source), "empty file"
        if name.endswith((".csv", ".csv.gz")):
            return _csv_records(path, source), "empty file"
        if name.endswith(".parquet"):
            return _parquet_records(path, source), "empty file"
        raise UserError(f"{source}: unknown file format; supported: {SUPPORTED}")
    if _looks_like_path(source):
        raise UserError(f"{source}: file not found (looked for {path.absolute()})")
    what = f"neither a local file nor a loadable dataset (split '{split}')"
    return _load_dataset_records(source, source, split, what), "empty dataset"


def load_pairs(
    source: str | os.PathLike | object, *, split: str = "train", skip_invalid: bool = False, name: str | None = None
) -> LoadResult:
    """Load and validate every pair of `source`: a path or hub dataset name, or records in memory (see the module
    docstring for the sources and forms).

    `name`: what to call an in-memory source in messages ("train_data" gives "train_data (datasets.Dataset)");
    a path or hub name always names itself.
    Raises the first record's `DataError`, or with `skip_invalid` collects them in `LoadResult.skipped`.
    Raises `UserError` for the source as a whole: missing, unknown format or type, unreadable, empty, or (with
    `skip_invalid`) without a single valid record.
    """
    if isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        records, empty = _open(name, split)
    else:
        records, name, empty = _open_in_memory(source, split, name)
    pairs: list[PreferencePair] = []
    skipped: list[DataError] = []
    count = 0
    for location, record in records:
        count += 1
        try:
            if isinstance(record, DataError):
                raise record
            pairs.append(pair_from_record(record, name, location))  # type: ignore[arg-type]
        except DataError as err:
            if not skip_invalid:
                raise
            skipped.append(err)
    if count == 0:
        raise UserError(f"{name}: no preference pairs found ({empty})")
    if not pairs:
        raise UserError(f"{name}: no valid preference pairs (all {count} records are invalid); the first: {skipped[0]}")
    return LoadResult(pairs, skipped)


def print_flushed(message: str) -> None:
    """The default `log` of the reporting helpers: a line on stdout, flushed (logs of long runs are tailed)."""
    print(message, flush=True)


def load_and_report(
    source: str | os.PathLike | object, *, split: str = "train", skip_invalid: bool = False,
    name: str | None = None, log: Callable[[str], None] = print_flushed,
) -> LoadResult:
    """`load_pairs`, then one line to `log` for each of: records skipped (with `skip_invalid`, `describe_skipped`),
    and pairs kept with an empty or whitespace-only completion (`describe_blank`)."""
    result = load_pairs(source, split=split, skip_invalid=skip_invalid, name=name)
    if result.skipped:
        log(describe_skipped(result.skipped))
    if any(pair.blank_completions for pair in result.pairs):
        log(describe_blank(result.pairs))
    return result


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to sample from, (for scoring) the candidate responses to rank, and the record's other columns (a
    reference answer, ...), which the online recipes give their reward functions as TRL does."""

    prompt: Text
    responses: list[Text]
    source: str
    location: str
    columns: dict[str, Any] = dataclasses.field(default_factory=dict)


def _validate_prompt(record: object, with_responses: bool) -> tuple[Text, list[Text]]:
    if not isinstance(record, Mapping):
        raise _Invalid(None, f"expected an object with a 'prompt' key, got {_kind(record)}")
    if "prompt" not in record:
        found = ", ".join(map(str, record)) or "none"
        raise _Invalid("prompt", f"missing (found keys: {found})")
    prompt = _check_text(record["prompt"], "prompt")
    if not with_responses:
        return prompt, []
    key = "responses" if "responses" in record else "completions"
    if key not in record:
        raise _Invalid("responses", "missing (expected a list of candidate responses to score)")
    candidates = record[key]
    if not isinstance(candidates, list | tuple) or not candidates:
        raise _Invalid(key, f"expected a non-empty list of responses, got {_kind(candidates)}")
    responses = []
    for i, candidate in enumerate(candidates):
        response = _check_text(candidate, f"{key}[{i}]")
        _same_kind(prompt, "prompt", response, f"{key}[{i}]")
        if isinstance(response, list):
            _check_reply(response, f"{key}[{i}]")
        responses.append(response)
    return prompt, responses


def load_prompts(source: str | os.PathLike, *, with_responses: bool = False) -> list[PromptRecord]:
    """Prompts from a JSONL file (`.jsonl` or `.jsonl.gz`), one `{"prompt": ...}` object a line, any other keys
    kept as the record's columns; with `with_responses`, each also needs `"responses"` (or `"completions"`): a list
    of candidates of the prompt's kind.
    The first bad record raises a `DataError` naming its line and field."""
    name = os.fspath(source)
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"{name}: file not found")
    if not path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        raise UserError(f"{name}: prompts are read from JSON Lines (.jsonl or .jsonl.gz), one object per line")
    records = []
    for location, record in _jsonl_records(_binary_lines(path, name), name):
        if isinstance(record, DataError):
            raise record
        try:
            prompt, responses = _validate_prompt(record, with_responses)
        except _Invalid as exc:
            raise DataError(name, location, exc.field, exc.problem) from None
        skip = {"prompt", "responses", "completions"} if with_responses else {"prompt"}
        columns = {key: value for key, value in record.items() if key not in skip}
        records.append(PromptRecord(prompt, responses, name, location, columns))
    if not records:
        raise UserError(f"{name}: no prompts found (empty file)")
    return records


def describe_skipped(skipped: list[DataError], limit: int = 10) -> str:
    """One line for the log: how many records were skipped, the first `limit` in full."""
    if not skipped:
        return "skipped no invalid records"
    noun = "record" if len(skipped) == 1 else "records"
    shown = "; ".join(str(error) for error in skipped[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"skipped {len(skipped)} invalid {noun}: {shown}{more}"


def describe_blank(pairs: Sequence[PreferencePair], limit: int = 5) -> str:
    """One line for the log: how many completions are empty or whitespace-only, and where the first `limit` are
    (each "source: location (field)"). They are trained on, not dropped: the notice says so, and how they count."""
    places = [(pair, field) for pair in pairs for field in pair.blank_completions]
    if not places:
        return "no empty or whitespace-only completions"
    noun = "completion is" if len(places) == 1 else "completions are"
    shown = "; ".join(f"{pair.source}: {pair.location} ({field})" for pair, field in places[:limit])
    more = f"; and {len(places) - limit} more" if len(places) > limit else ""
    return (f"note: {len(places)} {noun} empty or whitespace-only, kept and scored as TRL does, by the tokens "
            f"that end a reply (EOS after plain text, the chat template's end of turn after messages): {shown}{more}")
