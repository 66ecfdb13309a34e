"""SIGTERM and SIGINT as a request to stop after the current step (pre-emption sends SIGTERM)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from preftune.errors import RunInterrupted


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], int | None]]:
    """While active, SIGTERM and SIGINT only ask the loop to stop after the current optimizer step. Yields a
    function giving the signal received, if any. A second SIGINT stops at once."""
    received: list[int] = []

    def handler(signal_number: int, frame: object) -> None:
        if received and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signal_number)
        print(f"\nreceived {signal.Signals(signal_number).name}: stopping after this step", flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: received[0] if received else None
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def interruption(step: int, total_steps: int, checkpoint: Path, command: str, config_file: Path,
                 received: int | None) -> RunInterrupted:
    """What a loop raises after a signal stopped it at `step` and it wrote `checkpoint`: how to resume."""
    return RunInterrupted(f"stopped at step {step} of {total_steps}; checkpoint {checkpoint}. Resume with:\n"
                          f"  preftune {command} --config {config_file} --resume", received or signal.SIGTERM)
