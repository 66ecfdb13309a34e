"""Peak memory of one RLOO step against the rollout's size: one rollout step of `preftune rloo` on the default model
(SmolLM2-135M-Instruct, or --model) for rollouts of --samples completions (16, 64 and 256 by default), each in a
process of its own; prints one JSON object.

Each process trains the default job's RLOO (its training prompts, k = 2 samples per prompt, so --samples / 2 prompts
per rollout, --max-new-tokens 64 new tokens at most, the VADER sentiment reward, fp32, no gradient checkpointing)
for one rollout step: sampling with the sampler's own log-probs, the reference's log-probs, the reward, the
leave-one-out advantages, one minibatch of the whole rollout (--num-mini-batches 1, one epoch): its forward and
backward, the optimizer step. Every forward holds at most --local-rollout-forward-batch-size samples (16 by
default); 0 runs without the option, for code that has none (today's main: `PYTHONPATH=/path/to/main`).

Reported per rollout size: the process's peak RSS after setup (the policy, the reference, the tokenizer, the
prompts; the kernel's high-water mark, getrusage), after the rollout (sampling, log-probs, reward) and after the
step (the AdamW state is created at the first optimizer step), the step's seconds and completion tokens, and the
spread of the step peaks, (max - min) / min. Also the machine's fp32 matmul GFLOP/s (a 2048 x 2048 matmul, best of
6) and the MALLOC_* environment the workers inherit: glibc keeps freed memory of mid-size allocations in its heap
(its mmap threshold rises to 32 MB as large blocks are freed), so the RSS high-water mark grows with the number of
micro-batches unless MALLOC_MMAP_THRESHOLD_ fixes the threshold (then every block above it is returned when freed).

--ppo: peak RSS and seconds per rollout of `preftune ppo`, full against --lora, each the CLI in a process of its own
(peak RSS: the process's high-water mark, as `/usr/bin/time -v` reports it): the default job's prompts against a
reward model (--reward and --value-model: the default model with a new one-output head, untrained, the size of a
trained one; the held-out reward is VADER's sentiment), 3 rollouts of 8 prompts x 2 samples, 2 epochs each, 4
held-out prompts (to keep it short), the default job's 24 new tokens and the library's defaults otherwise. Seconds
per rollout: between consecutive rollouts' lines in metrics.jsonl (the first rollout's includes no setup).

Examples:
    .venv/bin/python benchmarks/bench_rollout_memory.py --output rollout-memory.json
    .venv/bin/python benchmarks/bench_rollout_memory.py --ppo --output ppo-memory.json   # full vs --lora
    PYTHONPATH=/path/to/main .venv/bin/python benchmarks/bench_rollout_memory.py --samples 16 64 \\
        --local-rollout-forward-batch-size 0        # code without the option
    .venv/bin/python benchmarks/bench_rollout_memory.py --smoke   # a tiny random model: runs, not numbers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from bench_rloo_vs_trl import model_under_test
from bench_vs_trl import matmul_peak_gflops
from worker_process import peak_rss_kb, run_side


def run_worker(samples: int, args: argparse.Namespace, folder: Path) -> dict:
    """One rollout step of `samples` completions in its own process (its own peak RSS)."""
    result_file = folder / f"rloo-{samples}.json"
    command = [sys.executable, __file__, "--worker", str(samples), "--model", args.model, "--max-new-tokens",
               str(args.max_new_tokens), "--local-rollout-forward-batch-size",
               str(args.local_rollout_forward_batch_size), "--result", str(result_file), "--work-dir", str(folder)]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    return run_side(command, f"rloo with {samples} samples", result_file, args.verbose)


def gigabytes(kilobytes: int) -> float:
    return round(kilobytes / 1024**2, 3)


# --ppo's held-out prompts (tests/conftest.py's pairs: the prompts are what is sampled from)
EVAL_PAIRS = [
    {"prompt": "The movie was", "chosen": " wonderful and moving.", "rejected": " dull."},
    {"prompt": "I think the ending", "chosen": " was perfect", "rejected": " was rushed and silly, sadly"},
    {"prompt": "Review:", "chosen": " A delight from start to finish.", "rejected": " A mess."},
    {"prompt": "Honestly, this film", "chosen": " made me smile", "rejected": " bored me to tears"},
]


def untrained_reward_model(model: str, folder: Path) -> Path:
    """`model` with a new one-output sequence-classification head (seed 0), saved with its tokenizer in `folder`:
    a reward model the size of a trained one, for --reward and --value-model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    reward_model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    reward_model.config.pad_token_id = reward_model.config.eos_token_id
    reward_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    return folder


def ppo_command(args: argparse.Namespace, folder: Path, reward_model: Path, lora: bool) -> list[str]:
    command = [sys.executable, "-m", "preftune.cli", "ppo", "--output-dir", str(folder / ("lora" if lora else "full")),
               "--reward", str(reward_model), "--value-model", str(reward_model), "--eval-reward", "sentiment",
               "--max-steps", str(args.ppo_steps), "--num-ppo-epochs", "2", "--report-to", "none",
               "--eval-data", str(folder / "eval.jsonl"), "--model", args.model]
    if args.smoke:
        command += ["--max-new-tokens", str(args.max_new_tokens)]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    return [*command, "--lora"] if lora else command


def run_ppo_side(command: list[str], run_dir: Path, verbose: bool) -> dict:
    """`command` in a process of its own: its peak RSS (the kernel's accounting of that process, os.wait4), wall
    seconds, and the seconds between consecutive rollouts (the times of metrics.jsonl's per-rollout lines)."""
    started = time.time()
    with open(run_dir.parent / f"{run_dir.name}.err", "w+") as errors:
        process = subprocess.Popen(command, stdout=None if verbose else subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            errors.seek(0)
            sys.exit(f"{' '.join(command[3:])} failed:\n{errors.read()[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [row["time"] for row in rows if "loss/policy" in row]  # a line per rollout (--logging-steps 1)
    return {"peak_rss_kb": usage.ru_maxrss, "peak_rss_gb": gigabytes(usage.ru_maxrss),
            "wall_seconds": round(time.time() - started, 1), "rollouts": len(times),
            "seconds_per_rollout": [round(b - a, 1) for a, b in zip(times, times[1:])]}


def ppo_report(args: argparse.Namespace, folder: Path) -> dict:
    """Full PPO, then --lora, each in its own process (never together); see the module's docstring."""
    (folder / "eval.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in EVAL_PAIRS))
    reward_model = untrained_reward_model(args.model, folder / "reward-model")
    sides = {}
    for lora in (False, True):
        command = ppo_command(args, folder, reward_model, lora)
        sides["lora" if lora else "full"] = run_ppo_side(command, folder / ("lora" if lora else "full"), args.verbose)
    return {"settings": {"model": "tiny random Llama (--smoke)" if args.smoke else args.model, "recipe": "ppo",
                         "command": "preftune ppo --reward RM --value-model RM --eval-reward sentiment --max-steps "
                                    f"{args.ppo_steps} --num-ppo-epochs 2 --report-to none --eval-data eval.jsonl "
                                    "[--lora]", "reward_model": "the model with a new one-output head, untrained"},
            "ppo": sides,
            "lora_over_full_peak_rss": round(sides["lora"]["peak_rss_gb"] / sides["full"]["peak_rss_gb"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=None,
                        help="rollout sizes, in completions (even: 2 per prompt; default 16 64 256; --smoke: 4 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64; --smoke: 4")
    parser.add_argument("--local-rollout-forward-batch-size", type=int, default=None,
                        help="samples per forward (default 16; --smoke: 2); 0: leave the option out")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--cache-dir", default=None, help="preftune's cache (the converted default model)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, rollouts of 4 and 8, 4 new "
                        "tokens: checks that it runs; the numbers mean nothing")
    parser.add_argument("--ppo", action="store_true", help="instead: `preftune ppo` full against --lora (peak RSS, "
                        "seconds per rollout)")
    parser.add_argument("--ppo-steps", type=int, default=None, help="--ppo's rollouts (default 3; --smoke: 2)")
    parser.add_argument("--verbose", action="store_true", help="show the workers' output")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # the rollout's size
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.samples = args.samples or ([4, 8] if args.smoke else [16, 64, 256])
    args.max_new_tokens = args.max_new_tokens or (4 if args.smoke else 64)
    args.ppo_steps = args.ppo_steps or (2 if args.smoke else 3)
    if args.local_rollout_forward_batch_size is None:
        args.local_rollout_forward_batch_size = 2 if args.smoke else 16
    if args.worker:
        worker(args)
        return
    if any(n < 2 or n % 2 for n in args.samples):
        sys.exit("--samples: even numbers of completions (2 per prompt)")

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-rollout-memory-") as tmp:
        folder = Path(tmp)
        args.model = model_under_test(args, folder)
        report = {"date": date.today().isoformat(), "machine": machine(),
                  **(ppo_report(args, folder) if args.ppo else rollouts_report(args, folder))}
    report["seconds"] = round(time.time() - started)
    text = json.dumps(report, indent=2)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(text)


def machine() -> dict:
    """The machine and the software: its fp32 matmul GFLOP/s, and the MALLOC_* environment the workers inherit."""
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "matmul_fp32_gflops": round(matmul_peak_gflops(), 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


def rollouts_report(args: argparse.Namespace, folder: Path) -> dict:
    """One RLOO step per rollout size, each in its own process, one after the other."""
    report = {
        "settings": {"model": "tiny random Llama (--smoke)" if args.smoke else args.model, "recipe": "rloo",
                     "num_generations": 2, "max_new_tokens": args.max_new_tokens,
                     "local_rollout_forward_batch_size": args.local_rollout_forward_batch_size or None,
                     "num_mini_batches": 1, "num_ppo_epochs": 1, "dtype": "float32", "reward": "sentiment"},
        "rollouts": {},
    }
    for samples in args.samples:  # one after the other, never together
        result = run_worker(samples, args, folder)
        report["rollouts"][str(samples)] = {
            "setup_peak_rss_gb": gigabytes(result["setup_peak_rss_kb"]),
            "rollout_peak_rss_gb": gigabytes(result["rollout_peak_rss_kb"]),
            "step_peak_rss_gb": gigabytes(result["step_peak_rss_kb"]),
            "step_seconds": round(result["step_seconds"], 1),
            "completions": result["completions"], "completion_tokens": result["completion_tokens"],
            "wall_seconds": result["wall_seconds"],
        }
    peaks = [r["step_peak_rss_gb"] for r in report["rollouts"].values()]
    report["step_peak_spread"] = round((max(peaks) - min(peaks)) / min(peaks), 3)  # 0.15: within 15%
    return report


def worker(args: argparse.Namespace) -> None:
    """One rollout step of `args.worker` completions (online.train's step, without logging, evaluation or
    checkpoints); writes the peak RSS after setup and after the step."""
    from preftune.cli import build_config, build_parser
    from preftune.recipes import online, rloo

    argv = ["rloo", "--model", args.model, "--output-dir", str(args.work_dir / f"run-{args.worker}"), "--overwrite",
            "--max-steps", "1", "--rollout-batch-size", str(args.worker // 2), "--num-generations", "2",
            "--num-ppo-epochs", "1", "--num-mini-batches", "1", "--max-new-tokens", str(args.max_new_tokens),
            "--reward", "sentiment", "--no-bf16", "--no-gradient-checkpointing", "--report-to", "none",
            "--save-steps", "0"]
    if args.local_rollout_forward_batch_size:
        argv += ["--local-rollout-forward-batch-size", str(args.local_rollout_forward_batch_size)]
    if args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    run = rloo.setup(build_config(build_parser().parse_args(argv)))
    setup_peak = peak_rss_kb()
    try:
        run.model.train()
        began = time.perf_counter()
        rollout = online.collect(run, online.step_positions(run))
        run.objective.score(run, rollout)
        rollout_peak = peak_rss_kb()
        online.optimise(run, rollout)
        run.scheduler.step()
        seconds = time.perf_counter() - began
    finally:
        online.cleanup(run)
    args.result.write_text(json.dumps({
        "setup_peak_rss_kb": setup_peak, "rollout_peak_rss_kb": rollout_peak, "step_peak_rss_kb": peak_rss_kb(),
        "step_seconds": seconds,
        "completions": len(rollout.samples),
        "completion_tokens": sum(len(s.completion_ids) for s in rollout.samples)}))


if __name__ == "__main__":
    main()
