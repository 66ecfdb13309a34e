"""The DPO training run: setup -> train -> save -> cleanup.

`Trainer.train` is the whole loop, top to bottom: micro-batches -> policy and reference log-probs -> loss ->
backward, `grad_accum` times; clip, step, schedule; log; evaluate. Everything it calls is a function of
another module (log-probs, losses, metrics, evaluation), so the loop never learns which batch layout or
reference source is in use.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import yaml
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from preftune.batching import Batch, batch_order, collate_padded
from preftune.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from preftune.config import Config, math_differences, save_yaml
from preftune.data import LoadResult, describe_skipped, load_pairs
from preftune.errors import RunInterrupted, UserError
from preftune.evaluate import evaluate_pairs
from preftune.logprobs import sequence_logps
from preftune.losses import LossParams, compute_loss
from preftune.metrics import MetricTotals, pair_sums
from preftune.models import load_policy_and_reference, save_model
from preftune.reference import reference_source
from preftune.runtime import make_accelerator
from preftune.tokenize import TokenizedPair, tokenize_pairs

CONFIG_FILE = "preftune_config.yaml"
METRICS_FILE = "metrics.jsonl"


def prepare_output_dir(output_dir: str | None, overwrite: bool, resuming: bool) -> Path:
    """The run folder, created; a non-empty one is refused unless resuming or `overwrite`, so no run is lost."""
    path = Path(output_dir) if output_dir else Path("runs") / datetime.now().strftime("preftune-%Y%m%d-%H%M%S")
    if path.exists() and not path.is_dir():
        raise UserError(f"--output-dir {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise UserError(f"--output-dir {path} is not empty; choose another folder, pass --resume to continue the "
                        "run in it, or --overwrite")
    path.mkdir(parents=True, exist_ok=True)
    if overwrite and not resuming:  # a fresh log: appending to an old run's metrics would mix two runs
        (path / METRICS_FILE).unlink(missing_ok=True)
    return path


def find_checkpoint(resume: str, output_dir: Path) -> Path:
    """The checkpoint named by --resume: 'latest' (the newest whole one in the run folder) or a folder."""
    if resume == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise UserError(f"--resume: no whole checkpoint in {output_dir} (were checkpoints saved, --save-steps?)")
        return found
    path = Path(resume)
    if not (path / "loop_state.json").is_file():
        raise UserError(f"--resume {resume}: not a checkpoint folder (no loop_state.json)")
    return path


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], int | None]]:
    """While active, SIGTERM and SIGINT only ask the loop to stop after the current optimizer step (pre-emption
    sends SIGTERM). Yields a function giving the signal received, if any. A second SIGINT stops at once."""
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


def load_data(source: str, split: str, skip_invalid: bool) -> LoadResult:
    result = load_pairs(source, split=split, skip_invalid=skip_invalid)
    if result.skipped:
        print(describe_skipped(result.skipped), flush=True)
    return result


def count_steps(num_pairs: int, batch_size: int, grad_accum: int, num_epochs: float, max_steps: int) -> int:
    """Optimizer steps of the run: --max-steps, else num_epochs passes of grad_accum micro-batches each."""
    if max_steps > 0:
        return max_steps
    batches_per_epoch = math.ceil(num_pairs / batch_size)
    return max(1, math.ceil(num_epochs * batches_per_epoch / grad_accum))


@dataclass
class RunState:
    """What the loop advances, and all a checkpoint needs to continue it exactly."""

    step: int = 0
    micro_batches_seen: int = 0
    bad_steps_in_row: int = 0
    interval: dict = field(default_factory=lambda: MetricTotals().to_dict())  # metrics since the last log line


class Trainer:
    """One training run. Call `setup()`, `train()`, `save()`, then `cleanup()` (or use `run()`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = RunState()
        self.final_eval: dict[str, float] | None = None

    # ---- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        # Data first: a bad file must stop the run before minutes of model loading.
        train_data = load_data(c.data.data, c.data.split, c.data.skip_invalid)
        eval_data = load_data(c.data.eval_data, c.data.eval_split, c.data.skip_invalid) if c.data.eval_data else None
        self.output_dir = prepare_output_dir(c.train.output_dir, c.train.overwrite, resuming=bool(c.train.resume))
        c.train.output_dir = str(self.output_dir)
        self.resume_from = find_checkpoint(c.train.resume, self.output_dir) if c.train.resume else None
        if self.resume_from is not None:  # refuse before loading models: a changed setting changes the math
            saved = yaml.safe_load((self.resume_from / CONFIG_FILE).read_text(encoding="utf-8"))
            differences = math_differences(saved, c)
            if differences:
                raise UserError(f"cannot resume from {self.resume_from}: settings differ from the checkpoint's:\n  "
                                + "\n  ".join(differences))
        save_yaml(c, self.output_dir / CONFIG_FILE)

        self.accelerator = make_accelerator(c.model.bf16, c.train.grad_accum)
        set_seed(c.train.seed)
        policy, reference, self.tokenizer, self.model_source = load_policy_and_reference(c.model)
        self.pad_token_id = self.tokenizer.pad_token_id

        self.train_pairs = self.tokenize(train_data, "training")
        self.train_locations = [f"{p.source} {p.location}" for p in train_data.pairs]  # for messages
        self.eval_pairs = self.tokenize(eval_data, "evaluation") if eval_data else []
        self.total_steps = count_steps(
            len(self.train_pairs), c.train.batch_size, c.train.grad_accum, c.train.num_epochs, c.train.max_steps
        )
        self.batches_per_epoch = math.ceil(len(self.train_pairs) / c.train.batch_size)

        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable,
            lr=c.train.learning_rate,
            betas=(c.train.adam_beta1, c.train.adam_beta2),
            weight_decay=c.train.weight_decay,
        )
        scheduler = get_scheduler(
            c.train.lr_scheduler_type,
            optimizer,
            num_warmup_steps=math.ceil(c.train.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(policy, optimizer, scheduler)
        self.trainable = trainable
        if reference is not None:
            reference.to(self.accelerator.device)
        self.reference_model = reference
        self.reference = reference_source(self.accelerator.unwrap_model(self.policy), reference)
        self.loss_params = LossParams(beta=c.loss.beta)

        if self.resume_from is not None:
            self.restore(self.resume_from)

        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops events a killed run logged after the checkpoint
        self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.state.step + 1)
        self.metrics_file = (self.output_dir / METRICS_FILE).open("a", encoding="utf-8")
        print(
            f"training {self.model_source} on {len(self.train_pairs)} pairs for {self.total_steps} steps "
            f"({c.train.batch_size} pairs x {c.train.grad_accum} micro-batches per step); run folder {self.output_dir}",
            flush=True,
        )

    def tokenize(self, data: LoadResult, what: str) -> list[TokenizedPair]:
        d = self.config.data
        pairs, dropped = tokenize_pairs(data.pairs, self.tokenizer, d.max_length or None, d.truncation_mode)
        if dropped:
            print(f"dropped {dropped} {what} pairs whose prompt alone fills max_length={d.max_length}", flush=True)
        if not pairs:
            raise UserError(f"no {what} pairs left after truncation to max_length={d.max_length}")
        return pairs

    # ---- train -------------------------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[Batch]:
        """Micro-batches forever, epoch after epoch, reshuffled per epoch; resumes at `micro_batches_seen`."""
        c = self.config.train
        while True:
            epoch, offset = divmod(self.state.micro_batches_seen, self.batches_per_epoch)
            order = batch_order(len(self.train_pairs), c.batch_size, c.shuffle, c.seed, epoch)
            for positions in order[offset:]:
                self.state.micro_batches_seen += 1
                yield collate_padded([self.train_pairs[i] for i in positions], self.pad_token_id).to(
                    self.accelerator.device
                )

    def train(self) -> None:
        c = self.config.train
        accelerator, policy, optimizer, scheduler = self.accelerator, self.policy, self.optimizer, self.scheduler
        stream = self.micro_batches()
        interval = MetricTotals.from_dict(self.state.interval)
        progress = tqdm(total=self.total_steps, initial=self.state.step, desc="train", dynamic_ncols=True)
        policy.train()
        with stop_on_signals() as signal_received:
            while self.state.step < self.total_steps:
                step_totals, bad_pairs = MetricTotals(), []
                for _ in range(c.grad_accum):
                    batch = next(stream)
                    with accelerator.autocast():
                        policy_logps = sequence_logps(policy, batch)
                        reference_logps = self.reference(batch)
                        output = compute_loss(
                            self.config.loss.loss_type, policy_logps, reference_logps, self.loss_params
                        )
                        loss = output.losses.mean()
                    # accelerator.backward divides by grad_accum: the step's gradient is the mean over micro-batches
                    accelerator.backward(loss)
                    sums = pair_sums(output, policy_logps)  # one device sync per micro-batch, for all metrics
                    if not math.isfinite(sums["loss"]):
                        bad_pairs += batch.pair_indices
                    step_totals.add(sums, batch.num_pairs)
                max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(self.trainable, max_norm))
                learning_rate = scheduler.get_last_lr()[0]
                if bad_pairs or not math.isfinite(grad_norm):
                    self.skip_step(bad_pairs or self.pairs_of_step(), "loss" if bad_pairs else "gradient")
                else:
                    optimizer.step()
                    self.state.bad_steps_in_row = 0
                    interval.merge(step_totals)
                scheduler.step()  # also on a skipped step, so the schedule stays aligned with the step count
                optimizer.zero_grad(set_to_none=True)
                self.state.step += 1
                progress.update(1)

                if interval.num_pairs and (self.state.step % c.logging_steps == 0
                                           or self.state.step == self.total_steps):
                    means = interval.means()
                    self.log({**means, "learning_rate": learning_rate, "grad_norm": grad_norm})
                    progress.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means['rewards/accuracies']:.2f}")
                    interval = MetricTotals()
                self.state.interval = interval.to_dict()
                if self.eval_pairs and c.eval_steps and self.state.step % c.eval_steps == 0:
                    self.evaluate()
                if c.save_steps and self.state.step % c.save_steps == 0:
                    self.save_checkpoint()
                if self.state.bad_steps_in_row >= c.max_bad_steps:
                    path = self.save_checkpoint()
                    raise UserError(
                        f"stopped at step {self.state.step}: {self.state.bad_steps_in_row} steps in a row had a "
                        "non-finite loss or gradient (see the warnings above for the pairs). Lower --learning-rate, "
                        f"check those pairs, or try without --bf16. Checkpoint: {path}"
                    )
                if signal_received():
                    path = self.save_checkpoint()
                    raise RunInterrupted(
                        f"stopped at step {self.state.step} of {self.total_steps}; checkpoint {path}. Resume with:\n"
                        f"  preftune train --config {self.output_dir / CONFIG_FILE} --resume",
                        signal_received(),
                    )
        progress.close()
        if self.eval_pairs:
            # the periodic evaluation may just have run at the last step: reuse it rather than log it twice
            just_evaluated = c.eval_steps and self.state.step % c.eval_steps == 0
            self.final_eval = self.last_eval if just_evaluated else self.evaluate()

    def pairs_of_step(self) -> list[int]:
        """Indices of the pairs in the micro-batches of the step just run (for messages)."""
        c = self.config.train
        indices = []
        for seen in range(self.state.micro_batches_seen - c.grad_accum, self.state.micro_batches_seen):
            epoch, position = divmod(seen, self.batches_per_epoch)
            indices += batch_order(len(self.train_pairs), c.batch_size, c.shuffle, c.seed, epoch)[position]
        return [self.train_pairs[i].index for i in indices]

    def skip_step(self, pair_indices: list[int], what: str) -> None:
        """Leave the weights as they are for this step, and say which pairs were involved."""
        self.state.bad_steps_in_row += 1
        indices = sorted(set(pair_indices))
        places = ", ".join(self.train_locations[i] for i in indices)
        message = f"step {self.state.step + 1}: non-finite {what}; step skipped (pairs: {places})"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        self.log({"skipped": f"non-finite {what}", "pair_indices": indices}, step=self.state.step + 1)

    def save_checkpoint(self) -> Path:
        metrics_lines = (self.output_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines(keepends=True)
        return save_checkpoint(
            self.output_dir,
            self.state.step,
            self.accelerator.unwrap_model(self.policy),
            self.optimizer,
            self.scheduler,
            asdict(self.state),
            metrics_lines,
            yaml.safe_dump(self.config.to_dict(), sort_keys=False),
            keep=self.config.train.save_total_limit or None,
        )

    def restore(self, checkpoint: Path) -> None:
        """Continue from `checkpoint`: weights, optimizer, schedule, random states, data position, metrics."""
        loop_state, metrics_lines = load_checkpoint(
            checkpoint, self.accelerator.unwrap_model(self.policy), self.optimizer, self.scheduler
        )
        self.state = RunState(**loop_state)
        # metrics.jsonl restarts from the checkpoint's copy: rows a killed run wrote after it are dropped
        staging = self.output_dir / (METRICS_FILE + ".tmp")
        staging.write_text("".join(metrics_lines), encoding="utf-8")
        staging.replace(self.output_dir / METRICS_FILE)
        print(f"resuming from {checkpoint} at step {self.state.step}", flush=True)

    def evaluate(self) -> dict[str, float]:
        with self.accelerator.autocast():
            results = evaluate_pairs(
                self.policy,
                self.reference,
                self.eval_pairs,
                batch_size=self.config.train.eval_batch_size,
                pad_token_id=self.pad_token_id,
                loss_type=self.config.loss.loss_type,
                params=self.loss_params,
                device=self.accelerator.device,
            )
        self.log({f"eval_{name}": value for name, value in results.items()})
        self.last_eval = results
        return results

    def log(self, values: dict, step: int | None = None) -> None:
        """One JSON line in metrics.jsonl (with step, epoch and wall time) and the numbers in TensorBoard."""
        step = self.state.step if step is None else step
        epoch = self.state.micro_batches_seen / self.batches_per_epoch
        record = {"step": step, "epoch": round(epoch, 4), "time": time.time(), **values}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        for name, value in values.items():
            if isinstance(value, float | int):
                tag = f"eval/{name[5:]}" if name.startswith("eval_") else f"train/{name}"
                self.tensorboard.add_scalar(tag, value, step)

    # ---- save / cleanup ----------------------------------------------------------------------------------
    def save(self) -> None:
        policy = self.accelerator.unwrap_model(self.policy)
        save_model(policy, self.tokenizer, self.output_dir, merge=self.config.model.merge)
        save_yaml(self.config, self.output_dir / CONFIG_FILE)
        if self.final_eval is not None:
            (self.output_dir / "eval_results.json").write_text(json.dumps(self.final_eval, indent=2) + "\n")
        print(f"saved the trained model to {self.output_dir}", flush=True)

    def cleanup(self) -> None:
        if hasattr(self, "metrics_file"):
            self.metrics_file.close()
        if hasattr(self, "tensorboard"):
            self.tensorboard.close()

    def run(self) -> Path:
        try:
            self.setup()
            self.train()
            self.save()
        finally:
            self.cleanup()
        return self.output_dir
