"""`preftune grpo` against TRL 1.16's GRPOTrainer: the same model, prompts, G, batch and settings, each side in its
own process, one after the other; prints one JSON object (bench_rloo_vs_trl.py's harness and summary).

Both sides train GRPO with TRL's defaults on the default job's training prompts (the embedded SmolLM2-135M-Instruct
or --model; chat messages in the same order on both sides: TRL's `shuffle_dataset=False`, preftune's `--no-shuffle`):
G = --num-generations samples per prompt, --prompts-per-step prompts per step, one optimizer step per rollout on the
whole rollout (TRL: per_device_train_batch_size = prompts x G, gradient_accumulation_steps=1,
steps_per_generation=1, num_iterations=1; preftune: --rollout-batch-size prompts, --num-iterations 1,
--num-mini-batches 1), --max-new-tokens new tokens at most, temperature 1, loss_type dapo, beta 0 (no reference
model on either side), scale_rewards group, epsilon 0.2, learning rate 1e-5 on a linear decay with no warmup,
AdamW, gradient clipping at 1.0, fp32 weights and compute, dropout off, no activation checkpointing (TRL's default
is on: turned off here, as preftune's), no evaluation, no checkpoints, no trackers. Reward: VADER's compound
sentiment of the completion (preftune's `--reward sentiment`; on the TRL side a reward function calling the same
scorer on the decoded completion).

Per step each side: sample G completions per prompt (HF `generate`, KV-cached), the reward, the group advantages,
one forward and backward of the policy (with the per-token entropy, a metric on both sides), clipping, the
optimizer and scheduler steps. With num_iterations=1 neither side runs a separate "old" log-prob forward (TRL uses
the detached current log-probs; preftune the same on the first minibatch). Sampling streams differ (TRL: the global
RNG; preftune: a seed per sample), so completions and their lengths differ: hence tokens/s beside steps/s.
Timing as bench_rloo_vs_trl.py: TRL's on_step_begin -> on_step_end, preftune's collect -> score -> optimise ->
scheduler step; the first step is left out as warm-up.

Needs TRL (`pip install -e '.[dev]'`). Example:
    .venv/bin/python benchmarks/bench_grpo.py                       # 6 steps, 4 prompts x 4, 24 new tokens
    .venv/bin/python benchmarks/bench_grpo.py --smoke               # a tiny random model: runs, not numbers
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from bench_rloo_vs_trl import model_under_test, summarise, synchronize
from worker_process import peak_rss_kb, run_side

SIDES = ("trl", "preftune")
LEARNING_RATE = 1e-5
EPSILON = 0.2
MAX_GRAD_NORM = 1.0
WARMUP_STEPS = 1  # left out of the timings


def run_worker(side: str, args: argparse.Namespace, folder: Path) -> dict:
    """One side in its own process (which reports its own peak RSS)."""
    result_file = folder / f"{side}.json"
    command = [sys.executable, __file__, "--worker", side, "--model", args.model, "--steps", str(args.steps),
               "--prompts-per-step", str(args.prompts_per_step), "--num-generations", str(args.num_generations),
               "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--result", str(result_file),
               "--work-dir", str(folder)]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    return run_side(command, side, result_file, args.verbose)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="rollout steps per side, the first a warm-up "
                        "(default 6; --smoke: 2)")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4, help="G, samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 24 (the default job's); --smoke: 4")
    parser.add_argument("--seed", type=int, default=42, help="preftune's default")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--cache-dir", default=None, help="preftune's cache (the converted default model)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, 2 steps, 4 new tokens: checks "
                        "that both sides run; the numbers mean nothing")
    parser.add_argument("--verbose", action="store_true", help="show the workers' output")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.smoke else 6)
    args.max_new_tokens = args.max_new_tokens or (4 if args.smoke else 24)
    return args


def main() -> None:
    args = parse_arguments()
    if args.worker:
        (worker_trl if args.worker == "trl" else worker_preftune)(args)
        return
    if args.steps <= WARMUP_STEPS:
        sys.exit(f"--steps must be more than the {WARMUP_STEPS} warm-up step")
    if args.num_generations < 2:
        sys.exit("--num-generations must be at least 2 (the group baseline)")

    import transformers
    import trl

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        folder = Path(tmp)
        args.model = model_under_test(args, folder)
        report = {
            "date": date.today().isoformat(),
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                        "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "trl": trl.__version__},
            "settings": {"model": "tiny random Llama (--smoke)" if args.smoke else args.model, "steps": args.steps,
                         "warmup_steps_left_out": WARMUP_STEPS, "prompts_per_step": args.prompts_per_step,
                         "num_generations": args.num_generations,
                         "completions_per_step": args.prompts_per_step * args.num_generations,
                         "max_new_tokens": args.max_new_tokens, "learning_rate": LEARNING_RATE, "loss_type": "dapo",
                         "beta": 0.0, "scale_rewards": "group", "epsilon": EPSILON, "max_grad_norm": MAX_GRAD_NORM,
                         "temperature": 1.0, "seed": args.seed, "dtype": "float32",
                         "reward": "sentiment (VADER compound of the completion)"},
        }
        results = {side: run_worker(side, args, folder) for side in SIDES}  # one after the other, never together
    prompts = {side: results[side].pop("prompts") for side in SIDES}
    for side in SIDES:
        report[side] = summarise(results[side], WARMUP_STEPS)
    ours, theirs = report["preftune"], report["trl"]
    report["same_prompts_each_step"] = prompts["preftune"] == prompts["trl"]
    report["ratios"] = {  # preftune / TRL: above 1, preftune is faster (or, for peak RSS, larger)
        "steps_per_second": round(ours["steps_per_second"] / theirs["steps_per_second"], 3),
        "completion_tokens_per_second": round(ours["completion_tokens_per_second"]
                                              / theirs["completion_tokens_per_second"], 3),
        "peak_rss": round(ours["peak_rss_gb"] / theirs["peak_rss_gb"], 3) if theirs["peak_rss_gb"] else None,
    }
    report["seconds"] = round(time.time() - started)
    text = json.dumps(report, indent=2)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(text)


# ---- the workers: one training run each, timings per rollout step ------------------------------------------

def worker_trl(args: argparse.Namespace) -> None:
    import warnings

    from datasets import Dataset, disable_progress_bars
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from preftune.config import Config
    from preftune.data.prompts import prompt_text
    from preftune.forward.rewards import sentiment_reward
    from preftune.tasks.sentiment import make_prompts

    setup_started = time.perf_counter()
    disable_progress_bars()

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.losses: list[float] = []
            self.began = 0.0

        def on_step_begin(self, *_, **__) -> None:
            synchronize()
            self.began = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            synchronize()
            self.seconds.append(time.perf_counter() - self.began)

        def on_log(self, _args, _state, _control, logs=None, **__) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    vader = sentiment_reward()
    record: dict[str, list] = {"completion_tokens": [], "completions": [], "scores": [], "prompts": []}

    def sentiment(prompts, completions, completion_ids, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = vader([prompt_text(p) for p in prompts], texts)
        record["completion_tokens"].append(sum(len(ids) for ids in completion_ids))
        record["completions"].append(len(completion_ids))
        record["scores"].append(statistics.mean(scores))
        record["prompts"].append([prompt_text(p) for p in prompts])
        return scores

    prompts = make_prompts(Config().default_job.num_prompts, args.seed, held_out=False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = GRPOConfig(
            output_dir=str(args.work_dir / "trl-out"), report_to="none", use_cpu=not torch.cuda.is_available(),
            bf16=False, fp16=False, seed=args.seed, max_steps=args.steps,
            per_device_train_batch_size=args.prompts_per_step * args.num_generations, gradient_accumulation_steps=1,
            steps_per_generation=1, num_iterations=1, num_generations=args.num_generations,
            max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
            learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0, beta=0.0, epsilon=EPSILON,
            loss_type="dapo", scale_rewards="group", max_grad_norm=MAX_GRAD_NORM, gradient_checkpointing=False,
            disable_dropout=True, shuffle_dataset=False, logging_steps=1, save_strategy="no", eval_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0,
        )
        timer = StepTimes()
        trainer = GRPOTrainer(model=model, reward_funcs=sentiment, args=config,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                              processing_class=tokenizer, callbacks=[timer])
        setup_seconds = time.perf_counter() - setup_started
        trainer.train()
    if not len(timer.seconds) == len(record["scores"]) == args.steps:
        sys.exit(f"TRL ran {len(timer.seconds)} steps and {len(record['scores'])} rollouts; {args.steps} expected")
    args.result.write_text(json.dumps({"step_seconds": timer.seconds, "losses": timer.losses, **record,
                                       "setup_seconds": setup_seconds, "peak_rss_kb": peak_rss_kb()}))


def worker_preftune(args: argparse.Namespace) -> None:
    from preftune.cli import build_config, build_parser
    from preftune.recipes import grpo, online

    setup_started = time.perf_counter()
    # --task sentiment: the default job's prompts, TRL's side's (grpo's own built-in task is arithmetic)
    argv = ["grpo", "--task", "sentiment", "--model", args.model, "--output-dir", str(args.work_dir / "preftune-out"),
            "--overwrite",
            "--max-steps", str(args.steps), "--rollout-batch-size", str(args.prompts_per_step), "--num-generations",
            str(args.num_generations), "--num-iterations", "1", "--num-mini-batches", "1", "--max-new-tokens",
            str(args.max_new_tokens), "--learning-rate", str(LEARNING_RATE), "--lr-scheduler-type", "linear",
            "--warmup-ratio", "0", "--loss-type", "dapo", "--beta", "0", "--scale-rewards", "group", "--epsilon",
            str(EPSILON), "--max-grad-norm", str(MAX_GRAD_NORM), "--reward", "sentiment", "--seed", str(args.seed),
            "--no-shuffle", "--no-bf16", "--no-gradient-checkpointing", "--report-to", "none", "--save-steps", "0"]
    if args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    config = build_config(build_parser().parse_args(argv))
    run = grpo.setup(config)
    setup_seconds = time.perf_counter() - setup_started
    record: dict[str, list] = {"step_seconds": [], "losses": [], "completion_tokens": [], "completions": [],
                               "scores": [], "prompts": []}
    try:
        run.model.train()
        while run.state.step < run.total_steps:  # online.train's step, without logging, evaluation, checkpoints
            positions = online.step_positions(run)
            prompts = [run.train_prompts[i] for i in positions]
            synchronize()
            began = time.perf_counter()
            rollout = online.collect(run, positions)
            run.objective.score(run, rollout)
            means, _, _ = online.optimise(run, rollout)
            run.scheduler.step()
            synchronize()
            record["step_seconds"].append(time.perf_counter() - began)
            run.state.step += 1
            record["losses"].append(means["loss"])
            record["completion_tokens"].append(sum(len(s.completion_ids) for s in rollout.samples))
            record["completions"].append(len(rollout.samples))
            record["scores"].append(rollout.raw_scores.mean().item())
            record["prompts"].append([prompts[s.prompt_index].text for s in rollout.samples])
    finally:
        online.cleanup(run)
    args.result.write_text(json.dumps({**record, "setup_seconds": setup_seconds, "peak_rss_kb": peak_rss_kb()}))


if __name__ == "__main__":
    main()
