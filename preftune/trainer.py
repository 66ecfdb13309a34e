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
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from preftune.batching import LAYOUTS, Batch, process_batches
from preftune.checkpoint import gather_training_state, latest_checkpoint, load_checkpoint, save_checkpoint
from preftune.config import Config, math_differences, save_yaml
from preftune.data import LoadResult, describe_skipped, load_pairs
from preftune.errors import RunInterrupted, UserError
from preftune.evaluate import evaluate_totals
from preftune.logprobs import sequence_logps
from preftune.losses import LossParams, compute_loss
from preftune.metrics import MetricTotals, pair_sums
from preftune.models import cache_root, load_policy_and_reference, load_reference_model, save_model
from preftune.reference import (
    ReferenceSource,
    cache_key,
    cached_reference_table,
    check_syncable,
    compute_reference_table,
    reference_source,
    sync_reference_model,
    table_source,
    weights_fingerprint,
)
from preftune.report import example_prompts, example_rows, final_metrics_of, write_report
from preftune.runtime import make_accelerator, reshard, sharded_engine
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


def count_steps(batches_per_epoch: int, grad_accum: int, num_epochs: float, max_steps: int) -> int:
    """Optimizer steps of the run: --max-steps, else num_epochs passes of grad_accum micro-batches each."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(num_epochs * batches_per_epoch / grad_accum))


def check_shardable(config: Config) -> None:
    """Refuse, under FSDP, the options preftune has no sharded path for."""
    if config.model.load_in_4bit:  # FSDP over bitsandbytes' packed 4-bit weights needs its own storage settings
        raise UserError("--load-in-4bit under FSDP is not supported: use QLoRA with data parallelism "
                        "(configs/accelerate/ddp.yaml), or LoRA under FSDP")


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (FSDP's gradient norm comes as one), else `value` itself."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


@dataclass
class RunState:
    """What the loop advances, and all a checkpoint needs to continue it exactly."""

    step: int = 0
    micro_batches_seen: int = 0
    bad_steps_in_row: int = 0
    world_size: int = 1  # processes; a checkpoint resumes only under the same number
    sharded: bool = False  # written under FSDP (optimizer state keyed by name); resumes only under FSDP
    interval: dict = field(default_factory=lambda: MetricTotals().to_dict())  # metrics since the last log line


class Trainer:
    """One training run. Call `setup()`, `train()`, `save()`, then `cleanup()` (or use `run()`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = RunState()
        self.final_eval: dict[str, float] | None = None
        self.report_reward: Callable[[str], float] | None = None  # a ground-truth reward for report.md, if any

    # ---- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        # Data first: a bad file must stop the run before minutes of model loading.
        train_data = load_data(c.data.data, c.data.split, c.data.skip_invalid)
        eval_data = load_data(c.data.eval_data, c.data.eval_split, c.data.skip_invalid) if c.data.eval_data else None
        self.accelerator = accelerator = make_accelerator(c.model.bf16, c.train.grad_accum)
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.state.world_size = self.world_size
        # FSDP: each process holds a slice of every weight, so every forward is a collective that all processes
        # run together, and saving gathers the weights first
        self.sharded = self.state.sharded = sharded_engine(accelerator)
        if self.sharded:
            check_shardable(c)
        # the main process checks and creates the run folder; the others take its path (the default name has
        # the time in it, which could differ between processes)
        folder = [None]
        if accelerator.is_main_process:
            folder = [str(prepare_output_dir(c.train.output_dir, c.train.overwrite, bool(c.train.resume)))]
        if self.world_size > 1:
            broadcast_object_list(folder)
        self.output_dir = Path(folder[0])
        c.train.output_dir = str(self.output_dir)
        self.resume_from = find_checkpoint(c.train.resume, self.output_dir) if c.train.resume else None
        if self.resume_from is not None:  # refuse before loading models: a changed setting changes the math
            saved = yaml.safe_load((self.resume_from / CONFIG_FILE).read_text(encoding="utf-8"))
            differences = math_differences(saved, c)
            if differences:
                raise UserError(f"cannot resume from {self.resume_from}: settings differ from the checkpoint's:\n  "
                                + "\n  ".join(differences))
        if accelerator.is_main_process:
            save_yaml(c, self.output_dir / CONFIG_FILE)
        set_seed(c.train.seed)
        self.loss_params = params = LossParams.from_config(c.loss)
        precompute = c.train.precompute_ref_log_probs
        policy, reference, self.tokenizer, self.model_source = load_policy_and_reference(
            c.model, need_reference=not (params.reference_free or precompute)
        )
        self.pad_token_id = self.tokenizer.pad_token_id

        self.train_pairs = self.tokenize(train_data, "training")
        # prompts shown with samples in report.md: the first distinct ones of the held-out (else training) data
        self.report_prompts = example_prompts(eval_data or train_data, self.tokenizer)
        self.train_locations = [f"{p.source} {p.location}" for p in train_data.pairs]  # for messages
        self.eval_pairs = self.tokenize(eval_data, "evaluation") if eval_data else []
        self.batches_per_epoch = len(self.epoch_batches(0))
        if self.batches_per_epoch == 0:
            raise UserError(f"{len(self.train_pairs)} training pairs cannot give each of {self.world_size} "
                            "processes a pair")
        self.total_steps = count_steps(self.batches_per_epoch, c.train.grad_accum, c.train.num_epochs,
                                       c.train.max_steps)

        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad],
            lr=c.train.learning_rate,
            betas=(c.train.adam_beta1, c.train.adam_beta2),
            weight_decay=c.train.weight_decay,
            # one kernel over all parameters: no whole-model temporaries (the for-each path makes several) and
            # faster; TRL's default (adamw_torch_fused) too
            fused=True,
        )
        scheduler = get_scheduler(
            c.train.lr_scheduler_type,
            optimizer,
            num_warmup_steps=math.ceil(c.train.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        # the scheduler stays out of accelerate's prepare: that wrapper steps it once per process, for loaders it
        # shards itself; our step count is already global
        self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
        self.scheduler = scheduler
        # read after prepare: FSDP replaces the parameters with sharded ones (and points the optimizer at them)
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        if reference is not None:
            reference = self.place_frozen(reference)
        if c.train.sync_ref_model:
            check_syncable(self.accelerator.unwrap_model(self.policy), reference)
        self.reference_model = reference
        if precompute:  # before restore: the reference is the starting policy
            self.reference, self.eval_reference = self.precompute_reference()
        else:
            self.reference = self.eval_reference = reference_source(
                self.accelerator.unwrap_model(self.policy), reference, params.length_split, params.reference_free
            )

        if self.resume_from is not None:
            self.restore(self.resume_from)

        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = self.metrics_file = None  # written by the main process only
        if accelerator.is_main_process:
            # purge_step: TensorBoard drops events a killed run logged after the checkpoint
            self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.state.step + 1)
            self.metrics_file = (self.output_dir / METRICS_FILE).open("a", encoding="utf-8")
        processes = f" in each of {self.world_size} processes" if self.world_size > 1 else ""
        if self.sharded:
            reshard(self.policy)  # a precomputing forward may have left the root's weights gathered
            held = sum(p.to_local().numel() for p in self.policy.parameters())
            total = sum(p.numel() for p in self.policy.parameters())
            accelerator.print(f"FSDP: each process holds a slice of the weights ({held:,} of {total:,} on the main "
                              "one), and of their gradients and optimizer state", flush=True)
        accelerator.print(
            f"training {self.model_source} on {len(self.train_pairs)} pairs for {self.total_steps} steps "
            f"({c.train.batch_size} pairs x {c.train.grad_accum} micro-batches per step{processes}); "
            f"run folder {self.output_dir}",
            flush=True,
        )

    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model (the reference) ready for this run's forwards: under FSDP sharded as the policy is (so a
        process holds a slice of it too), else moved to the device."""
        if not self.sharded:
            return model.to(self.accelerator.device)
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        plugin = self.accelerator.state.fsdp_plugin
        configured = plugin.reshard_after_forward
        # always free the gathered weights after the forward: no backward follows to do it (with the ZeRO-2-like
        # setting a frozen model would otherwise stay gathered, unsharded, for the rest of the run)
        plugin.reshard_after_forward = True
        try:
            return fsdp2_prepare_model(self.accelerator, model)
        finally:
            plugin.reshard_after_forward = configured

    def precompute_reference(self) -> tuple[ReferenceSource, ReferenceSource | None]:
        """--precompute-ref-log-probs: reference log-probs of the training and evaluation pairs, read from the cache
        or computed now (every process computes what is not cached; the main process writes it). The reference is
        --ref-model, loaded only for this, or the starting policy itself (with LoRA: its adapter off)."""
        c, accelerator = self.config, self.accelerator
        policy = accelerator.unwrap_model(self.policy)
        model = self.place_frozen(load_reference_model(c.model)) if c.model.ref_model else None
        live = reference_source(policy, model if model is not None else (None if c.model.lora else policy),
                                self.loss_params.length_split)
        fingerprint = weights_fingerprint(model if model is not None else policy)
        settings = {"mixed_precision": accelerator.mixed_precision, "attn_implementation": c.model.attn_implementation,
                    "length_split": self.loss_params.length_split}
        sources = []
        for pairs, what in ((self.train_pairs, "training"), (self.eval_pairs, "evaluation")):
            if not pairs:  # no evaluation data: nothing reads this source (and `live` must not outlive this call)
                sources.append(None)
                continue
            cache_file = cache_root(c.model.cache_dir) / "reference-logps" / (
                cache_key(fingerprint, pairs, settings) + ".safetensors")
            started = time.time()

            def compute(pairs: list[TokenizedPair] = pairs) -> torch.Tensor:
                return compute_reference_table(live, pairs, c.train.eval_batch_size, self.pad_token_id,
                                               accelerator.device, self.loss_params.length_split,
                                               c.train.batch_layout)

            with torch.no_grad(), accelerator.autocast():
                # every process reads, or every one computes: under FSDP computing is collective, and the main
                # process may write the file while another is still deciding
                readable = not self.any_process(not cache_file.exists())
                table, cached = cached_reference_table(cache_file, compute, write=accelerator.is_main_process,
                                                       read=readable)
            how = "read from" if cached else f"computed in {time.time() - started:.0f} s, cached in"
            accelerator.print(f"reference log-probs of {len(pairs)} {what} pairs {how} {cache_file}", flush=True)
            sources.append(table_source(table, pairs))
        return sources[0], sources[1]

    def tokenize(self, data: LoadResult, what: str) -> list[TokenizedPair]:
        d = self.config.data
        pairs, dropped = tokenize_pairs(data.pairs, self.tokenizer, d.max_length or None, d.truncation_mode)
        if dropped:
            print(f"dropped {dropped} {what} pairs whose prompt alone fills max_length={d.max_length}", flush=True)
        if not pairs:
            raise UserError(f"no {what} pairs left after truncation to max_length={d.max_length}")
        return pairs

    # ---- train -------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of one epoch, as positions in `train_pairs`."""
        c = self.config.train
        return process_batches(len(self.train_pairs), c.batch_size, self.world_size, self.rank, c.shuffle, c.seed,
                               epoch)

    def micro_batches(self) -> Iterator[Batch]:
        """Micro-batches forever, epoch after epoch, reshuffled per epoch; resumes at `micro_batches_seen`."""
        collate = LAYOUTS[self.config.train.batch_layout]
        while True:
            epoch, offset = divmod(self.state.micro_batches_seen, self.batches_per_epoch)
            for positions in self.epoch_batches(epoch)[offset:]:
                self.state.micro_batches_seen += 1
                yield collate([self.train_pairs[i] for i in positions], self.pad_token_id).to(
                    self.accelerator.device
                )

    def train(self) -> None:
        c = self.config.train
        accelerator, policy, optimizer, scheduler = self.accelerator, self.policy, self.optimizer, self.scheduler
        stream = self.micro_batches()
        interval = MetricTotals.from_dict(self.state.interval)
        progress = tqdm(total=self.total_steps, initial=self.state.step, desc="train", dynamic_ncols=True,
                        disable=not accelerator.is_main_process)
        policy.train()
        with stop_on_signals() as signal_received:
            while self.state.step < self.total_steps:
                step_totals, bad_pairs = MetricTotals(), []
                for micro in range(c.grad_accum):
                    batch = next(stream)
                    # gradients are averaged across processes once per step, on the last micro-batch
                    syncing = micro == c.grad_accum - 1
                    with contextlib.nullcontext() if syncing else accelerator.no_sync(policy), accelerator.autocast():
                        policy_logps = sequence_logps(policy, batch, self.loss_params.length_split,
                                                      self.loss_params.use_weighting)
                        output = compute_loss(policy_logps, self.reference(batch), self.loss_params)
                        loss = output.losses.mean()
                        # divided by grad_accum in accelerator.backward: the gradient is the mean over micro-batches
                        accelerator.backward(loss)
                    sums = pair_sums(output, policy_logps)  # one device sync per micro-batch, for all metrics
                    if not math.isfinite(sums["loss"]):
                        bad_pairs += batch.pair_indices
                    step_totals.add(sums, batch.num_pairs)
                max_norm = c.max_grad_norm if c.max_grad_norm > 0 else float("inf")
                grad_norm = float(full_value(accelerator.clip_grad_norm_(self.trainable, max_norm)))
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
                if c.sync_ref_model and self.state.step % c.ref_model_sync_steps == 0:  # TR-DPO, as TRL's callback
                    sync_reference_model(accelerator.unwrap_model(policy), self.reference_model,
                                         c.ref_model_mixup_alpha)

                if self.state.step % c.logging_steps == 0 or self.state.step == self.total_steps:
                    logged = self.reduce(interval)
                    if logged.num_pairs:  # none when every step since the last log was skipped
                        means = logged.means()
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
                if self.any_process(signal_received() is not None):
                    path = self.save_checkpoint()
                    raise RunInterrupted(
                        f"stopped at step {self.state.step} of {self.total_steps}; checkpoint {path}. Resume with:\n"
                        f"  preftune train --config {self.output_dir / CONFIG_FILE} --resume",
                        signal_received() or signal.SIGTERM,
                    )
        progress.close()
        if self.eval_pairs:
            # the periodic evaluation may just have run at the last step: reuse it rather than log it twice
            just_evaluated = c.eval_steps and self.state.step % c.eval_steps == 0
            self.final_eval = self.last_eval if just_evaluated else self.evaluate()

    def pairs_of_step(self) -> list[int]:
        """Indices of this process's pairs in the micro-batches of the step just run (for messages)."""
        indices = []
        for seen in range(self.state.micro_batches_seen - self.config.train.grad_accum, self.state.micro_batches_seen):
            epoch, position = divmod(seen, self.batches_per_epoch)
            indices += self.epoch_batches(epoch)[position]
        return [self.train_pairs[i].index for i in indices]

    def reduce(self, totals: MetricTotals) -> MetricTotals:
        """Metric sums added over all processes: means are then over every pair of the step, not per process."""
        if self.world_size == 1:
            return totals
        names = sorted(totals.sums)
        packed = torch.tensor([totals.sums[n] for n in names] + [totals.num_pairs], dtype=torch.float64,
                              device=self.accelerator.device)
        packed = self.accelerator.reduce(packed, reduction="sum").tolist()
        reduced = MetricTotals()
        reduced.add(dict(zip(names, packed[:-1])), int(packed[-1]))
        return reduced

    def any_process(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any (so that all stop at the same step)."""
        if self.world_size == 1:
            return flag
        flags = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flags, reduction="sum").item() > 0)

    def skip_step(self, pair_indices: list[int], what: str) -> None:
        """Leave the weights as they are for this step, and say which pairs were involved."""
        self.state.bad_steps_in_row += 1
        indices = sorted(set(pair_indices))
        places = ", ".join(self.train_locations[i] for i in indices)
        message = f"step {self.state.step + 1}: non-finite {what}; step skipped (pairs: {places})"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        self.log({"skipped": f"non-finite {what}", "pair_indices": indices}, step=self.state.step + 1)

    def save_checkpoint(self) -> Path:
        path = self.output_dir / f"checkpoint-{self.state.step}"
        if self.accelerator.is_main_process or self.sharded:  # FSDP: every process sends its slices
            weights, optimizer_state = gather_training_state(self.accelerator.unwrap_model(self.policy),
                                                             self.optimizer, self.sharded)
        if self.accelerator.is_main_process:
            metrics_lines = (self.output_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines(keepends=True)
            path = save_checkpoint(
                self.output_dir,
                self.state.step,
                weights,
                optimizer_state,
                self.scheduler,
                asdict(self.state),
                metrics_lines,
                yaml.safe_dump(self.config.to_dict(), sort_keys=False),
                keep=self.config.train.save_total_limit or None,
            )
        self.accelerator.wait_for_everyone()
        return path

    def restore(self, checkpoint: Path) -> None:
        """Continue from `checkpoint`: weights, optimizer, schedule, random states, data position, metrics."""
        saved = json.loads((checkpoint / "loop_state.json").read_text(encoding="utf-8"))
        if saved.get("world_size", 1) != self.world_size:
            raise UserError(f"{checkpoint} was written by {saved.get('world_size', 1)} processes; resume it "
                            f"with the same number (now {self.world_size})")
        if saved.get("sharded", False) != self.sharded:
            written, now = ("under FSDP", "without") if saved.get("sharded") else ("without FSDP", "under FSDP")
            raise UserError(f"{checkpoint} was written {written}; resume it the same way (now {now})")
        loop_state, metrics_lines = load_checkpoint(
            checkpoint, self.accelerator.unwrap_model(self.policy), self.optimizer, self.scheduler, self.sharded,
            self.accelerator.is_main_process,
        )
        self.state = RunState(**loop_state)
        if self.accelerator.is_main_process:
            # metrics.jsonl restarts from the checkpoint's copy: rows a killed run wrote after it are dropped
            staging = self.output_dir / (METRICS_FILE + ".tmp")
            staging.write_text("".join(metrics_lines), encoding="utf-8")
            staging.replace(self.output_dir / METRICS_FILE)
        self.accelerator.wait_for_everyone()
        self.accelerator.print(f"resuming from {checkpoint} at step {self.state.step}", flush=True)

    def evaluate(self) -> dict[str, float]:
        # each process scores its share of the pairs with the unwrapped model (no DDP collective); under FSDP every
        # forward is a collective, so each process runs as many batches as the largest share needs
        batch_size = self.config.train.eval_batch_size
        largest_share = math.ceil(len(self.eval_pairs) / self.world_size)
        with self.accelerator.autocast():
            totals = evaluate_totals(
                self.accelerator.unwrap_model(self.policy),
                self.eval_reference,
                self.eval_pairs[self.rank :: self.world_size],
                batch_size=batch_size,
                pad_token_id=self.pad_token_id,
                params=self.loss_params,
                device=self.accelerator.device,
                layout=self.config.train.batch_layout,
                lockstep=(math.ceil(largest_share / batch_size), self.eval_pairs[0]) if self.sharded else None,
            )
        totals = self.reduce(totals)
        results = {**totals.means(), "num_pairs": totals.num_pairs}
        self.log({f"eval_{name}": value for name, value in results.items()})
        self.last_eval = results
        return results

    def log(self, values: dict, step: int | None = None) -> None:
        """One JSON line in metrics.jsonl (with step, epoch and wall time) and the numbers in TensorBoard."""
        if self.metrics_file is None:  # not the main process
            return
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
        accelerator = self.accelerator
        policy = accelerator.unwrap_model(self.policy)
        # FSDP: the whole weights, gathered onto the main process (every process takes part)
        state_dict = accelerator.get_state_dict(self.policy) if self.sharded else None
        if accelerator.is_main_process:
            save_model(policy, self.tokenizer, self.output_dir, merge=self.config.model.merge, state_dict=state_dict)
            save_yaml(self.config, self.output_dir / CONFIG_FILE)
            if self.final_eval is not None:
                (self.output_dir / "eval_results.json").write_text(json.dumps(self.final_eval, indent=2) + "\n")
            print(f"saved the trained model to {self.output_dir}", flush=True)
        del state_dict
        if accelerator.is_main_process or self.sharded:  # sampling from sharded models: every process generates
            self.write_report()
        accelerator.wait_for_everyone()

    def write_report(self) -> None:
        """report.md (written by the main process): config, final metrics, curves, and held-out prompts with
        reference and policy samples."""
        policy = self.accelerator.unwrap_model(self.policy)

        @contextlib.contextmanager
        def reference_model() -> Iterator[torch.nn.Module]:
            if self.reference_model is not None:
                yield self.reference_model
            elif hasattr(policy, "disable_adapter"):  # LoRA: the reference is the policy with its adapter off
                with policy.disable_adapter():
                    yield policy
            else:  # no reference kept (--reference-free, --precompute-ref-log-probs): load it for the report only
                yield self.place_frozen(load_reference_model(self.config.model))

        with self.accelerator.autocast():
            examples = example_rows(policy, reference_model, self.tokenizer, self.report_prompts,
                                    self.config.loss.beta, self.config.sample.max_new_tokens, self.config.train.seed,
                                    self.report_reward)
        if not self.accelerator.is_main_process:
            return
        path = write_report(self.output_dir, self.config.to_dict(), final_metrics_of(self.output_dir), examples,
                            f"preftune run {self.output_dir.name}")
        print(f"wrote {path}", flush=True)

    def cleanup(self) -> None:
        if getattr(self, "metrics_file", None) is not None:
            self.metrics_file.close()
        if getattr(self, "tensorboard", None) is not None:
            self.tensorboard.close()

    def run(self) -> Path:
        try:
            self.setup()
            self.train()
            self.save()
        finally:
            self.cleanup()
        return self.output_dir
