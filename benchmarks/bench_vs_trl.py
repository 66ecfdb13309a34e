"""preftune against TRL 1.16's DPOTrainer: the same model, pairs, batches, seed and settings, each side in its own
process; prints one JSON object.

For each mode (live reference; reference log-probs precomputed on both sides; LoRA r=16) and each side: pairs/s,
non-pad tokens/s, median seconds per optimizer step after the warm-up steps, peak RSS, the per-step losses, and
the ratios preftune / TRL, with the largest per-step loss difference. Both sides read the pairs in file order
(TRL's `train_sampling_strategy="sequential"`, preftune's `--no-shuffle`), so step k sees the same pairs. Both
recompute activations in the backward pass (TRL's default `gradient_checkpointing=True`, preftune's
`--gradient-checkpointing`) unless --no-checkpointing; preftune uses its default batch layout unless --layout.

Useful model FLOPs (what the math needs, however a side computes it), N = non-embedding parameters, H x V the
output head, per pair: the prompt counted once, each completion once.
  policy, full fine-tuning: 6N per token, plus 6HV per completion token (the head, forward and backward);
  policy, LoRA: 4N per token and 4HV per completion token (forward, and the activation gradients; the frozen base
    has no weight gradients; the adapters' own FLOPs are left out);
  live reference: 2N per token and 2HV per completion token (forward only); precomputed reference: 0.
Attention's own FLOPs (QK^T and AV) are left out. MFU = useful FLOPs per second / the measured fp32 matmul peak
(the best of a few 2048 x 2048 x 2048 products on all threads).

Needs TRL (`pip install -e '.[dev]'`) and the HH-RLHF file in ../shared/data (or --data). Example:
    .venv/bin/python benchmarks/bench_vs_trl.py                       # all three modes, 12 steps each
    .venv/bin/python benchmarks/bench_vs_trl.py --modes live --steps 6
    .venv/bin/python benchmarks/bench_vs_trl.py --scaling             # + seconds/step over max_length x batch
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
from worker_process import peak_rss_kb, run_side

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
MODES = ("live", "precomputed", "lora")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}  # preftune's defaults for alpha and dropout, both sides


# ---- the parent: data, runs, results ------------------------------------------------------------------------
def write_pairs(source: Path, count: int, destination: Path) -> list:
    """The first `count` valid pairs of `source` as explicit-prompt JSONL (both sides parse it the same way)."""
    from preftune.data.read import load_pairs

    pairs = load_pairs(source, skip_invalid=True).pairs[:count]
    if len(pairs) < count:
        sys.exit(f"{source} has {len(pairs)} valid pairs; {count} needed")
    with destination.open("w") as out:
        for p in pairs:
            out.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return pairs


def model_sizes(model_dir: str) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once, with the embedding
    head = config.hidden_size * config.vocab_size
    untied_head = 0 if config.tie_word_embeddings else head
    return {"non_embedding_params": total - embedding - untied_head, "head_params": head}


def useful_flops(tokens: dict, sizes: dict, mode: str) -> float:
    n, head = sizes["non_embedding_params"], sizes["head_params"]
    policy = (4 if mode == "lora" else 6) * (n * tokens["unique"] + head * tokens["completion"])
    reference = 2 * (n * tokens["unique"] + head * tokens["completion"]) if mode != "precomputed" else 0
    return policy + reference


def matmul_peak_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(6):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 2048**3 / best / 1e9


def run_worker(side: str, mode: str, args: argparse.Namespace, pairs_file: Path, folder: Path) -> dict:
    """One side in its own process (which reports its own peak RSS, from the kernel's accounting)."""
    result_file = folder / f"{side}-{mode}.json"
    command = [sys.executable, __file__, "--worker", side, "--mode", mode, "--pairs-file", str(pairs_file),
               "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--result", str(result_file), "--work-dir", str(folder),
               "--layout", args.layout, "--checkpointing" if args.checkpointing else "--no-checkpointing"]
    result = run_side(command, f"{side} ({mode})", result_file, args.verbose)
    result["peak_rss_gb"] = round(result.pop("peak_rss_kb") / 1024**2, 2)
    return result


def step_tokens(tokenized: list, batch_size: int, steps: int) -> dict:
    per_step = []
    for k in range(steps):
        batch = tokenized[k * batch_size : (k + 1) * batch_size]
        completion = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in batch)
        unique = sum(len(p.prompt_ids) for p in batch) + completion
        computed = unique + sum(len(p.prompt_ids) for p in batch)  # both sequences, prompt twice: non-pad tokens
        per_step.append({"unique": unique, "completion": completion, "non_pad": computed})
    return per_step


def padded_layout(tokenized: list, tokens: list, batch_size: int, steps: int) -> dict:
    """What a right-padded [chosen; rejected] batch computes: positions, and the share that is padding."""
    positions = 0
    for k in range(steps):
        batch = tokenized[k * batch_size : (k + 1) * batch_size]
        width = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in batch)
        positions += 2 * len(batch) * width
    non_pad = sum(t["non_pad"] for t in tokens)
    unique = sum(t["unique"] for t in tokens)
    return {"padding_share": round(1 - non_pad / positions, 3),
            "repeated_prompt_share": round((non_pad - unique) / positions, 3),
            "mean_prompt_tokens": round(sum(len(p.prompt_ids) for p in tokenized) / len(tokenized), 1),
            "mean_completion_tokens": round(sum(len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized)
                                            / (2 * len(tokenized)), 1)}


def summarise(side: dict, tokens: list, warmup: int, batch_size: int, sizes: dict, mode: str, peak: float) -> dict:
    timed = range(warmup, len(side["step_seconds"]))
    seconds = statistics.median(side["step_seconds"][k] for k in timed)
    total_seconds = sum(side["step_seconds"][k] for k in timed)
    non_pad = sum(tokens[k]["non_pad"] for k in timed)
    flops = sum(useful_flops(tokens[k], sizes, mode) for k in timed)
    return {
        "median_step_seconds": round(seconds, 3),
        "pairs_per_second": round(batch_size / seconds, 4),
        "non_pad_tokens_per_second": round(non_pad / total_seconds, 1),
        "useful_gflops_per_second": round(flops / total_seconds / 1e9, 2),
        "mfu_of_matmul_peak": round(flops / total_seconds / 1e9 / peak, 4),
        "peak_rss_gb": side["peak_rss_gb"],
        "losses": [round(x, 6) for x in side["losses"]],
        "wall_seconds": side["wall_seconds"],
    }


def compare(args: argparse.Namespace, mode: str, pairs_file: Path, tokens: list, sizes: dict, peak: float,
            folder: Path) -> dict:
    sides = {side: run_worker(side, mode, args, pairs_file, folder) for side in ("trl", "preftune")}
    summary = {side: summarise(result, tokens, args.warmup, args.batch_size, sizes, mode, peak)
               for side, result in sides.items()}
    ours, theirs = summary["preftune"], summary["trl"]
    summary["ratios"] = {
        "pairs_per_second": round(ours["pairs_per_second"] / theirs["pairs_per_second"], 3),
        "peak_rss": round(ours["peak_rss_gb"] / theirs["peak_rss_gb"], 3),
    }
    summary["max_abs_loss_difference"] = max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"]))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timings")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--layout", default=None, help="preftune's --batch-layout (default: preftune's default; "
                        "padded is TRL's)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="activation checkpointing on both sides (TRL's default is on)")
    parser.add_argument("--scaling", action="store_true", help="also seconds/step over max_length x batch (live)")
    parser.add_argument("--verbose", action="store_true", help="show the workers' output")
    # worker-only arguments
    parser.add_argument("--worker", choices=["trl", "preftune"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layout is None:
        from preftune.config import Config

        args.layout = Config().train.batch_layout
    if args.worker:
        (worker_trl if args.worker == "trl" else worker_preftune)(args)
        return

    from preftune.data.tokenize import tokenize_pairs
    from preftune.models.load import load_tokenizer, resolve_model

    args.model = resolve_model(args.model)
    modes = [m for m in args.modes.split(",") if m]
    if not args.data.exists():
        sys.exit(f"no data at {args.data} (see --data)")
    import transformers
    import trl

    started = time.time()
    report = {
        "date": date.today().isoformat(),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "trl": trl.__version__},
        "settings": {"model": args.model, "batch_size": args.batch_size, "max_length": args.max_length,
                     "steps": args.steps, "warmup_steps_left_out": args.warmup, "dtype": "float32",
                     "preftune_batch_layout": args.layout, "activation_checkpointing": args.checkpointing,
                     "data": str(args.data), "lora": LORA},
    }
    report["matmul_fp32_gflops"] = peak = round(matmul_peak_gflops(), 1)
    sizes = model_sizes(args.model)
    report["model_sizes"] = sizes
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        folder = Path(tmp)
        pairs_file = folder / "pairs.jsonl"
        pairs = write_pairs(args.data, args.steps * args.batch_size, pairs_file)
        tokenized, dropped = tokenize_pairs(pairs, load_tokenizer(args.model), args.max_length)
        if dropped:
            sys.exit(f"{dropped} of the first pairs do not fit max_length {args.max_length}; pick another")
        tokens = step_tokens(tokenized, args.batch_size, args.steps)
        report["padded_layout"] = padded_layout(tokenized, tokens, args.batch_size, args.steps)
        report["modes"] = {mode: compare(args, mode, pairs_file, tokens, sizes, peak, folder) for mode in modes}
        if args.scaling:
            report["scaling_seconds_per_step"] = scaling(args, folder)
    report["seconds"] = round(time.time() - started)
    print(json.dumps(report, indent=2))


def scaling(args: argparse.Namespace, folder: Path) -> list[dict]:
    """Seconds per step (live reference) over max_length x batch size: 3 steps each, the median of steps 2 and 3
    (step 1 includes the start-up), and each side's peak RSS."""
    rows = []
    for max_length in (256, 512, 1024):
        for batch_size in (1, 4, 8):
            run = argparse.Namespace(**{**vars(args), "max_length": max_length, "batch_size": batch_size,
                                        "steps": 3})
            pairs_file = folder / f"pairs-{max_length}-{batch_size}.jsonl"
            write_pairs(args.data, run.steps * batch_size, pairs_file)
            row: dict = {"max_length": max_length, "batch_size": batch_size}
            for side in ("trl", "preftune"):
                result = run_worker(side, "live", run, pairs_file, folder)
                row[f"{side}_seconds"] = round(statistics.median(result["step_seconds"][1:]), 2)
                row[f"{side}_peak_rss_gb"] = result["peak_rss_gb"]
            row["speed_ratio"] = round(row["trl_seconds"] / row["preftune_seconds"], 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress: the whole table takes a while
    return rows


# ---- the workers: one training run each, timings per optimizer step ----------------------------------------

def worker_trl(args: argparse.Namespace) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.ends, self.losses = [time.perf_counter()], []

        def on_step_end(self, *_, **__) -> None:
            self.ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    records = [json.loads(line) for line in args.pairs_file.read_text().splitlines()]
    config = DPOConfig(
        output_dir=str(args.work_dir / "trl-out"), per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, max_steps=args.steps, learning_rate=1e-6, lr_scheduler_type="linear",
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
        gradient_checkpointing=args.checkpointing,
        train_sampling_strategy="sequential", precompute_ref_log_probs=args.mode == "precomputed",
        precompute_ref_batch_size=8, beta=0.1, max_grad_norm=1.0, dataloader_num_workers=0,
    )
    peft_config = None
    if args.mode == "lora":
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    timer = StepTimes()
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=peft_config,
                         callbacks=[timer])
    timer.ends = [time.perf_counter()]
    trainer.train()
    # on_step_end's first mark comes after the first step: the duration of step 1 includes the dataloader start
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    args.result.write_text(json.dumps({"step_seconds": steps, "losses": timer.losses,
                                       "peak_rss_kb": peak_rss_kb()}))


def worker_preftune(args: argparse.Namespace) -> None:
    from preftune.cli import main as preftune

    out = args.work_dir / f"preftune-{args.mode}"
    argv = ["train", "--model", args.model, "--data", str(args.pairs_file), "--output-dir", str(out),
            "--overwrite", "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
            str(args.max_length), "--learning-rate", "1e-6", "--lr-scheduler-type", "linear", "--warmup-ratio", "0",
            "--no-shuffle", "--seed", "0", "--beta", "0.1", "--max-grad-norm", "1.0", "--eval-batch-size", "8",
            "--cache-dir", str(args.work_dir / "preftune-cache"), "--batch-layout", args.layout]
    if args.checkpointing:
        argv.append("--gradient-checkpointing")
    if args.mode == "precomputed":
        argv.append("--precompute-ref-log-probs")
    if args.mode == "lora":
        argv += ["--lora", "--lora-r", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]), "--lora-dropout",
                 str(LORA["dropout"])]
    started = time.time()
    if preftune(argv) != 0:
        sys.exit("preftune failed")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    times = [started] + [r["time"] for r in rows]
    args.result.write_text(json.dumps({"step_seconds": [b - a for a, b in zip(times, times[1:])],
                                       "losses": [r["loss"] for r in rows], "peak_rss_kb": peak_rss_kb()}))


if __name__ == "__main__":
    main()
