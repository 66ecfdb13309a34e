"""Writing result records (generate, score, judge) as JSON Lines or CSV, to a file or stdout."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from preftune.errors import UserError


def write_records(records: Sequence[dict], output: str | None) -> None:
    """`.csv` -> CSV with a header (nested values as JSON); anything else -> JSON Lines; None -> stdout."""
    if output is not None and Path(output).suffix.lower() == ".csv":
        buffer = io.StringIO()
        columns = list(dict.fromkeys(key for record in records for key in record))
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in record.items()})
        text = buffer.getvalue()
    else:
        text = "".join(json.dumps(record) + "\n" for record in records)
    if output is None:
        sys.stdout.write(text)
        return
    path = Path(output)
    if path.exists():
        raise UserError(f"--output {output} exists; choose another name (nothing is overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {len(records)} records to {output}", file=sys.stderr)
