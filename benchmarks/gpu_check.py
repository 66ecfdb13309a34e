"""GPU check: a few DPO steps in bf16 (SDPA, and flash-attention 2 when installed) against the same steps in fp32
on the same machine; prints one JSON object: the first step's log-probs compared with fp32, the losses of each
run, and throughput (seconds per step after the first, pairs per second).

Run on a machine with a CUDA GPU (it also runs on CPU, slowly, to check the script itself):
    bash benchmarks/gpu_check.sh            # or: python benchmarks/gpu_check.py --steps 8 --batch-size 8
Not used by CI.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from preftune.cli import main as preftune

SUBJECTS = ["the film", "this novel", "the new phone", "our hotel", "the concert", "that restaurant", "the course",
            "this game"]


def write_pairs(path: Path, count: int) -> None:
    """Conversational pairs with a clear preference, enough for a few steps (no sampling needed)."""
    with path.open("w") as out:
        for i in range(count):
            subject = SUBJECTS[i % len(SUBJECTS)]
            out.write(json.dumps({
                "prompt": [{"role": "user", "content": f"In one sentence, what did you think of {subject} (#{i})?"}],
                "chosen": [{"role": "assistant", "content": f"I loved {subject}: it was warm, clever and moving."}],
                "rejected": [{"role": "assistant", "content": f"I hated {subject}; it was dull and a waste."}],
            }) + "\n")


def run(folder: Path, data: Path, name: str, steps: int, batch_size: int, extra: list[str]) -> dict:
    out = folder / name
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON report
        code = preftune(["train", "--data", str(data), "--output-dir", str(out), "--max-steps", str(steps),
                         "--batch-size", str(batch_size), "--no-shuffle", "--learning-rate", "1e-6", "--warmup-ratio",
                         "0", "--max-length", "256", *extra])
    if code != 0:
        raise SystemExit(f"{name} run failed with exit code {code}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    times = [r["time"] for r in rows]
    seconds_per_step = (times[-1] - times[1]) / (len(times) - 2) if len(times) > 2 else float("nan")
    return {"losses": [r["loss"] for r in rows], "first_logps_chosen": rows[0]["logps/chosen"],
            "seconds_per_step_after_warmup": seconds_per_step,
            "pairs_per_second": batch_size / seconds_per_step, "wall_seconds": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    report: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "pairs.jsonl"
        write_pairs(data, args.steps * args.batch_size)
        runs = {"fp32_sdpa": [], "bf16_sdpa": ["--bf16"]}
        if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
            runs["bf16_flash_attention_2"] = ["--bf16", "--attn-implementation", "flash_attention_2",
                                              "--batch-layout", "padded"]
        for name, extra in runs.items():
            extra = ["--attn-implementation", "sdpa", *extra] if "--attn-implementation" not in extra else extra
            report[name] = run(folder, data, name, args.steps, args.batch_size, extra)
    reference = report["fp32_sdpa"]["losses"]
    for name in runs:
        losses = report[name]["losses"]
        report[name]["max_abs_loss_difference_vs_fp32"] = max(abs(a - b) for a, b in zip(losses, reference))
        first, first_fp32 = report[name]["first_logps_chosen"], report["fp32_sdpa"]["first_logps_chosen"]
        report[name]["first_logps_relative_difference_vs_fp32"] = abs(first - first_fp32) / abs(first_fp32)
    # The check: the same forward in bf16 agrees with fp32 to bf16's precision (summed log-probs to ~1%), and
    # bf16 training stays finite. The loss trajectories are reported but not compared: the embedded default's
    # weights are de-quantized GGUF values, many of which sit exactly on bfloat16 rounding ties, so under bf16
    # autocast even a 1e-8 update flips them by a whole bf16 step and the bf16 run moves far faster than fp32.
    report["bf16_matches_fp32"] = all(
        report[name]["first_logps_relative_difference_vs_fp32"] < 2e-2
        and all(math.isfinite(x) for x in report[name]["losses"])
        for name in runs
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
