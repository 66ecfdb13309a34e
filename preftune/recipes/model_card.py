"""README.md, a model card in the Hugging Face convention, in every model folder preftune saves: the DPO policy
(all weights, merged LoRA, or the LoRA adapter), the PPO and RLOO policies, and the reward model (and the
adapter/ folder beside a merged one).

A card is YAML front matter (base_model, library_name, license carried from the base's own card, datasets when
they are hub datasets, tags, pipeline_tag), then the method with its papers, the training data, the resolved
hyperparameters, the final metrics (the held-out evaluation of eval_results.json and the training means of the
last epoch) and how to load the folder. The hub renders the file as it is, so the front matter is written by
yaml.safe_dump. `model_card` is a pure function of the config, the saved model's facts and the metrics;
`write_model_cards` gathers those for a finished run and writes the cards. The folders are the run's own output,
so a README.md there is preftune's to write; the base model's card is only read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from preftune.config import Config, resolved_num_ppo_epochs
from preftune.data.read import is_hub_dataset
from preftune.errors import UserError
from preftune.evaluation.plot import read_metrics
from preftune.evaluation.report import TrainingMeans, last_epoch_means
from preftune.models.load import DEFAULT_MODEL_GGUF, DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_LICENSE, DEFAULT_MODEL_NAME
from preftune.objectives.losses import LOSSES, parse_loss_list

if TYPE_CHECKING:
    import torch

CARD_FILE = "README.md"
RECIPES = ("dpo", "reward-model", "ppo", "rloo", "grpo", "online-dpo")
POLICY_RECIPES = ("dpo", "ppo", "rloo", "grpo", "online-dpo")  # the others save a reward model
# what a folder holds: all weights trained; a LoRA adapter merged into the base (a plain model); the adapter itself
FORMS = ("full", "merged", "adapter")
# fields of the base model's card that hold for a model trained from it
CARRIED_FIELDS = ("license", "license_name", "license_link", "language")

DPO_PAPER = ("Rafailov et al. 2023, Direct Preference Optimization: Your Language Model is Secretly a Reward Model, "
             "arXiv:2305.18290")
BRADLEY_TERRY = ("Bradley and Terry 1952, Rank Analysis of Incomplete Block Designs: I. The Method of Paired "
                 "Comparisons, Biometrika 39(3/4)")
OUYANG = "Ouyang et al. 2022, Training language models to follow instructions with human feedback, arXiv:2203.02155"
CENTERING = ("Eisenstein et al. 2023, Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate "
             "Reward Hacking, arXiv:2312.09244")
LORA_PAPER = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685"
QLORA_PAPER = "Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs, arXiv:2305.14314"
CDPO = "Mitchell 2023, A note on DPO with noisy preferences and relationship to IPO (no arXiv id)"
F_DPO = ("Wang et al. 2023, Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence "
         "Constraints, arXiv:2309.16240")
LD_DPO = "Liu et al. 2024, Length Desensitization in Direct Preference Optimization, arXiv:2409.06411"
WPO = "Zhou et al. 2024, WPO: Enhancing RLHF with Weighted Preference Optimization, arXiv:2406.11827"
TR_DPO = "Gorbatovski et al. 2024, Learn Your Reference Model for Real Good Alignment, arXiv:2404.09656"
PPO_PAPER = "Schulman et al. 2017, Proximal Policy Optimization Algorithms, arXiv:1707.06347"
ZIEGLER = "Ziegler et al. 2019, Fine-Tuning Language Models from Human Preferences, arXiv:1909.08593"
GAE_PAPER = ("Schulman et al. 2016, High-Dimensional Continuous Control Using Generalized Advantage Estimation, "
             "arXiv:1506.02438")
RLOO_PAPER = ("Ahmadian et al. 2024, Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human "
              "Feedback in LLMs, arXiv:2402.14740")
ONLINE_DPO_PAPER = "Guo et al. 2024, Direct Language Model Alignment from Online AI Feedback, arXiv:2402.04792"
GRPO_PAPER = ("Shao et al. 2024, DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models, "
              "arXiv:2402.03300")
GSPO_PAPER = "Zheng et al. 2025, Group Sequence Policy Optimization, arXiv:2507.18071"

# the config sections a recipe reads: the card shows these of the resolved config
RECIPE_SECTIONS = {"dpo": ("model", "data", "loss", "train"),
                   "reward-model": ("model", "data", "train", "reward_model"),
                   "ppo": ("model", "data", "sample", "train", "rl"),
                   "rloo": ("model", "data", "sample", "train", "rl"),
                   "grpo": ("model", "data", "loss", "sample", "train", "rl"),
                   "online-dpo": ("model", "data", "loss", "sample", "train", "rl")}


@dataclass(frozen=True)
class BaseModel:
    """What a run started from."""

    name: str | None  # a hub id or the path given; None: an in-memory model without a name
    on_hub: bool = False  # `name` is a hub id (the card links to it)
    card: dict[str, Any] = field(default_factory=dict)  # CARRIED_FIELDS found in the base's own card


@dataclass(frozen=True)
class SavedModel:
    """The facts of one saved folder that the config does not hold."""

    recipe: str  # one of RECIPES
    form: str  # one of FORMS
    name: str  # the run's name (its folder's), the card's title
    path: str  # the folder, as the loading snippet names it
    tokenizer_path: str  # the folder that holds the tokenizer (an adapter/ folder has none of its own)
    base: BaseModel
    num_train_pairs: int
    num_eval_pairs: int
    steps: int  # optimizer steps run
    num_processes: int = 1


# ---- reading cards ---------------------------------------------------------------------------------------------
def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card ("---" lines around it, at the top) as a mapping; {} when there is none
    or it is not a valid YAML mapping (a base's broken card must not stop a save)."""
    match = re.match(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", text, re.DOTALL | re.MULTILINE)
    if match is None:
        return {}
    try:
        loaded = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def carried(front_matter: dict[str, Any]) -> dict[str, Any]:
    return {name: front_matter[name] for name in CARRIED_FIELDS if front_matter.get(name) not in (None, "", [])}


def hub_card(repo_id: str) -> dict[str, Any]:
    """The front matter of a hub model's README.md, from the hub cache or downloaded (a few kB; honours
    HF_HUB_OFFLINE). Best effort: {} without network, for a gated repository or one with no card."""
    try:
        from huggingface_hub import hf_hub_download

        return read_front_matter(Path(hf_hub_download(repo_id, CARD_FILE)).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - any failure only leaves the license out of the card
        return {}


def hub_id_of_cache_path(path: Path) -> str | None:
    """'owner/name' of a folder in the hub cache (.../models--owner--name/snapshots/REVISION), else None."""
    match = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]", str(path.resolve()) + "/")
    return f"{match.group(1)}/{match.group(2)}" if match else None


def base_model_of(name: str | None, source: str) -> BaseModel:
    """The base of a run from --model as given (`name`) and the folder or hub id it resolved to (`source`): the
    embedded default is SmolLM2-135M-Instruct (its hub id and license); a local folder is named by its path
    (its hub id if it is a hub-cache snapshot) and its license read from its own README.md; a hub id's card
    (and a snapshot's without one) is read from the hub."""
    default = BaseModel(DEFAULT_MODEL_HUB_ID, True, {"license": DEFAULT_MODEL_LICENSE})
    if name is None:  # the embedded default, or an in-memory model without a name_or_path
        return default if Path(source).name == DEFAULT_MODEL_NAME else BaseModel(None)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return default if path.name == DEFAULT_MODEL_GGUF else BaseModel(name)
    if path.is_dir():
        readme, hub_id = path / CARD_FILE, hub_id_of_cache_path(path)
        if readme.is_file():
            card = read_front_matter(readme.read_text(encoding="utf-8", errors="replace"))
        else:  # a hub snapshot holds only the files that were downloaded; its card is on the hub
            card = hub_card(hub_id) if hub_id else {}
        return BaseModel(hub_id or name, hub_id is not None, carried(card))
    return BaseModel(name, True, carried(hub_card(name)))


# ---- the card ----------------------------------------------------------------------------------------------------
def loss_names(config: Config) -> tuple[tuple[str, ...], tuple[float, ...]]:
    loss = config.loss
    return parse_loss_list(loss.loss_type, loss.loss_weights, loss.rpo_alpha)


def hub_datasets(config: Config) -> list[str]:
    """The training and held-out data that are hub datasets (local files and in-memory records have no name there)."""
    names: list[str] = []
    for source in (config.data.data, config.data.eval_data):
        if is_hub_dataset(source) and source not in names:
            names.append(source)  # type: ignore[arg-type]
    return names


def front_matter(config: Config, model: SavedModel) -> dict[str, Any]:
    """The card's metadata, in the hub's field names."""
    meta: dict[str, Any] = {}
    if model.base.name is not None:
        meta["base_model"] = model.base.name
        meta["base_model_relation"] = "adapter" if model.form == "adapter" else "finetune"
    meta["library_name"] = "peft" if model.form == "adapter" else "transformers"
    meta.update(model.base.card)
    datasets = hub_datasets(config)
    if datasets:
        meta["datasets"] = datasets
    if model.recipe == "dpo":
        names, _ = loss_names(config)
        tags = ["preftune", "dpo", *dict.fromkeys(names)]
    elif model.recipe in POLICY_RECIPES:
        tags = ["preftune", model.recipe, "rlhf"]
    else:
        tags = ["preftune", "reward-model", "bradley-terry"]
    if config.model.lora:
        tags.append("lora")
    meta["tags"] = tags
    meta["pipeline_tag"] = "text-generation" if model.recipe in POLICY_RECIPES else "text-classification"
    return meta


def linked(citation: str) -> str:
    """A citation with its arXiv id as a link."""
    return re.sub(r"arXiv:(\d{4}\.\d{4,5})", r"[arXiv:\1](https://arxiv.org/abs/\1)", citation)


def base_text(base: BaseModel) -> str:
    if base.name is None:
        return "an in-memory model (no name recorded)"
    return f"[{base.name}](https://huggingface.co/{base.name})" if base.on_hub else f"`{base.name}`"


def dpo_method(config: Config) -> tuple[list[str], list[str]]:
    """The method paragraphs of a DPO-family run and the papers they cite."""
    c, loss = config, config.loss
    names, weights = loss_names(config)
    if loss.reference_free:
        reference = "none (`reference_free`: log pi_ref = 0)"
    elif c.model.ref_model is not None:
        reference = f"`{c.model.ref_model}`, frozen"
    elif c.model.lora:
        reference = "the base model (the policy with its LoRA adapter switched off)"
    else:
        reference = "a frozen copy of the starting model"
    if c.train.precompute_ref_log_probs and not loss.reference_free:
        reference += "; its log-probabilities were computed once before training"
    lines = [
        "Trained with Direct Preference Optimization (DPO), with the loss below: the policy is fitted directly to "
        "(prompt, chosen, rejected) pairs against a reference model, with no reward model and no sampling in the "
        "loop. The trained policy is also an implicit reward model, r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)), "
        f"beta = {loss.beta}.",
        "",
        f"Reference model: {reference}.",
        "",
        "Loss" + (" (the weighted sum of the per-loss means)" if len(names) > 1 else "") + ":",
        "",
    ]
    papers = [DPO_PAPER]
    for name, weight in zip(names, weights, strict=True):
        spec = LOSSES[name]
        lines.append(f"- `{name}`" + (f" (weight {weight:g})" if len(names) > 1 else "") + f": {spec.meaning}; "
                     + linked(spec.paper))
        papers.append(spec.paper)
    options = []
    if "sigmoid" in names and loss.label_smoothing:
        options.append((f"label smoothing {loss.label_smoothing} (cDPO)", CDPO))
    if loss.f_divergence_type != "reverse_kl":
        options.append((f"f-divergence `{loss.f_divergence_type}` (f-DPO)", F_DPO))
    if loss.ld_alpha is not None:
        options.append((f"LD-DPO, ld_alpha {loss.ld_alpha}", LD_DPO))
    if loss.use_weighting:
        options.append(("WPO weighting of each pair", WPO))
    if c.train.sync_ref_model:
        options.append((f"TR-DPO reference updates (alpha {c.train.ref_model_mixup_alpha}, every "
                        f"{c.train.ref_model_sync_steps} steps)", TR_DPO))
    lines += [f"- {what}: {linked(paper)}" for what, paper in options]
    return lines, papers + [paper for _, paper in options]


def reward_method(config: Config) -> tuple[list[str], list[str]]:
    coefficient = config.reward_model.center_rewards_coefficient
    lines = [
        "A Bradley-Terry reward model: one output of a sequence-classification head over the base model, read at "
        "each sequence's last token that is not padding, trained on (prompt, chosen, rejected) pairs with the loss "
        "-log sigmoid(r(x, y_chosen) - r(x, y_rejected)) (Ouyang et al. 2022, eq. 1)"
        + (f" + {coefficient} * (r(x, y_chosen) + r(x, y_rejected))^2, which centres the rewards on 0 "
           "(Eisenstein et al. 2023, eq. 2)" if coefficient is not None else "") + ".",
    ]
    return lines, [BRADLEY_TERRY, OUYANG, *([CENTERING] if coefficient is not None else [])]


def rl_method(config: Config, recipe: str) -> tuple[list[str], list[str]]:
    """The method paragraphs of a PPO, RLOO or online DPO run and the papers they cite."""
    r, s = config.rl, config.sample
    reference = (f"`{config.model.ref_model}`, frozen" if config.model.ref_model is not None
                 else "the base model (the policy with its LoRA adapter switched off)" if config.model.lora
                 else "a frozen copy of the starting model")
    kl = (f"adapted towards {r.kl_target} nats per completion from {r.kl_coef}" if r.kl_target is not None
          else f"{r.kl_coef}")
    if recipe == "ppo":
        lines = ["Trained with RLHF by PPO (actor-critic): completions sampled from the policy are scored by the "
                 f"reward `{s.reward}`; per-token rewards are -kl_coef * (log pi - log pi_ref) with the score added at "
                 f"the last token (kl_coef {kl}); a critic gives GAE advantages (gamma {r.gamma}, lambda {r.lam}), "
                 f"and the policy and critic minimise PPO's clipped surrogate (clip {r.cliprange}) and vf_coef "
                 f"{r.vf_coef} times the clipped value loss (clip {r.cliprange_value})."]
        papers = [ZIEGLER, OUYANG, PPO_PAPER, GAE_PAPER]
    elif recipe == "online-dpo":
        names, _ = loss_names(config)
        lines = ["Trained with online DPO: each rollout samples two completions per prompt from the policy, ranks "
                 f"them by the reward `{s.reward}` into (chosen, rejected), leaves out ties, and takes a step of the "
                 f"{', '.join(names)} loss (beta {config.loss.beta}) against the reference."]
        papers = [ONLINE_DPO_PAPER, DPO_PAPER]
    elif recipe == "grpo":
        return grpo_method(config, reference)
    else:
        lines = [f"Trained with RLHF by RLOO: {r.num_generations} completions per prompt sampled from the policy "
                 f"are scored by the reward `{s.reward}` less kl_coef * sum_t (log pi - log pi_ref) (kl_coef {kl}); "
                 "each is baselined by the mean reward of the other samples of its prompt, and the policy minimises "
                 f"the clipped surrogate (clip {r.cliprange}) on sequence log-probabilities. No critic."]
        papers = [RLOO_PAPER, ZIEGLER]
    return [*lines, "", f"Reference model: {reference}."], papers


def grpo_method(config: Config, reference: str) -> tuple[list[str], list[str]]:
    """The method paragraph of a GRPO run: its loss type, reward scaling, clip and KL, and the papers."""
    from preftune.objectives.group_relative import GRPO_LOSSES

    r, s, lo = config.rl, config.sample, config.loss
    spec = GRPO_LOSSES[lo.loss_type]
    scaling = {"group": "divided by its group's reward std + 1e-4", "batch": "divided by the rollout's reward std "
               "+ 1e-4", "none": "not scaled"}[r.scale_rewards]
    level = "one per completion (GSPO)" if r.importance_sampling_level == "sequence" else "per token"
    kl = (f"plus beta {lo.beta:g} times the k3 estimate of the KL to the reference" if lo.beta != 0
          else "no KL term (beta 0)")
    high = r.epsilon if r.epsilon_high is None else r.epsilon_high
    lines = [f"Trained with RLHF by GRPO: {r.num_generations} completions per prompt sampled from the policy are "
             f"scored by the reward `{s.reward}`; each one's advantage is its reward less its group's mean, "
             f"{scaling}. The policy minimises the {lo.loss_type} loss ({spec.meaning}; importance weights {level}, "
             f"epsilon {r.epsilon:g}, epsilon_high {high:g}), {kl}, over {r.num_iterations} pass(es) per rollout, "
             "as TRL 1.16's GRPOTrainer. No critic."]
    papers = [GRPO_PAPER, *([spec.paper] if spec.paper != GRPO_PAPER and "arXiv" in spec.paper else []),
              *([GSPO_PAPER] if r.importance_sampling_level == "sequence" else [])]
    return [*lines, "", f"Reference model: {reference}."], papers


def form_text(model: SavedModel) -> str:
    kind = "policy" if model.recipe in POLICY_RECIPES else "reward model"
    if model.form == "full":
        return f"This folder holds the trained {kind}: all weights, as a plain transformers model."
    if model.form == "merged":
        return (f"This folder holds the trained {kind} with its LoRA adapter merged into the base weights, as a plain "
                "transformers model; the adapter itself is in `adapter/`.")
    return f"This folder holds the LoRA adapter of the trained {kind} (peft format); the base weights are not in it."


def value_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def hyperparameter_rows(config: Config, model: SavedModel) -> list[tuple[str, Any]]:
    c, t = config, config.train
    rows: list[tuple[str, Any]] = []
    if model.recipe == "dpo":
        names, weights = loss_names(config)
        rows += [("loss", ", ".join(names)), *([("loss weights", ", ".join(f"{w:g}" for w in weights))]
                                               if len(names) > 1 else []), ("beta", c.loss.beta)]
    elif model.recipe in POLICY_RECIPES:
        r = c.rl
        if model.recipe == "online-dpo":
            rows += [("loss", ", ".join(loss_names(config)[0])), ("beta", c.loss.beta)]
        elif model.recipe == "grpo":
            rows += [("loss", c.loss.loss_type), ("beta", c.loss.beta), ("scale_rewards", r.scale_rewards),
                     ("importance_sampling_level", r.importance_sampling_level)]
        else:
            rows += [("kl_coef", r.kl_coef), *([("kl_target", r.kl_target)] if r.kl_target is not None else [])]
        processes = f"{model.num_processes} process" + ("es" if model.num_processes > 1 else "")
        rows += [("completions per rollout", f"{r.rollout_batch_size * r.num_generations * model.num_processes} "
                                             f"({r.rollout_batch_size} prompts x {r.num_generations} samples x "
                                             f"{processes})"),
                 ("max new tokens", c.sample.max_new_tokens),
                 ("epochs x minibatches per rollout", f"{resolved_num_ppo_epochs(c, model.recipe)} x "
                                                      f"{r.num_mini_batches}")]
    elif c.reward_model.center_rewards_coefficient is not None:
        rows.append(("center_rewards_coefficient", c.reward_model.center_rewards_coefficient))
    offline = model.recipe not in ("ppo", "rloo", "grpo", "online-dpo")
    rows += [
        ("learning rate", f"{t.learning_rate:g} (AdamW, betas {t.adam_beta1:g}, {t.adam_beta2:g}, weight decay "
                          f"{t.weight_decay:g})"),
        ("schedule", f"{t.lr_scheduler_type}, warmup ratio {t.warmup_ratio:g}"),
        *([("pairs per optimizer step", f"{t.batch_size * t.grad_accum * model.num_processes} (batch {t.batch_size} x "
                                        f"grad_accum {t.grad_accum} x {model.num_processes} process"
                                        + ("es" if model.num_processes > 1 else "") + ")")] if offline else []),
        ("optimizer steps" if offline else "rollouts",
         f"{model.steps}" + (f" (max_steps {t.max_steps})" if t.max_steps > 0 else f" (num_epochs {t.num_epochs:g})")),
        ("max gradient norm", t.max_grad_norm),
        *([("max length", f"{c.data.max_length or 'no limit'} ({c.data.truncation_mode})")] if offline else []),
        ("precision", "bf16 autocast, fp32 weights" if c.model.bf16 else "fp32"),
        ("seed", t.seed),
    ]
    if c.model.lora:
        rows.append(("LoRA", f"r {c.model.lora_r}, alpha {c.model.lora_alpha}, dropout {c.model.lora_dropout:g}, "
                             f"targets {c.model.lora_target_modules}" + (", 4-bit NF4 base (QLoRA)"
                                                                         if c.model.load_in_4bit else "")))
    return rows


def metric_lines(eval_results: dict[str, Any] | None, training: TrainingMeans | None, recipe: str) -> list[str]:
    lines: list[str] = []
    if eval_results:
        counted = (f"{eval_results['num_samples']} samples" if "num_samples" in eval_results
                   else f"{eval_results.get('num_pairs', '?')} pairs")
        lines += [f"Held-out evaluation at the end of training ({counted}; "
                  "`eval_results.json`):", "", "| metric | value |", "|---|---|",
                  *[f"| {name} | {value_text(value)} |" for name, value in eval_results.items()
                    if name not in ("num_pairs", "num_samples")],
                  ""]
    else:
        lines += ["No held-out evaluation (no held-out pairs were given).", ""]
    if training is None:
        lines += ["No optimizer step was logged."]
    else:
        window = "all of training" if training.whole_run else "the last epoch"
        lines += [f"Training metrics: the mean of the {training.num_rows} logged steps {training.first_step}-"
                  f"{training.last_step} ({window}; `metrics.jsonl` has every step):", "", "| metric | value |",
                  "|---|---|", *[f"| {name} | {value_text(value)} |" for name, value in training.means.items()]]
    if recipe == "dpo":
        lines += ["", "`rewards/*` are the implicit rewards beta * log(pi/pi_ref) of the chosen and rejected "
                  "completions; `rewards/accuracies` is the share of pairs whose chosen completion has the higher one."]
    elif recipe in POLICY_RECIPES:
        lines += ["", "`reward` is the mean ground-truth reward of the policy's samples on the held-out prompts and "
                  "`kl` the KL(policy || reference) per completion estimated from them, each with its standard error; "
                  "`objective/*` are TRL's names for the rollouts' scores and KL."]
    else:
        lines += ["", "`accuracy` is the share of pairs whose chosen completion gets the higher reward; `margin` the "
                  "mean of r(chosen) - r(rejected)."]
    return lines


def usage_lines(model: SavedModel) -> list[str]:
    path, tokenizer = repr(model.path), repr(model.tokenizer_path)
    if model.recipe in POLICY_RECIPES:
        if model.form == "adapter":
            loading = ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                       f"model = AutoPeftModelForCausalLM.from_pretrained({path})  # the base named in "
                       "adapter_config.json, then this adapter",
                       "model = model.merge_and_unload()  # optional: a plain transformers model"]
        else:
            loading = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                       f"model = AutoModelForCausalLM.from_pretrained({path})"]
        code = [*loading, f"tokenizer = AutoTokenizer.from_pretrained({tokenizer})",
                "inputs = tokenizer(\"The movie was\", return_tensors=\"pt\")  # chat models: "
                "tokenizer.apply_chat_template",
                "output = model.generate(**inputs, max_new_tokens=32, do_sample=True)",
                "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"]
        after = (["As an implicit reward model, against the model it started from: `preftune score --model "
                  f"{model.path} --ref-model BASE --data pairs.jsonl` (and `preftune eval` for the preference "
                  "metrics)."]
                 if model.recipe == "dpo" else
                 [f"Against the model it started from: `preftune judge --model {model.path} --ref-model BASE "
                  "--prompts prompts.jsonl --reward REWARD` (win rate and KL)."])
    else:
        if model.form == "adapter":
            loading = ["from peft import AutoPeftModelForSequenceClassification", "",
                       f"model = AutoPeftModelForSequenceClassification.from_pretrained({path}, num_labels=1)"]
        else:
            loading = ["from transformers import AutoModelForSequenceClassification", "",
                       f"model = AutoModelForSequenceClassification.from_pretrained({path})"]
        code = ["import torch", "from transformers import AutoTokenizer", *loading,
                f"tokenizer = AutoTokenizer.from_pretrained({tokenizer})",
                "prompt, completion = \"The movie was\", \" wonderful and moving.\"",
                "with torch.no_grad():",
                "    reward = model(**tokenizer(prompt + completion, return_tensors=\"pt\")).logits[0, 0].item()"]
        after = [f"As the ground-truth reward of `preftune judge`: `--reward {model.path}`."]
    note = "The path is where preftune saved it; once pushed to the hub, use its hub id."
    return [note, "", "```python", *code, "```", "", *after]


def data_line(what: str, source: str | None, split: str, count: int, unit: str = "pairs") -> str:
    hub = f" (hub dataset, split `{split}`)" if is_hub_dataset(source) else ""
    named = f"`{source}`" if source is not None else "the default job's movie-review requests"
    return f"- {what}: {named}{hub}, {count} {unit}"


def model_card(config: Config, model: SavedModel, eval_results: dict[str, Any] | None,
               training: TrainingMeans | None) -> str:
    """The README.md text of a saved folder: front matter, method and papers, data, hyperparameters, metrics, use."""
    if model.recipe not in RECIPES or model.form not in FORMS:
        raise ValueError(f"model card of recipe {model.recipe!r}, form {model.form!r}: expected {RECIPES}, {FORMS}")
    c = config
    method, papers = (dpo_method(c) if model.recipe == "dpo" else reward_method(c) if model.recipe == "reward-model"
                      else rl_method(c, model.recipe))
    if c.model.lora:
        papers.append(LORA_PAPER)
        if c.model.load_in_4bit:
            papers.append(QLORA_PAPER)
    what = {"dpo": "policy trained with DPO", "reward-model": "Bradley-Terry reward model trained",
            "ppo": "policy trained with PPO (RLHF)", "rloo": "policy trained with RLOO (RLHF)",
            "grpo": "policy trained with GRPO (RLHF)",
            "online-dpo": "policy trained with online DPO"}[model.recipe]
    title = model.name + (" (LoRA adapter)" if model.form == "adapter" else "")
    unit = "pairs" if model.recipe in ("dpo", "reward-model") else "prompts"
    data_lines = [data_line("training", c.sample.prompts if unit == "prompts" and c.sample.prompts else c.data.data,
                            c.data.split, model.num_train_pairs, unit)]
    if c.data.eval_data is not None or (unit == "prompts" and model.num_eval_pairs):
        data_lines.append(data_line("held-out", c.data.eval_data, c.data.eval_split, model.num_eval_pairs, unit))
    sections = {name: values for name, values in c.to_dict().items() if name in RECIPE_SECTIONS[model.recipe]}
    lines = [
        "---",
        yaml.safe_dump(front_matter(c, model), sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"A {what} from {base_text(model.base)} with preftune. {form_text(model)}",
        "",
        "## Method",
        "",
        *method,
        "",
        "## Training data",
        "",
        *data_lines,
        "",
        "## Hyperparameters",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {value_text(value)} |" for name, value in hyperparameter_rows(c, model)],
        "",
        "The resolved configuration (the run's `preftune_config.yaml`, the sections this training reads):",
        "",
        "```yaml",
        yaml.safe_dump(sections, sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
        "## Results",
        "",
        *metric_lines(eval_results, training, model.recipe),
        "",
        "## How to use",
        "",
        *usage_lines(model),
        "",
        "## References",
        "",
        *[f"- {linked(paper)}" for paper in dict.fromkeys(papers)],
        "",
    ]
    return "\n".join(lines)


class FinishedRun(Protocol):
    """What a card reads of a finished run (a PairRun or an OnlineRun, which this module does not import: the
    recipes import it). Besides these: `train_pairs` / `eval_pairs` (pairs) or `train_prompts` / `eval_prompts`
    (online)."""

    config: Config
    folder: Path
    model_source: str
    final_eval: dict[str, float] | None
    objective: Any  # its metric_names
    state: Any  # its step
    group: Any  # its world_size


# ---- writing them --------------------------------------------------------------------------------------------
def write_model_cards(run: FinishedRun, recipe: str, model: torch.nn.Module, merge: bool) -> list[Path]:
    """README.md in each folder the run saved (`model` and `merge` as `models.save_model` had them): the folder,
    and adapter/ beside a merged model. Main process only, after the model, config and eval_results are written."""
    from peft import PeftModel

    c, folder = run.config, run.folder
    try:
        training = last_epoch_means(read_metrics(folder), run.objective.metric_names)
    except UserError:  # no metrics.jsonl rows (nothing logged)
        training = None
    online = recipe in ("ppo", "rloo", "grpo", "online-dpo")  # an online run trains on prompts
    facts = dict(recipe=recipe, name=folder.name, tokenizer_path=str(folder),
                 base=base_model_of(c.model.model, run.model_source),
                 num_train_pairs=len(run.train_prompts if online else run.train_pairs),
                 num_eval_pairs=len(run.eval_prompts if online else run.eval_pairs), steps=run.state.step,
                 num_processes=run.group.world_size)
    if not isinstance(model, PeftModel):
        folders = [(folder, "full")]
    elif merge:
        folders = [(folder, "merged"), (folder / "adapter", "adapter")]
    else:
        folders = [(folder, "adapter")]
    written = []
    for path, form in folders:
        text = model_card(c, SavedModel(form=form, path=str(path), **facts), run.final_eval, training)
        (path / CARD_FILE).write_text(text, encoding="utf-8")  # replaces peft's stub card of the adapter
        written.append(path / CARD_FILE)
    return written
