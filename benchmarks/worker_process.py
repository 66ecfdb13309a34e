"""What the side-by-side benchmarks share: running one side in a process of its own, whose peak RSS is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_side(command: list[str], label: str, result_file: Path, verbose: bool) -> dict:
    """Run a worker command that writes its JSON result to `result_file`; the result with its wall time. Exits with
    the worker's stderr tail if it fails."""
    started = time.time()
    process = subprocess.Popen(command, stdout=None if verbose else subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    _, stderr = process.communicate()
    if process.returncode:
        sys.exit(f"{label} failed:\n{stderr[-4000:]}")
    result = json.loads(result_file.read_text())
    result["wall_seconds"] = round(time.time() - started, 1)
    return result


def peak_rss_kb() -> int:
    """This process's peak resident memory so far, from the kernel's accounting."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
