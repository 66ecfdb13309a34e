"""PPO (`preftune ppo`): RLHF with an actor-critic, as in Ziegler et al. 2019 (arXiv:1909.08593), Ouyang et al.
2022 (arXiv:2203.02155) and the DPO paper's baseline: setup -> train -> save -> cleanup.

Per rollout (the loop is `online.train`, shared with RLOO): sample completions from the policy, score them with the
reward, per-token reward r_t = -kl_coef (log pi - log pi_ref) with the score added at the last token, values from
the critic, GAE advantages (whitened) and returns; then `num_ppo_epochs` passes of `num_mini_batches` minibatches
of the clipped surrogate plus vf_coef times the clipped value loss, whose backward is taken in two terms (the
policy's, then the critic's), so that the two forwards' activations are never held together. The math is in
objectives/policy_gradient.py.

Full training holds the policy, the critic (a second backbone) and the reference; --lora holds one base model: the
actor and the critic are two adapters on it (the critic's value head beside its adapter) and the reference is the
base with both switched off, as in LoRA-based RLHF setups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from preftune.config import Config
from preftune.errors import UserError
from preftune.forward.logprobs import model_inputs, unwrapped
from preftune.forward.rewards import RewardFunction
from preftune.forward.rollout import Sample, in_micro_batches, per_token, sample_rows, token_logps
from preftune.models.load import (
    active_adapter,
    add_trainable_adapter,
    enable_checkpointing,
    load_reward_base,
    lora_config,
    resolve_model,
)
from preftune.objectives.policy_gradient import (
    clipped_policy_loss,
    clipped_value_loss,
    generalized_advantages,
    masked_mean,
    shaped_rewards,
    whiten,
)
from preftune.recipes import online
from preftune.recipes.online import OnlineRun, Rollout

PPO_METRICS = ("loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac", "policy/ratio", "val/vpred",
               "val/error", "val/clipfrac")


CRITIC_ADAPTER = "critic"  # the --lora critic's adapter on the policy's base ("default" is the policy's)


class AdapterCritic(torch.nn.Module):
    """PPO's critic under --lora: the policy's own base model with a second LoRA adapter (`CRITIC_ADAPTER`) active,
    and a value head Linear(hidden, 1) read at every position, as a sequence-classification head is. Its own
    parameters are the head alone: the base and both adapters are registered once, in the policy."""

    def __init__(self, policy: torch.nn.Module, head: torch.nn.Linear) -> None:
        super().__init__()
        self.head = head
        self.shared = (policy,)  # a tuple, not a submodule: the policy owns (and saves, and DDP syncs) its weights


@contextlib.contextmanager
def critic_parts(critic: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]]:
    """(the transformers model, its backbone, the value head) of a critic; an AdapterCritic's adapter is active
    inside."""
    if isinstance(critic, AdapterCritic):
        policy = critic.shared[0]
        model = unwrapped(policy)
        with active_adapter(policy, CRITIC_ADAPTER):
            yield model, getattr(model, model.base_model_prefix), critic.head
        return
    model = unwrapped(critic)  # under peft the LoRA layers are in place inside it, and `score` is the trained copy
    yield model, getattr(model, model.base_model_prefix), model.score


def token_values(critic: torch.nn.Module, samples: list[Sample], pad_token_id: int, width: int,
                 layout: str = "padded") -> torch.Tensor:
    """The critic's V(s_t) before each completion token, (B, width): its value head applied at every position that
    predicts a completion token (the backbone once, the head only there), the samples laid out as `sample_rows`
    does."""
    device = next(critic.parameters()).device
    batch = sample_rows(samples, pad_token_id, device, layout)
    with critic_parts(critic) as (model, backbone, head):
        hidden = backbone(**model_inputs(model, batch), use_cache=False).last_hidden_state
        values = head(hidden[batch.token_rows, batch.token_predictors]).squeeze(-1).float()
    return per_token(values, batch, len(samples), width)


class PolicyAndValue(torch.nn.Module):
    """The actor and the critic as one module: one optimizer, one accelerate prepare (DDP averages both), one
    checkpoint. Its forward gives both per-token outputs of a minibatch (under --lora: two forwards of the shared
    base, one per adapter); `policy_logps` and `values` give one each, for the loss's two terms
    (`PPOObjective.loss_terms`: the policy's backward is taken before the critic's forward)."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module, pad_token_id: int,
                 layout: str = "padded") -> None:
        super().__init__()
        self.policy, self.critic, self.pad_token_id, self.layout = policy, critic, pad_token_id, layout

    def forward(self, samples: list[Sample], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy_logps(samples, width), self.values(samples, width)

    def policy_logps(self, samples: list[Sample], width: int) -> torch.Tensor:
        """log pi(y_t) of each completion token, (B, width), with gradients."""
        device = next(self.policy.parameters()).device
        return token_logps(self.policy, samples, self.pad_token_id, width, device, self.layout)

    def values(self, samples: list[Sample], width: int) -> torch.Tensor:
        """The critic's V(s_t) before each completion token, (B, width), with gradients."""
        return token_values(self.critic, samples, self.pad_token_id, width, self.layout)


def trained_mask(rollout: Rollout) -> torch.Tensor:
    """The completion tokens of the samples the reward judged, (B, T) bool (a None reward: a row of False)."""
    return rollout.mask & rollout.judged[:, None]


@dataclass
class PPOObjective:
    config: Config
    command: str = "ppo"
    metric_names: tuple[str, ...] = PPO_METRICS
    minibatch_unit: int = 1
    splits_minibatch: bool = True  # both losses are means over completion tokens

    @property
    def kl_coef(self) -> float:
        return self.config.rl.kl_coef

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.policy

    def score(self, run: OnlineRun, rollout: Rollout) -> dict[str, float]:
        """Values, KL-shaped rewards, GAE advantages (whitened) and returns of the rollout's judged samples (the
        rows of a sample the reward could not judge are masked out: `trained_mask`)."""
        r = self.config.rl
        critic = run.group.unwrap(run.model).critic
        mask = trained_mask(rollout)
        with torch.no_grad(), run.group.accelerator.autocast():
            values = in_micro_batches(lambda part: token_values(critic, part, run.tokenizer.pad_token_id,
                                                                rollout.width, self.config.train.batch_layout),
                                      rollout.samples, r.local_rollout_forward_batch_size) * mask
        rewards, _ = shaped_rewards(rollout.logps, rollout.ref_logps, rollout.scores, mask, run.state.kl_coef)
        if r.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = generalized_advantages(rewards, values, mask, r.gamma, r.lam)
        rollout.extras.update(values=values, advantages=whiten(advantages, mask), returns=returns)
        return {"val/returns": masked_mean(returns, mask).item()}

    def loss(self, model: torch.nn.Module, minibatch: Rollout,
             on_policy: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped surrogate + vf_coef x the clipped value loss of a minibatch, from one forward of the actor
        and the critic (`PolicyAndValue`)."""
        logps, values = model(minibatch.samples, minibatch.width)
        policy, policy_metrics = self.policy_term(logps, minibatch, on_policy)
        value, value_metrics = self.value_term(values, minibatch)
        return policy + value, {**policy_metrics, **value_metrics}

    def loss_terms(self, model: torch.nn.Module, minibatch: Rollout,
                   on_policy: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """`loss` in two terms, the policy's and then the critic's (vf_coef x the value loss), each forward run
        after the other's backward: the actor's and the critic's activations are never held together, and their
        gradients add up to the joint loss's (each term reaches its own weights only). Under DDP one term, the
        joint `loss`: a DDP forward takes one backward."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            yield self.loss(model, minibatch, on_policy)
            return
        yield self.policy_term(model.policy_logps(minibatch.samples, minibatch.width), minibatch, on_policy)
        yield self.value_term(model.values(minibatch.samples, minibatch.width), minibatch)

    def policy_term(self, logps: torch.Tensor, minibatch: Rollout,
                    on_policy: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped surrogate loss of the policy's log-probs `logps` (B, T), over the judged completion tokens,
        and its metrics (log pi_old: the rollout's, or under `on_policy` `logps` detached)."""
        policy = clipped_policy_loss(logps, None if on_policy else minibatch.logps, minibatch.extras["advantages"],
                                     trained_mask(minibatch), self.config.rl.cliprange)
        return policy.loss, {"loss/policy": policy.loss.detach(), "policy/approxkl": policy.approxkl,
                             "policy/clipfrac": policy.clipfrac, "policy/ratio": policy.ratio}

    def value_term(self, values: torch.Tensor, minibatch: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """vf_coef x the clipped value loss of the critic's `values` (B, T) against the rollout's returns, over the
        judged completion tokens, and its metrics."""
        r, mask, extras = self.config.rl, trained_mask(minibatch), minibatch.extras
        value_loss, value_clipfrac = clipped_value_loss(values, extras["values"], extras["returns"], mask,
                                                        r.cliprange_value)
        return r.vf_coef * value_loss, {
            "loss/value": value_loss.detach(), "val/vpred": masked_mean(values.detach(), mask),
            "val/error": masked_mean((values.detach() - extras["returns"]) ** 2, mask), "val/clipfrac": value_clipfrac}

    def loss_count(self, minibatch: Rollout) -> float:
        return trained_mask(minibatch).sum().item()  # the losses' means are over the judged samples' tokens


def load_critic(config: Config, tokenizer) -> torch.nn.Module:
    """The critic of full training: --value-model (a reward model from `preftune reward-model`, as Ouyang et al.
    start it), else the policy's starting weights with a new one-output head. A second backbone beside the
    policy's."""
    model_config = dataclasses.replace(config.model, model=config.rl.value_model or config.model.model)
    critic, _, _ = load_reward_base(model_config, tokenizer=tokenizer)
    return critic


def adapter_critic(config: Config, policy: torch.nn.Module) -> AdapterCritic:
    """The critic of --lora: a second adapter on the policy's base (peft model) and a value head, both trained.
    Unset --value-model: a no-op adapter (--lora-* settings) and a new head (normal, std initializer_range, as
    transformers starts a score head). A LoRA reward model on the same base: its adapter and score head (the
    critic starts as that reward model). A full reward model: its score head alone, read on the base's features
    (its backbone would be a second model; the adapter starts as a no-op)."""
    model = unwrapped(policy)
    head = torch.nn.Linear(model.config.hidden_size, 1, bias=False)
    torch.nn.init.normal_(head.weight, std=getattr(model.config, "initializer_range", 0.02))
    adapter_config, adapter_weights = lora_config(config.model), None
    if config.rl.value_model:
        adapter_config, adapter_weights, head_weight = value_model_weights(
            config.rl.value_model, model.name_or_path, model.config.hidden_size, config.model.cache_dir)
        adapter_config = adapter_config or lora_config(config.model)
        with torch.no_grad():
            head.weight.copy_(head_weight)
    add_trainable_adapter(policy, CRITIC_ADAPTER, adapter_config)
    if adapter_weights is not None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy, adapter_weights, adapter_name=CRITIC_ADAPTER)
        unexpected = [key for key in result.unexpected_keys if "lora_" in key]
        if unexpected:
            raise UserError(f"--value-model {config.rl.value_model}: its adapter does not fit the policy's base "
                            f"({len(unexpected)} weights unused, e.g. {unexpected[0]})")
    if config.model.gradient_checkpointing:  # the critic's layers are recomputed under the critic's adapter
        enable_checkpointing(policy, context_fn=lambda: (contextlib.nullcontext(),
                                                         active_adapter(policy, policy.active_adapter)))
    return AdapterCritic(policy, head.to(next(policy.parameters()).device))


def value_model_weights(folder: str, base: str, hidden_size: int, cache_dir: str | None
                        ) -> tuple[object | None, dict[str, torch.Tensor] | None, torch.Tensor]:
    """What a --value-model folder gives the --lora critic: (its LoRA config, its adapter's weights) if it is a LoRA
    reward model (an adapter folder, or one with adapter/) on `base` (else None, None), and its score head,
    (1, hidden_size)."""
    path = Path(resolve_model(folder, cache_dir))
    if not path.is_dir():
        raise UserError(f"--value-model {folder}: with --lora the critic reads a local reward-model folder")
    # `preftune reward-model --lora` saves the merged model, and its adapter in adapter/
    adapter = next((p for p in (path, path / "adapter") if (p / "adapter_config.json").is_file()), None)
    if adapter is not None:
        from peft import LoraConfig

        adapter_config = LoraConfig.from_pretrained(str(adapter))
        trained_on = resolve_model(adapter_config.base_model_name_or_path, cache_dir)
        if Path(trained_on).resolve() != Path(base).resolve():
            raise UserError(f"--value-model {folder}: a LoRA reward model on {trained_on}, not on the policy's base "
                            f"{base}; with --lora the critic is an adapter on the policy's base")
        weights = load_file(adapter / "adapter_model.safetensors")
        head_names = [name for name in weights if name.endswith("score.weight")]
        if len(head_names) != 1:
            raise UserError(f"--value-model {folder}: its adapter has no score head (is it a reward model?)")
        head = weights.pop(head_names[0])
        adapter_config = dataclasses.replace(adapter_config, task_type="CAUSAL_LM", modules_to_save=None,
                                             base_model_name_or_path=base)
        return adapter_config, {k: v for k, v in weights.items() if "lora_" in k}, check_head(head, folder, hidden_size)
    return None, None, check_head(full_model_head(path, folder), folder, hidden_size)


def full_model_head(path: Path, folder: str) -> torch.Tensor:
    """The `score.weight` of a full sequence-classification model's safetensors, read alone (not the model)."""
    index = path / "model.safetensors.index.json"
    name = "score.weight"
    shards = json.loads(index.read_text())["weight_map"] if index.is_file() else {name: "model.safetensors"}
    file = path / shards.get(name, "model.safetensors")
    if not file.is_file():
        raise UserError(f"--value-model {folder}: no safetensors weights with a score head ({name})")
    with safe_open(str(file), framework="pt") as weights:
        if name not in weights.keys():
            raise UserError(f"--value-model {folder}: no score head ({name}); is it a reward model?")
        return weights.get_tensor(name)


def check_head(head: torch.Tensor, folder: str, hidden_size: int) -> torch.Tensor:
    if tuple(head.shape) != (1, hidden_size):
        raise UserError(f"--value-model {folder}: its score head is {tuple(head.shape)}, the policy's hidden size "
                        f"needs (1, {hidden_size})")
    return head.float()


def setup(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    def with_critic(policy: torch.nn.Module, tokenizer) -> PolicyAndValue:
        critic = adapter_critic(config, policy) if config.model.lora else load_critic(config, tokenizer)
        return PolicyAndValue(policy, critic, tokenizer.pad_token_id, config.train.batch_layout)

    return online.setup(config, "ppo", lambda tokenizer: PPOObjective(config), build_model=with_critic, reward=reward)


def run(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    """setup -> train -> save, with cleanup whatever happens (`reward`: in memory, in place of --reward)."""
    return online.run(setup(config, reward))
