"""The Python API: the recipes the CLI runs, for a notebook or a script.

    import preftune
    result = preftune.train({"beta": 0.1, "max_steps": 10}, model=model, tokenizer=tokenizer,
                            train_data=dataset, output_dir="runs/notebook")
    result.output_dir, result.final_eval, result.model

Options are the CLI's and the YAML file's, by the same names, flat (`beta=0.1`) or by section
(`{"loss": {"beta": 0.1}}`); their documentation is the config reference (`preftune.config`). Models, tokenizers
and data may be given as objects (a loaded transformers model, a `datasets.Dataset`, a list of dicts, a pandas
DataFrame) or as the paths and names the CLI takes. In-memory records get the checks of files, located as
"record N". Errors are raised as `preftune.errors.UserError` (a bad record: `DataError`, naming the record and
field).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.config import Config, apply_yaml, set_option, validate
from preftune.errors import UserError

if TYPE_CHECKING:  # the recipe imports torch: `import preftune` (and the CLI's --help) stays quick
    from preftune.recipes.dpo import TrainResult
    from preftune.recipes.online import OnlineRun
    from preftune.recipes.pairs import PairRun

ConfigLike = Config | Mapping[str, Any] | str | os.PathLike | None


def build_config(config: ConfigLike, options: Mapping[str, Any], command: str) -> Config:
    """A Config from a Config (copied), a mapping of options, or a YAML file's path; `options` override it."""
    origin = f"preftune.{command}()"
    if isinstance(config, Config):
        resolved = copy.deepcopy(config)
    else:
        resolved = Config()
        if isinstance(config, str | os.PathLike):
            apply_yaml(resolved, Path(config))
        elif config is not None:
            for key, value in flatten(config).items():
                set_option(resolved, key, value, origin)
    for key, value in flatten(options).items():
        set_option(resolved, key, value, origin)
    return resolved


def flatten(options: Mapping[str, Any]) -> dict[str, Any]:
    """{"loss": {"beta": 0.1}, "max_steps": 3} -> {"loss.beta": 0.1, "max_steps": 3}."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    return flat


def take(config: Config, key: str, value: Any, what: str) -> Any:
    """A path or name goes into the config (as on the command line); an object is returned to be used as is,
    and the config records what it was."""
    if value is None:
        return None
    if isinstance(value, str | os.PathLike):
        set_option(config, key, os.fspath(value), "preftune API")
        return None
    if hasattr(value, "name_or_path"):  # a loaded model: the saved config says where it came from
        if value.name_or_path:
            set_option(config, key, value.name_or_path, "preftune API")
    else:
        set_option(config, key, f"<in-memory {what}: {type(value).__name__}>", "preftune API")
    return value


def train(
    config: ConfigLike = None, *, model: Any = None, ref_model: Any = None, tokenizer: Any = None,
    train_data: Any = None, eval_data: Any = None, **options: Any,
) -> TrainResult:
    """Train with DPO (or any loss of `preftune.objectives.losses.LOSSES`) on `train_data`; returns the run folder,
    the final held-out metrics (with `eval_data`) and the trained model. `model` is trained in place when it is an
    object, as TRL's DPOTrainer does; the reference is then a frozen copy of it (or `ref_model`, or with LoRA the
    model with its adapter off)."""
    from preftune.recipes import dpo

    resolved = build_config(config, options, "train")
    inputs = dpo.Inputs(
        model=take(resolved, "model.model", model, "model"),
        ref_model=take(resolved, "model.ref_model", ref_model, "ref_model"),
        tokenizer=tokenizer,
        train_data=take(resolved, "data.data", train_data, "train_data"),
        eval_data=take(resolved, "data.eval_data", eval_data, "eval_data"),
    )
    if resolved.data.data is None:
        raise UserError("preftune.train needs train_data: preference pairs (a path, a datasets.Dataset, a list of "
                        "dicts or a pandas.DataFrame)")
    if inputs.ref_model is not None and (resolved.train.precompute_ref_log_probs or resolved.loss.reference_free):
        raise UserError("an in-memory ref_model is not read with precompute_ref_log_probs or reference_free: pass "
                        "its path instead, or leave those off")
    validate(resolved, "train")
    return dpo.run(resolved, inputs)


def evaluate(
    config: ConfigLike = None, *, model: Any = None, ref_model: Any = None, tokenizer: Any = None, data: Any = None,
    **options: Any,
) -> dict[str, float]:
    """The preference metrics (loss, rewards/*, logps/*) of `model` against `ref_model` (default: the model
    itself) on `data`, as `preftune eval` prints them."""
    from preftune.commands import run_eval

    resolved = build_config(config, options, "evaluate")
    objects = pair_objects(resolved, model, ref_model, data)
    validate(resolved, "eval")
    return run_eval(resolved, tokenizer=tokenizer, **objects)


def score(
    config: ConfigLike = None, *, model: Any = None, ref_model: Any = None, tokenizer: Any = None, data: Any = None,
    **options: Any,
) -> list[dict]:
    """Implicit rewards beta * log(pi / pi_ref) of `data`'s chosen and rejected responses (or, with the `prompts`
    option, of candidate responses with their best-of-N rank), one record each, as `preftune score` writes them."""
    from preftune.commands import run_score

    resolved = build_config(config, options, "score")
    objects = pair_objects(resolved, model, ref_model, data)
    validate(resolved, "score")
    return run_score(resolved, tokenizer=tokenizer, **objects)


def reward_model(
    config: ConfigLike = None, *, model: Any = None, tokenizer: Any = None, train_data: Any = None,
    eval_data: Any = None, **options: Any,
) -> PairRun:
    """A Bradley-Terry reward model on `train_data`, as `preftune reward-model` trains it (without train_data: the
    default job's pairs). Returns the finished run: `.folder` holds a plain sequence-classification model that
    the online recipes' `reward` (and `--reward` everywhere) accepts; `.final_eval` the held-out accuracy."""
    from preftune.commands import run_reward_model

    resolved = build_config(config, options, "reward_model")
    inputs = {"model": take(resolved, "model.model", model, "model"), "tokenizer": tokenizer,
              "train_data": take(resolved, "data.data", train_data, "train_data"),
              "eval_data": take(resolved, "data.eval_data", eval_data, "eval_data")}
    validate(resolved, "reward-model")
    return run_reward_model(resolved, **inputs)


def ppo(config: ConfigLike = None, *, reward: Any = None, reward_funcs: Any = None, **options: Any) -> OnlineRun:
    """RLHF with PPO (`preftune ppo`): samples from the policy on the prompts (`prompts` or `data` options, else the
    default job's), scored by `reward`, and a critic. `reward`: a callable (prompt texts, completion texts) -> one
    float per completion, or what `--reward` takes ('sentiment', 'module:function', a reward-model folder).
    `reward_funcs`: instead, TRL's form, a list of reward functions (each called as TRL calls one,
    `f(prompts=..., completions=..., completion_ids=..., **columns)`, or with two parameters per sample as
    `f(prompt, completion)`) or `--reward` names, summed with the `reward_weights` option. Returns the finished
    run (`.folder`, `.final_eval`)."""
    return online_recipe("ppo", config, reward, options, reward_funcs)


def rloo(config: ConfigLike = None, *, reward: Any = None, reward_funcs: Any = None, **options: Any) -> OnlineRun:
    """REINFORCE leave-one-out (`preftune rloo`) on the prompts, against `reward` or `reward_funcs` (as in `ppo`)."""
    return online_recipe("rloo", config, reward, options, reward_funcs)


def online_dpo(config: ConfigLike = None, *, reward: Any = None, reward_funcs: Any = None,
               **options: Any) -> OnlineRun:
    """Online DPO (`preftune online-dpo`): pairs of the policy's own samples ranked by `reward` or `reward_funcs`
    (as in `ppo`)."""
    return online_recipe("online-dpo", config, reward, options, reward_funcs)


def reward_funcs_list(resolved: Config, reward_funcs: Any) -> list:
    """TRL's reward_funcs (a function, a --reward name, or a list of them) as a list; the config records their
    names as --reward (a function as <in-memory reward: name>)."""
    from preftune.forward.rewards import callable_name

    funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    if not funcs or not all(callable(f) or isinstance(f, str | os.PathLike) for f in funcs):
        raise UserError("reward_funcs: give a reward function, a --reward name, or a non-empty list of them")
    names = [f"<in-memory reward: {callable_name(f)}>" if callable(f) else os.fspath(f) for f in funcs]
    set_option(resolved, "sample.reward", ",".join(names), "preftune API")
    return funcs


def in_memory_rewards(resolved: Config, funcs: list) -> Any:
    """`reward_funcs_list`'s functions and names as `Rewards`, weighted by the reward_weights option (after
    `validate`). A name is loaded as --reward loads it (a reward model on the CPU)."""
    from preftune.config import parse_reward_list
    from preftune.forward.rewards import Rewards, load_reward, user_function

    names, weights = parse_reward_list(resolved.sample.reward, resolved.sample.reward_weights)
    return Rewards([user_function(f, name) if callable(f) else load_reward(name)
                    for f, name in zip(funcs, names, strict=True)], weights)


def online_recipe(command: str, config: ConfigLike, reward: Any, options: Mapping[str, Any],
                  reward_funcs: Any = None) -> OnlineRun:
    from preftune.recipes import online_dpo as online_dpo_recipe
    from preftune.recipes import ppo as ppo_recipe
    from preftune.recipes import rloo as rloo_recipe

    options = dict(options)
    if isinstance(options.get("reward_weights"), list | tuple):  # TRL's reward_weights is a list
        options["reward_weights"] = ",".join(str(float(w)) for w in options["reward_weights"])
    resolved = build_config(config, options, command.replace("-", "_"))
    in_memory = funcs = None
    if reward is not None and reward_funcs is not None:
        raise UserError("give reward or reward_funcs, not both")
    if reward_funcs is not None:
        funcs = reward_funcs_list(resolved, reward_funcs)
    elif callable(reward):
        from preftune.forward.rewards import on_texts

        in_memory = on_texts(reward)  # called with (prompt texts, completion texts), chat prompts joined
        name = getattr(reward, "__qualname__", type(reward).__name__)
        set_option(resolved, "sample.reward", f"<in-memory reward: {name}>", "preftune API")
    elif reward is not None:
        set_option(resolved, "sample.reward", os.fspath(reward), "preftune API")
    validate(resolved, command)
    if funcs is not None:
        in_memory = in_memory_rewards(resolved, funcs)
    recipe = {"ppo": ppo_recipe, "rloo": rloo_recipe, "online-dpo": online_dpo_recipe}[command]
    return recipe.run(resolved, reward=in_memory)


def pair_objects(config: Config, model: Any, ref_model: Any, data: Any) -> dict[str, Any]:
    return {"model": take(config, "model.model", model, "model"),
            "ref_model": take(config, "model.ref_model", ref_model, "ref_model"),
            "data": take(config, "data.data", data, "data")}
