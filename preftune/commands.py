"""The commands: each turns a validated Config into calls of the library and returns what the CLI prints.

cli.py parses the options (and knows which each command takes); the functions here read the config and call
the library modules, which take typed arguments. The Python API (api.py) calls the same recipes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from preftune.config import Config, loss_params
from preftune.data.read import load_and_report, load_prompts
from preftune.errors import UserError

if TYPE_CHECKING:
    from preftune.recipes.pairs import PairRun


def run_train(config: Config) -> Path:
    """`preftune train`: DPO on --data, or without --data the default sentiment job."""
    if config.data.data is None:
        return run_default_job(config)
    from preftune.recipes import dpo

    return dpo.run(config).output_dir


def run_default_job(config: Config) -> Path:
    """The default job: build (or reuse) the sentiment task's pairs, train DPO on them, and write the before/after
    report (tasks/sentiment.py); with --task arithmetic, `run_arithmetic_job`."""
    from preftune.config import resolved_task

    if resolved_task(config, "train") == "arithmetic":
        return run_arithmetic_job(config)
    from preftune.forward.rewards import sentiment_reward
    from preftune.recipes import dpo
    from preftune.tasks.sentiment import REPORT_FILE, prepare_default_job, sentiment_report

    started = time.time()
    source, train_file, eval_file = prepare_default_job(config)
    config.data.data, config.data.eval_data = str(train_file), str(eval_file)

    reports: list[dict] = []

    def report_held_out(run: dpo.PairRun) -> None:  # after the model is saved: the run's models are still held
        reports.append(sentiment_report(run.objective.models, run.tokenizer, config, run.final_eval))

    # report.md shows the ground truth beside the implicit reward
    result = dpo.run(config, hooks=dpo.Hooks(on_save=report_held_out), ground_truth=sentiment_reward())
    report = reports[0]
    report["total_seconds"] = round(time.time() - started, 1)
    (result.output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    ref, pol, kl = report["reference_reward"], report["policy_reward"], report["kl_policy_reference"]
    print(
        "\nDefault job (controlled sentiment, held-out prompts):\n"
        f"  reference reward  {ref['mean']:+.3f} (std {ref['std']:.3f}, positive {ref['positive_fraction']:.0%})\n"
        f"  policy reward     {pol['mean']:+.3f} (std {pol['std']:.3f}, positive {pol['positive_fraction']:.0%})\n"
        f"  reward gain       {report['reward_gain']:+.3f} +- {report['reward_gain_stderr']:.3f} (paired by prompt)\n"
        f"  held-out preference accuracy {report['held_out_preference_accuracy']:.3f}\n"
        f"  KL(policy || reference) {kl['mean']:.2f} +- {kl['stderr']:.2f} nats per completion\n"
        f"  report: {result.output_dir / REPORT_FILE}  ({report['total_seconds']:.0f} s in all)",
        flush=True,
    )
    return result.output_dir


def run_arithmetic_job(config: Config) -> Path:
    """`preftune train --task arithmetic`: DPO on pairs of the reference's own answers labelled by the checker (a
    correct and a wrong answer to the same problem), then the held-out accuracy of reference and policy with
    standard errors, KL, wall time, peak memory and the samples spent (tasks/arithmetic.py)."""
    import resource

    from preftune.recipes import dpo
    from preftune.tasks.arithmetic import REPORT_FILE, arithmetic_report, prepare_arithmetic_job

    started = time.time()
    source, train_file, eval_file, counts = prepare_arithmetic_job(config)
    config.data.data, config.data.eval_data = str(train_file), str(eval_file)
    reports: list[dict] = []

    def report_held_out(run: dpo.PairRun) -> None:  # after the model is saved: the run's models are still held
        reports.append(arithmetic_report(run.objective.models, run.tokenizer, config, run.final_eval))

    result = dpo.run(config, hooks=dpo.Hooks(on_save=report_held_out))
    report = {**reports[0], "pairs": sum(1 for _ in train_file.open()), "samples": counts,
              "total_seconds": round(time.time() - started, 1),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    (result.output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    ref, pol, kl = report["reference_accuracy"], report["policy_accuracy"], report["kl_policy_reference"]
    print(
        f"\nArithmetic task (DPO on {report['pairs']} checker-labelled pairs of the reference's samples, "
        f"{report['held_out_prompts']} held-out problems x {report['samples_per_prompt']} samples):\n"
        f"  reference accuracy {ref['mean']:.3f} +- {ref['stderr']:.3f}\n"
        f"  policy accuracy    {pol['mean']:.3f} +- {pol['stderr']:.3f}\n"
        f"  accuracy gain      {report['accuracy_gain']:+.3f} +- {report['accuracy_gain_stderr']:.3f} (paired by "
        f"problem)\n"
        f"  KL(policy || reference) {kl['mean']:.2f} +- {kl['stderr']:.2f} nats per completion\n"
        f"  {counts['completions_generated']} reference samples for pairs; {report['total_seconds']:.0f} s in all, "
        f"peak RSS {report['peak_rss_gb']:.2f} GB\n"
        f"  report: {result.output_dir / REPORT_FILE}",
        flush=True,
    )
    return result.output_dir


def run_reward_model(config: Config, **inputs) -> PairRun:
    """`preftune reward-model`: a Bradley-Terry reward model on --data (without --data: the default job's pairs,
    with its reward-model settings); prints the held-out accuracy with its 95% interval. `inputs`: the Python API's
    in-memory model, tokenizer and data. Returns the finished run."""
    from preftune.recipes import reward_model

    if config.data.data is None:
        from preftune.config import REWARD_MODEL_DEFAULT_JOB_OVERRIDES
        from preftune.tasks.sentiment import prepare_default_job

        _, train_file, eval_file = prepare_default_job(config, REWARD_MODEL_DEFAULT_JOB_OVERRIDES)
        config.data.data, config.data.eval_data = str(train_file), str(eval_file)
    finished = reward_model.run(config, **inputs)
    held_out = finished.final_eval
    if held_out is not None and finished.group.is_main:
        half_width = 1.96 * held_out["accuracy_stderr"]
        print(f"held-out preference accuracy {held_out['accuracy']:.3f} (95% interval "
              f"{max(0.0, held_out['accuracy'] - half_width):.3f}-{min(1.0, held_out['accuracy'] + half_width):.3f},"
              f" {held_out['num_pairs']} pairs); reward model in {finished.folder}", flush=True)
    return finished


def run_online(config: Config, command: str) -> Path:
    """`preftune ppo` / `rloo` / `online-dpo`: training on the policy's samples scored by --reward; prints the
    held-out result."""
    from preftune.recipes import online_dpo, ppo, rloo

    finished = {"ppo": ppo, "rloo": rloo, "online-dpo": online_dpo}[command].run(config)
    return finished.folder


def accelerator_of(config: Config):
    from preftune.runtime.accelerator import make_accelerator

    return make_accelerator(config.model.bf16)


def inference_models(config: Config, device, with_reference: bool = True, model=None, ref_model=None,
                     tokenizer=None):
    """The frozen --model / --ref-model pair (default reference: the model itself) and the model's tokenizer.
    `model`, `ref_model`, `tokenizer`: already loaded objects (the Python API), used instead of loading."""
    from preftune.evaluation.measure import ModelPair
    from preftune.models.load import frozen, load_model, load_tokenizer, resolve_model

    m = config.model
    if model is None:
        source = resolve_model(m.model, m.cache_dir)
        model = load_model(source, m.trust_remote_code, m.attn_implementation)
    elif model.name_or_path or tokenizer is not None:
        source = model.name_or_path
    else:
        raise UserError("the model given has no name_or_path to load its tokenizer from: pass tokenizer=")
    tokenizer = tokenizer or load_tokenizer(resolve_model(source, m.cache_dir), m.trust_remote_code)
    policy = frozen(model).to(device)
    reference = None
    if with_reference:
        if ref_model is None and m.ref_model is not None:
            ref_model = load_model(resolve_model(m.ref_model, m.cache_dir), m.trust_remote_code, m.attn_implementation)
        reference = frozen(ref_model).to(device) if ref_model is not None else policy
    return ModelPair(policy, reference), tokenizer


def pair_data(config: Config, data=None):
    """--data (or the in-memory `data`) loaded, skipped records reported on stderr."""
    d = config.data
    return load_and_report(data if data is not None else d.data, split=d.split, skip_invalid=d.skip_invalid,
                           name="data", log=stderr)


def tokenized(config: Config, loaded, tokenizer):
    from preftune.data.tokenize import tokenize_for

    d = config.data
    return tokenize_for(loaded.pairs, tokenizer, d.max_length or None, d.truncation_mode, None, log=stderr)


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_eval(config: Config, *, model=None, ref_model=None, tokenizer=None, data=None) -> dict[str, float]:
    """`preftune eval`: the preference metrics of --model against --ref-model (default: itself) on --data."""
    from preftune.evaluation.pairs import evaluate_pairs
    from preftune.forward.reference import reference_source

    if config.data.data is None and data is None:
        raise UserError("preftune eval needs --data (a file of preference pairs or a dataset name)")
    loaded = pair_data(config, data)  # a bad file fails before the models load
    accelerator = accelerator_of(config)
    models, tokenizer = inference_models(config, accelerator.device, True, model, ref_model, tokenizer)
    pairs = tokenized(config, loaded, tokenizer)
    params = loss_params(config.loss)
    reference = reference_source(models.policy, models.reference, params.length_split, params.reference_free)
    with accelerator.autocast():
        return evaluate_pairs(models.policy, reference, pairs, batch_size=config.train.eval_batch_size,
                              pad_token_id=tokenizer.pad_token_id, params=params, device=accelerator.device,
                              layout=config.train.batch_layout)


def run_score(config: Config, *, model=None, ref_model=None, tokenizer=None, data=None) -> list[dict]:
    """`preftune score`: implicit rewards of --data pairs, or of --prompts candidates with their ranks."""
    from preftune.evaluation.pairs import score_candidates, score_pairs

    has_data = config.data.data is not None or data is not None
    if has_data == (config.sample.prompts is not None):
        raise UserError("preftune score needs exactly one of --data (preference pairs) or --prompts (prompts with "
                        "candidate responses)")
    loaded = pair_data(config, data) if has_data else None
    accelerator = accelerator_of(config)
    models, tokenizer = inference_models(config, accelerator.device, True, model, ref_model, tokenizer)
    beta, batch_size = config.loss.beta, config.train.eval_batch_size
    with accelerator.autocast():
        if loaded is not None:
            pairs = tokenized(config, loaded, tokenizer)
            return score_pairs(models.policy, models.reference, loaded.pairs, pairs, beta=beta, batch_size=batch_size,
                               pad_token_id=tokenizer.pad_token_id, device=accelerator.device)
        prompts = load_prompts(config.sample.prompts, with_responses=True)
        return score_candidates(models.policy, models.reference, tokenizer, prompts, beta=beta,
                                batch_size=batch_size, device=accelerator.device)


def run_generate(config: Config) -> list[dict]:
    """`preftune generate`: samples from --model for every prompt of --prompts, as records."""
    from preftune.data.tokenize import prompt_ids
    from preftune.forward.rollout import sample

    s = config.sample
    accelerator = accelerator_of(config)
    models, tokenizer = inference_models(config, accelerator.device, with_reference=False)
    prompts = load_prompts(s.prompts)
    with accelerator.autocast():
        samples = sample(models.policy, tokenizer, [prompt_ids(p.prompt, tokenizer) for p in prompts],
                         num_samples=s.num_samples, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                         top_p=s.top_p, batch_size=config.train.eval_batch_size, seed=config.train.seed)
    return [{"location": prompts[x.prompt_index].location, "prompt": prompts[x.prompt_index].prompt,
             "sample_index": i % s.num_samples, "completion": x.text} for i, x in enumerate(samples)]


def run_judge(config: Config) -> tuple[dict, list[dict]]:
    """`preftune judge`: win rate of --model over --ref-model under --reward, and KL(policy || reference)."""
    from preftune.data.tokenize import prompt_ids
    from preftune.evaluation.judge import judge
    from preftune.forward.rewards import load_rewards

    s = config.sample
    if s.temperature != 1.0 or s.top_p != 1.0:
        raise UserError("judge samples from the models' own distributions (its KL estimate needs them): "
                        "leave --temperature and --top-p at 1")
    accelerator = accelerator_of(config)
    reward = load_rewards(s.reward, s.reward_weights, accelerator.device)  # before the models: a bad --reward fails
    models, tokenizer = inference_models(config, accelerator.device)
    prompts = load_prompts(s.prompts)
    with accelerator.autocast():
        return judge(models, tokenizer, prompts, [prompt_ids(p.prompt, tokenizer) for p in prompts], reward,
                     num_samples=s.num_samples, max_new_tokens=s.max_new_tokens,
                     batch_size=config.train.eval_batch_size, seed=config.train.seed, reward_name=s.reward)


def run_frontier(config: Config) -> Path:
    """`preftune frontier`: the reward-KL frontier of the default job."""
    from preftune.study.frontier import run_frontier as frontier

    return frontier(config, [name.strip() for name in config.default_job.frontier_methods.split(",")])


def run_export(run_dir: str, output: str, outtype: str, force: bool) -> str:
    """`preftune export RUN_DIR --gguf OUT.gguf`: the run's model as one GGUF file; returns what to print."""
    from preftune.models.export import export_gguf

    path = export_gguf(run_dir, output, outtype, force)
    return f"wrote {path} ({outtype}, {path.stat().st_size / 2**20:.1f} MiB)"
