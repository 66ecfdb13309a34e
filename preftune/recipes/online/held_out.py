"""The held-out measurement: the ground-truth reward of the policy's samples on the held-out prompts and
KL(policy || reference), during training (`evaluate`, logged as eval_*) and at the end against the reference
(`held_out_report`, written by `write_held_out_report` to rl_report.json and report.md)."""

from __future__ import annotations

import json
import resource
from collections.abc import Callable
from typing import Any

from preftune.evaluation.measure import measure, paired_gain, summarize
from preftune.recipes.online.state import OnlineRun

REPORT_FILE = "rl_report.json"


def evaluate(run: OnlineRun, on_evaluate: Callable[[OnlineRun, dict], None] | None = None) -> dict[str, float]:
    """Mean ground-truth reward of the policy's samples on the held-out prompts and KL(policy || reference), each
    with its standard error, logged as eval_*."""
    c = run.config
    with run.group.accelerator.autocast():
        measured = measure(run.models, run.tokenizer, [p.ids for p in run.eval_prompts],
                           num_samples=c.default_job.samples_per_eval_prompt, max_new_tokens=c.sample.max_new_tokens,
                           seed=c.train.seed + 7, sample_reference=False, reward=run.eval_reward,
                           prompts=[p.given for p in run.eval_prompts],
                           columns=[p.columns for p in run.eval_prompts])
    rewards = summarize(measured.policy_rewards, c.default_job.samples_per_eval_prompt)
    results = {"reward": rewards["mean"], "reward_stderr": rewards["stderr"], "kl": measured.kl.mean,
               "kl_stderr": measured.kl.stderr, "num_samples": measured.kl.num_samples}
    run.log({f"eval_{name}": value for name, value in results.items()})
    run.last_eval = results
    if on_evaluate is not None:
        on_evaluate(run, results)
    return results


def held_out_report(run: OnlineRun) -> dict[str, Any]:
    """The reference's and the trained policy's held-out reward (same prompts, seed and sample count), the gain,
    and KL(policy || reference) from the policy's samples; written to rl_report.json. Standard errors take each
    prompt's samples as one cluster, and the gain's pairs the two models by prompt (`measure.paired_gain`); the
    per-sample rewards (prompt-major) are kept so that other statistics can be computed later."""
    c = run.config
    per_prompt = c.default_job.samples_per_eval_prompt
    with run.group.accelerator.autocast():
        measured = measure(run.models, run.tokenizer, [p.ids for p in run.eval_prompts],
                           num_samples=per_prompt, max_new_tokens=c.sample.max_new_tokens,
                           seed=c.train.seed + 7, reward=run.eval_reward,
                           prompts=[p.given for p in run.eval_prompts],
                           columns=[p.columns for p in run.eval_prompts])
    policy = summarize(measured.policy_rewards, per_prompt)
    reference = summarize(measured.reference_rewards, per_prompt)
    gain = paired_gain(measured.policy_rewards, measured.reference_rewards, per_prompt)
    return {
        "method": run.objective.command,
        "reward": run.eval_reward_name,
        "trained_on_reward": run.reward_name,
        "held_out_prompts": len(run.eval_prompts),
        "samples_per_prompt": per_prompt,
        "reference_reward": reference,
        "policy_reward": policy,
        "reward_gain": gain["mean"],
        "reward_gain_stderr": gain["stderr"],  # paired by prompt, clustered by prompt
        "kl_policy_reference": {"mean": measured.kl.mean, "stderr": measured.kl.stderr,
                                "num_samples": measured.kl.num_samples},
        "rewards": {"policy": measured.policy_rewards, "reference": measured.reference_rewards},
        "steps": run.state.step,
        "completions_generated": completions_generated(run),
        "examples": [{"prompt": run.eval_prompts[i].text,
                      "reference": measured.reference_samples[i * per_prompt].text,
                      "policy": measured.policy_samples[i * per_prompt].text}
                     for i in range(min(5, len(run.eval_prompts)))],
    }


def completions_generated(run: OnlineRun) -> int:
    """Completions sampled for training so far, over all processes (the held-out measurement's not counted)."""
    c = run.config
    return run.state.step * c.rl.rollout_batch_size * c.rl.num_generations * run.group.world_size


def write_held_out_report(run: OnlineRun) -> None:
    """Measure the reference and the trained policy on the held-out prompts (`held_out_report`; none: nothing) and
    write rl_report.json, the summary line and report.md. Sharded models sample only with every process taking
    part: each measures the same prompts with the same seeds (as `evaluate` does in every process), and the main
    process writes."""
    from preftune.evaluation.report import cell, write_report

    group = run.group
    report = held_out_report(run) if run.eval_prompts and (group.is_main or group.sharded) else None
    if report is None or not group.is_main:
        return
    report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # this process's
    (run.folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    ref, pol, kl = report["reference_reward"], report["policy_reward"], report["kl_policy_reference"]
    print(f"held-out reward ({run.eval_reward_name}): reference {ref['mean']:+.3f} +- {ref['stderr']:.3f}, policy "
          f"{pol['mean']:+.3f} +- {pol['stderr']:.3f} (gain {report['reward_gain']:+.3f} +- "
          f"{report['reward_gain_stderr']:.3f}); KL(policy || reference) {kl['mean']:.2f} +- {kl['stderr']:.2f}",
          flush=True)
    rows = [f"| {cell(e['prompt'])} | {cell(e['reference'])} | {cell(e['policy'])} |" for e in report["examples"]]
    summary = [f"Held-out reward ({run.eval_reward_name}, {report['held_out_prompts']} prompts x "
               f"{report['samples_per_prompt']} samples): reference {ref['mean']:+.3f} +- {ref['stderr']:.3f}, "
               f"policy {pol['mean']:+.3f} +- {pol['stderr']:.3f}, gain {report['reward_gain']:+.3f} +- "
               f"{report['reward_gain_stderr']:.3f}; KL(policy || reference) {kl['mean']:.2f} +- "
               f"{kl['stderr']:.2f} nats per completion; {report['steps']} rollouts, "
               f"{report['completions_generated']} completions generated. Standard errors take each prompt's "
               "samples as one cluster; the gain's pairs policy and reference by prompt."]
    write_report(run.folder, run.config.to_dict(), summary, rows,
                 f"preftune {run.objective.command} run {run.folder.name}")
