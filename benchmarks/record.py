"""Run a measuring command and keep what it wrote, with when, where and how, as one JSON result file: the input of
the documentation's results pages (docs/generate.py renders them; tests/test_docs.py checks the committed pages).

    python benchmarks/record.py docs/results/default-job.json --collect WORKDIR/run/sentiment_report.json -- \\
        preftune train --output-dir WORKDIR/run
    python benchmarks/record.py docs/results/rloo-vs-trl.json -- python benchmarks/bench_rloo_vs_trl.py

The result file holds:
  command       the command as given (WORKDIR standing for a fresh temporary folder the command writes into);
  date          the UTC date it started; wall_seconds, how long it ran;
  machine       cores, CPU model, memory, the fp32 matmul rate measured just before (GFLOP/s: the best of a few
                2048 x 2048 x 2048 products on all threads, as benchmarks/bench_vs_trl.py measures its peak), Python,
                torch and the commit of the code measured;
  stdout        the command's standard output, parsed when it is JSON (the benchmarks print one JSON object);
  files         each --collect file: JSON parsed, CSV as a list of rows (dicts of strings).
`preftune` as the command's first word runs this interpreter's `preftune.cli`, `python` this interpreter.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = "WORKDIR"  # in the command and --collect paths: the temporary folder the command writes into


def matmul_gflops(size: int = 2048, repeats: int = 6) -> float:
    """The best fp32 rate of `repeats` (size x size) @ (size x size) products on all threads, in GFLOP/s (2 n^3
    FLOPs a product)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """Total memory in GiB from /proc/meminfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def commit() -> str | None:
    """The git commit of the code measured, with '+changes' when the package or the benchmarks in the work tree
    differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "preftune", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def describe_machine() -> dict:
    """Where a measurement ran: cores, CPU, memory, measured fp32 matmul GFLOP/s, Python, torch, the commit."""
    import torch

    return {
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu_model(),
        "memory_gib": memory_gib(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "matmul_fp32_gflops": round(matmul_gflops(), 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit(),
    }


def executable(command: list[str]) -> list[str]:
    """The command as run: `preftune ...` through this interpreter's CLI module, `python ...` this interpreter."""
    if command[0] == "preftune":
        return [sys.executable, "-m", "preftune.cli", *command[1:]]
    if command[0] in ("python", "python3"):
        return [sys.executable, *command[1:]]
    return command


def read_collected(path: Path) -> object:
    """A collected file's content: JSON parsed, CSV as rows, anything else as text."""
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    return path.read_text(encoding="utf-8")


def parsed_stdout(text: str) -> object:
    """The command's output as JSON when it is one JSON value, else its text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def record(output: Path, command: list[str], collect: list[str]) -> dict:
    """Run `command` (WORKDIR replaced by a fresh temporary folder), then write `output`: the result file."""
    machine = describe_machine()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="preftune-record-") as workdir:
        run = [part.replace(WORKDIR, workdir) for part in executable(command)]
        completed = subprocess.run(run, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if completed.returncode != 0:
            sys.exit(f"the command exited with {completed.returncode}; nothing recorded")
        files = {Path(name).name: read_collected(Path(name.replace(WORKDIR, workdir))) for name in collect}
    result = {
        "command": shlex.join(command),
        "date": datetime.fromtimestamp(started, UTC).date().isoformat(),
        "wall_seconds": round(time.time() - started, 1),
        "machine": machine,
        "stdout": parsed_stdout(completed.stdout),
        "files": files,
    }
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: record.py OUTPUT.json [--collect FILE ...] -- COMMAND ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s OUTPUT.json [--collect FILE ...] -- COMMAND ...")
    parser.add_argument("output", type=Path, help="the result file to write (JSON)")
    parser.add_argument("--collect", action="append", default=[], metavar="FILE",
                        help="a file the command writes (WORKDIR/...) to keep in the result; repeatable")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command after --")
    result = record(args.output, command, args.collect)
    print(f"recorded {result['command']} ({result['wall_seconds']:.0f} s) in {args.output}", flush=True)


if __name__ == "__main__":
    main()
