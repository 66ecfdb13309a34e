"""Data parallel (DDP) against FSDP2 on CPU processes: the same model, data and steps; prints one JSON object.

Each engine trains the embedded SmolLM2-135M-Instruct for a few steps in N processes (gloo), launched as
`accelerate launch --config_file configs/accelerate/<config>.yaml` would launch them (its FSDP settings), and
reports: median seconds per step after the first, the peak RSS of the largest process (the whole process tree's
largest resident set, from getrusage), and a per-step metric that must agree across engines (the loss; for RLOO
objective/kl, as its policy loss is 0 to rounding at ratio 1: leave-one-out advantages sum to 0 per prompt).
`--recipe`: DPO (`train`, on the pairs) or an online recipe (`rloo`, `online-dpo`: rollouts of the pairs'
prompts, --batch-size prompts per process, --max-new-tokens each, scored by the default reward), one optimizer
step per rollout.
What FSDP saves per process is the slice of weights, gradients and Adam moments it no longer holds: with N
processes, (N - 1) / N of 16 bytes per policy parameter plus 4 per reference parameter, less what the gathered
layers cost while they are in use.

Needs the HH-RLHF file in ../shared/data (or --data). Example:
    .venv/bin/python benchmarks/bench_sharding.py                      # ddp, fsdp, fsdp-shard-grad-op; 2 processes
    .venv/bin/python benchmarks/bench_sharding.py --engines ddp fsdp --steps 4
    .venv/bin/python benchmarks/bench_sharding.py --recipe rloo --engines ddp fsdp --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
ENGINES = ("ddp", "fsdp", "fsdp-shard-grad-op")
COMPARED = {"train": "loss", "rloo": "objective/kl", "online-dpo": "loss"}  # the per-step metric engines must agree on

# Runs `argv` and prints the largest resident set of any process it started (kB on Linux), as JSON.
MEASURE = """
import json, resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(json.dumps({"exit_code": code, "max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def launch_environment(engine: str, processes: int) -> dict[str, str]:
    """The FSDP variables `accelerate launch --config_file configs/accelerate/<engine>.yaml` sets; none for DDP."""
    if engine == "ddp":
        return {}
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = REPO / "configs" / "accelerate" / f"{engine}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", str(processes),
                                               "--mixed_precision", "no", "unused.py"])
    environment = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in environment.items() if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")}


def run(engine: str, args: argparse.Namespace, folder: Path) -> dict:
    output = folder / engine
    model = ["--model", args.model] if args.model else []
    sizes = (["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)] if args.recipe == "train"
             else ["--rollout-batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
                   "--num-mini-batches", "1"])
    command = [sys.executable, "-m", "preftune.cli", args.recipe, *model, "--data", str(args.data), "--num-processes",
               str(args.processes), *sizes, "--max-steps", str(args.steps), "--logging-steps", "1", "--no-shuffle",
               "--skip-invalid", "--output-dir", str(output)]
    environment = {**os.environ, **launch_environment(engine, args.processes)}
    finished = subprocess.run([sys.executable, "-c", MEASURE, *command], env=environment, capture_output=True,
                              text=True, cwd=REPO)
    if finished.returncode != 0 or '"exit_code": 0' not in finished.stdout:
        sys.exit(f"{engine} failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
    measured = json.loads(finished.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if COMPARED[args.recipe] in r]
    seconds = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])]
    return {
        "seconds_per_step": round(statistics.median(seconds), 2),
        "peak_rss_gb_largest_process": round(measured["max_rss_kb"] / 1e6, 2),
        "per_step": [round(r[COMPARED[args.recipe]], 6) for r in steps],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(COMPARED), default="train", help="what each engine runs")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", help="a model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs (online: prompts) per process per step")
    parser.add_argument("--max-length", type=int, default=512, help="train: tokens per pair")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="online recipes: tokens per completion")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"no data at {args.data}; pass --data")
    with tempfile.TemporaryDirectory(prefix="bench-sharding-") as folder:
        results = {engine: run(engine, args, Path(folder)) for engine in args.engines}
    per_step = [r["per_step"] for r in results.values()]
    print(json.dumps({
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": args.model or "SmolLM2-135M-Instruct (embedded), fp32",
        "recipe": args.recipe, "processes": args.processes, "batch_size_per_process": args.batch_size,
        **({"max_length": args.max_length} if args.recipe == "train" else {"max_new_tokens": args.max_new_tokens}),
        "steps": args.steps,
        "compared": COMPARED[args.recipe],
        "max_difference_between_engines": max(abs(a - b) for run in per_step[1:] for a, b in zip(per_step[0], run))
        if len(per_step) > 1 else 0.0,
        "engines": results,
    }, indent=1))


if __name__ == "__main__":
    main()
