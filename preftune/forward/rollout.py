"""Prompts -> sampled completions (batched, KV-cached generation), and the log-probs of what was sampled.

The one sampling path of preftune: reports, the default job's pairs, judge, generate and the frontier all sample
here, so their samples agree for the same seed and batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from preftune.data.batching import Batch, Segment, cheapest_packing, pad_rows, padded_batch, segments_batch
from preftune.forward.logprobs import completion_logps, scored_token_logps, scored_token_statistics
from preftune.runtime.accelerator import sharded_model


@dataclass
class Sample:
    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]  # as sampled, ending at the first EOS (kept) or at max_new_tokens
    text: str  # the completion decoded without special tokens
    # log pi(y_t | x, y_<t) of each completion token from the sampling forward's own logits (temperature 1, before
    # any warping), (len(completion_ids),); only when sample(..., with_logps=True)
    token_logps: torch.Tensor | None = None


class SeededRows(LogitsProcessor):
    """Sampling as an argmax, with one random stream per row: argmax_v(z_v / T + g_v), g_v ~ Gumbel(0, 1) i.i.d., is
    a sample of softmax(z / T) (the Gumbel-max trick), and each row draws its g from its own seed, so what a row
    samples does not depend on the rows batched with it, nor on how many processes share the prompts. Each row
    draws once per generated token, so its t-th token uses its t-th draw whenever the batch ends."""

    def __init__(self, seeds: Sequence[int], temperature: float) -> None:
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform))  # u = 0 gives -inf: that token is not drawn (probability 2**-24)
        return scores.float() / self.temperature + gumbel.to(scores.device)


class DrawnTokenLogps(LogitsProcessor):
    """Records log pi(y_t | x, y_<t) of each drawn token from the sampling forward's own logits, one step at a time:
    at step t it keeps log-softmax of the step's logits (rows, vocabulary), and at step t + 1 reduces it to the
    log-prob of the token drawn at t (the last column of that call's input_ids), so one step's (rows, vocabulary)
    is held, not every step's. First in the processor list: it reads the logits before any other processor and
    returns them unchanged."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []  # (rows,) per reduced step
        self.pending: torch.Tensor | None = None  # (rows, vocabulary): the last step's log-softmax

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, input_ids[:, -1:])[:, 0])
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def token_logps(self, generated: torch.Tensor) -> torch.Tensor:
        """(rows, steps) log-probs of `generated` (rows, steps), the tokens generate returned; reduces the last
        step's logits at its drawn token."""
        if len(self.steps) < generated.shape[1]:
            self.steps.append(self.pending.gather(1, generated[:, len(self.steps) : len(self.steps) + 1])[:, 0])
        self.pending = None
        return torch.stack(self.steps[: generated.shape[1]], dim=1).cpu()


def sample(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    with_logps: bool = False,
    row_seeds: Sequence[int] | None = None,
) -> list[Sample]:
    """Sample `num_samples` completions per prompt, in prompt order, from softmax(logits / T) (top-p only below 1),
    whatever the model's generation_config ships (`neutral_generation_config`). With the defaults (temperature 1,
    top-p 1) the samples follow the model's own distribution, as a KL estimate needs. Deterministic for a given
    seed and batch size. `with_logps`: also each token's log-prob from the logits the sampling computed (what
    `token_logps` computes again with a forward pass, to float rounding; `DrawnTokenLogps`, one step's logits held
    at a time), in `Sample.token_logps`. `row_seeds`: one seed per sample (prompt-major, `num_samples` per prompt;
    `SeededRows`, no top-p), so that each sample depends on its own seed only, not on `seed` or the batch (nor on
    `batch_size`)."""
    if row_seeds is not None and (len(row_seeds) != len(prompt_ids) * num_samples or top_p < 1.0):
        raise ValueError("row_seeds: one seed per sample, and top_p 1")
    if with_logps and row_seeds is None and (temperature != 1.0 or top_p < 1.0):
        # generate's own temperature and top-p warpers run before DrawnTokenLogps (SeededRows' temperature after)
        raise ValueError("with_logps without row_seeds: temperature 1 and top_p 1")
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    sharded = sharded_model(model)
    if sharded:
        # peft's generate calls the inner model, past the root's FSDP hooks: gather the root's own weights
        # (embeddings, final norm, head) for the whole generation; the layers gather theirs in their forwards
        model.unshard()
    jobs = [(i, list(ids)) for i, ids in enumerate(prompt_ids) for _ in range(num_samples)]
    samples: list[Sample] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        input_ids, attention_mask = left_padded([ids for _, ids in chunk], tokenizer.pad_token_id)
        seeds = None if row_seeds is None else row_seeds[start : start + batch_size]
        options = draw_options(temperature, top_p, seeds)
        recorder = DrawnTokenLogps() if with_logps else None
        if recorder is not None:
            options["logits_processor"] = LogitsProcessorList([recorder, *options.get("logits_processor", [])])
        with torch.no_grad(), neutral_generation_config(model):
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                # sharded weights (FSDP): every forward is a collective, so a process whose samples all ended
                # keeps running forwards until every process's have
                synced_gpus=sharded,
                **options,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                return_dict_in_generate=True,
            )
        generated = output.sequences[:, input_ids.shape[1] :]
        logps = None if recorder is None else recorder.token_logps(generated)
        for row, (prompt_index, ids) in enumerate(chunk):
            completion = generated[row].tolist()
            if eos in completion:
                completion = completion[: completion.index(eos) + 1]
            text = tokenizer.decode(completion, skip_special_tokens=True)
            token_logps = None if logps is None else logps[row, : len(completion)].clone()
            samples.append(Sample(prompt_index, ids, completion, text, token_logps))
    torch.random.set_rng_state(generator_state)
    if sharded:
        model.reshard()
    model.train(was_training)
    return samples


@contextmanager
def neutral_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """For the duration, every module of `model` that generates (the model itself, or the one inside a peft wrapper
    or under FSDP) has a fresh `GenerationConfig()` as its `generation_config`, put back after. generate fills each
    option it is not passed from the model's generation_config, which a checkpoint ships (Qwen2.5-Instruct:
    repetition_penalty 1.05; others no_repeat_ngram_size, min_new_tokens, suppress_tokens, bad_words_ids, min_p ...):
    with a fresh one, only the options sample passes reach the sampler, so the samples come from softmax(logits / T),
    the distribution whose raw-logit log-probs the losses and the KL use."""
    generating = [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    shipped = [m.generation_config for m in generating]
    for m in generating:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, config in zip(generating, shipped):
            m.generation_config = config


def left_padded(prompts: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), (N, longest): left padding, so every prompt ends at the column where
    generation starts."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def draw_options(temperature: float, top_p: float, seeds: Sequence[int] | None) -> dict:
    """generate's options for drawing each token: its own sampling from the global generator, or with one seed per
    row, SeededRows' draw in the scores and generate's argmax of them."""
    if seeds is None:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
    return {"do_sample": False, "logits_processor": LogitsProcessorList([SeededRows(seeds, temperature)]),
            "temperature": None, "top_k": None, "top_p": None}


def in_micro_batches(compute: Callable[[Sequence[Sample]], torch.Tensor], samples: Sequence[Sample],
                     size: int) -> torch.Tensor:
    """`compute` (samples -> (len, ...)) over consecutive slices of at most `size` samples, concatenated along
    rows: what one call over all the samples gives (each row depends on its own sample only), with at most `size`
    samples' activations alive at once."""
    return torch.cat([compute(samples[start : start + size]) for start in range(0, len(samples), size)])


def sequence_logps_of_samples(
    model: torch.nn.Module, samples: Sequence[Sample], pad_token_id: int, batch_size: int = 32
) -> torch.Tensor:
    """Summed log-prob of each sample's completion under `model`, shape (len(samples),)."""
    totals = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            rows = pad_rows([s.prompt_ids for s in chunk], [s.completion_ids for s in chunk], pad_token_id)
            sums, _ = completion_logps(model, *rows)
            totals.append(sums.float())
    return torch.cat(totals)


def completion_mask(samples: Sequence[Sample], width: int) -> torch.Tensor:
    """(B, width) bool: True on each sample's completion tokens."""
    lengths = torch.tensor([len(s.completion_ids) for s in samples])
    return torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)


def sample_rows(samples: Sequence[Sample], pad_token_id: int, device: torch.device | str,
                layout: str = "padded") -> Batch:
    """The samples as a Batch, sequence i being samples[i], in a `train.batch_layout`: padded, one right-padded
    prompt + completion row each (positions as sampled); shared_prefix, the samples of one prompt as one segment
    (prompt | completion 1 | completion 2 ..., the prompt computed once), a row each; packed, those segments
    several to a row. The same log-probs in each, to float rounding."""
    if layout == "padded":
        rows = pad_rows([s.prompt_ids for s in samples], [s.completion_ids for s in samples], pad_token_id)
        return padded_batch(*rows, pair_indices=[]).to(device)
    of_prompt: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        of_prompt.setdefault(s.prompt_index, []).append(i)
    segments = [Segment(samples[members[0]].prompt_ids, [samples[i].completion_ids for i in members], members)
                for members in of_prompt.values()]
    rows = ([[i] for i in range(len(segments))] if layout == "shared_prefix"
            else cheapest_packing([len(segment) for segment in segments]))
    return segments_batch(segments, rows, pad_token_id, pair_indices=[]).to(device)


def per_token(values: torch.Tensor, batch: Batch, rows: int, width: int) -> torch.Tensor:
    """(T,) values of a Batch's scored tokens -> (rows, width): token t of sequence r at [r, t], 0 elsewhere."""
    placed = values.new_zeros(rows, width)
    placed[batch.token_sequences, batch.token_ranks] = values
    return placed


def token_logps(
    model: torch.nn.Module, samples: Sequence[Sample], pad_token_id: int, width: int, device: torch.device | str,
    layout: str = "padded",
) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every completion token, (B, width), 0 past a completion's end; with gradients
    unless called under no_grad. Through forward/logprobs.py's forward (the output head only at completion positions),
    the samples laid out as `sample_rows` does."""
    batch = sample_rows(samples, pad_token_id, device, layout)
    values, _ = scored_token_logps(model, batch)
    return per_token(values, batch, len(samples), width)


def token_logps_and_entropies(
    model: torch.nn.Module, samples: Sequence[Sample], pad_token_id: int, width: int, device: torch.device | str,
    layout: str = "padded",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps`, and the entropy of the policy's distribution at each completion token's position (GRPO's
    metric and --top-entropy-quantile; detached), both (B, width), 0 past a completion's end."""
    batch = sample_rows(samples, pad_token_id, device, layout)
    values, _, entropies = scored_token_statistics(model, batch, entropy=True)
    return per_token(values, batch, len(samples), width), per_token(entropies, batch, len(samples), width)


def sampled_token_logps(samples: Sequence[Sample], width: int, device: torch.device | str) -> torch.Tensor:
    """The samples' `token_logps` (from sampling) as token_logps lays them out, (B, width)."""
    placed = torch.zeros(len(samples), width)
    for row, s in enumerate(samples):
        placed[row, : len(s.completion_ids)] = s.token_logps
    return placed.to(device)
