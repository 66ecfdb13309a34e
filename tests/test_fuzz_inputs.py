"""Malformed inputs through the CLI: always exit code 2, a message naming the file (and the record, where there
is one), never a traceback. Property-based over JSONL, JSON, CSV and Parquet."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.cli import main
from preftune.data.read import ROLES
from tests.conftest import PAIRS

pytestmark = pytest.mark.slow  # dozens of generated files through the CLI each: the full suite runs them

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# a value that cannot be a record: anything but an object holding both chosen and rejected
garbage_records = json_values.filter(lambda v: not (isinstance(v, dict) and {"chosen", "rejected"} <= v.keys()))
not_text = st.none() | st.integers() | st.floats(allow_nan=True) | st.booleans() | st.lists(st.integers(), max_size=3)
unknown_roles = st.text(min_size=1, max_size=10).filter(lambda r: r not in ROLES)


@st.composite
def bad_records(draw) -> dict | object:
    """One record that must be rejected, with a known field problem."""
    base = dict(draw(st.sampled_from(PAIRS)))
    kind = draw(st.sampled_from(["garbage", "wrong_type", "missing", "empty", "identical", "role", "content"]))
    if kind == "garbage":
        return draw(garbage_records)
    field = draw(st.sampled_from(["prompt", "chosen", "rejected"]))
    if kind == "wrong_type":
        base[field] = draw(not_text)
    elif kind == "missing":
        del base[draw(st.sampled_from(["chosen", "rejected"]))]
    elif kind == "empty":  # only a prompt: an empty or whitespace-only completion is a valid answer
        base["prompt"] = draw(st.sampled_from(["", " ", "\n\t"]))
    elif kind == "identical":
        base["rejected"] = base["chosen"]
    else:
        message = {"role": "user", "content": "hi"}
        if kind == "role":
            message["role"] = draw(unknown_roles)
        else:
            message["content"] = draw(not_text)
        base = {"prompt": [message], "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}]}
    return base


def run_cli(path: Path, capsys) -> str:
    """`preftune eval` on the file with a model that does not exist: the data must be refused first."""
    capsys.readouterr()
    code = main(["eval", "--data", str(path), "--model", str(path.parent / "no-such-model")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert path.name in err, err
    return err


def write_lines(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@FUZZ
@given(
    position=st.integers(0, len(PAIRS)),
    corruption=st.one_of(
        bad_records().map(lambda r: json.dumps(r).encode()),
        st.integers(1, 40).map(lambda n: json.dumps(PAIRS[0]).encode()[:n]),  # truncated line
        st.binary(min_size=1, max_size=8).map(lambda b: b'{"prompt": "x\xff' + b + b'"}'),  # not UTF-8
        st.integers(100_000, 2_000_000).map(lambda n: b"[" * 3 + b"a" * n),  # huge line of nonsense
    ),
    gz=st.booleans(),
)
def test_jsonl(position, corruption, gz, capsys):
    lines = [json.dumps(p).encode() for p in PAIRS]
    lines.insert(position, corruption)
    with tempfile.TemporaryDirectory() as folder:
        path = write_lines(Path(folder) / ("pairs.jsonl.gz" if gz else "pairs.jsonl"), lines)
        err = run_cli(path, capsys)
        assert f"line {position + 1}" in err, err


@FUZZ
@given(position=st.integers(0, len(PAIRS)), record=bad_records(), cut=st.integers(1, 200), truncate=st.booleans())
def test_json(position, record, cut, truncate, capsys):
    records: list = list(PAIRS)
    records.insert(position, record)
    text = json.dumps(records).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.json"
        path.write_bytes(text[: len(text) - cut] if truncate else text)
        err = run_cli(path, capsys)
        if not truncate:
            assert f"record {position + 1}" in err, err


@FUZZ
@given(
    position=st.integers(0, len(PAIRS)),
    row=st.one_of(
        st.just(b"only one field"),
        st.just(b'"x","",""'),
        st.just(b'"same","a","a"'),
        st.binary(min_size=1, max_size=6).map(lambda b: b'"x\xff' + b + b'","a","b"'),
    ),
)
def test_csv(position, row, capsys):
    lines = [b"prompt,chosen,rejected"] + [
        ",".join(json.dumps(p[k]) for k in ("prompt", "chosen", "rejected")).encode() for p in PAIRS
    ]
    lines.insert(position + 1, row)
    with tempfile.TemporaryDirectory() as folder:
        path = write_lines(Path(folder) / "pairs.csv", lines)
        err = run_cli(path, capsys)
        assert f"line {position + 2}" in err, err


@FUZZ
@given(
    position=st.integers(0, len(PAIRS)),
    bad=st.sampled_from(["null", "identical", "empty"]),
    truncate=st.integers(0, 300),
)
def test_parquet(position, bad, truncate, capsys):
    rows = [dict(p) for p in PAIRS]
    broken = dict(PAIRS[0])
    if bad == "null":
        broken["chosen"] = None
    elif bad == "identical":
        broken["rejected"] = broken["chosen"]
    else:
        broken["prompt"] = "  "
    rows.insert(position, broken)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        if truncate:
            path.write_bytes(path.read_bytes()[:-truncate])
        err = run_cli(path, capsys)
        if not truncate:
            assert f"row {position + 1}" in err, err


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\x1f\x8b\x08garbage"])
def test_empty_or_broken_gzip(tmp_path, content, capsys):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(content)
    run_cli(path, capsys)

