"""Online DPO (`preftune online-dpo`): DPO on pairs of the policy's own samples (Guo et al. 2024, "Direct Language
Model Alignment from Online AI Feedback", arXiv:2402.04792), as TRL 1.16's experimental OnlineDPOTrainer:
setup -> train -> save -> cleanup.

Per rollout (the loop is `online.train`, shared with PPO and RLOO): two samples per prompt from the current policy,
ranked by --reward into (chosen, rejected); any loss of the DPO family (`losses.compute_loss`, --loss-type, --beta)
on their summed log-probs under the policy and the frozen reference. A pair whose two scores are equal says nothing
about which is better: it is left out of the loss (TRL counts it with the first sample as chosen) and counted in
`objective/tie_rate`; so is a pair with a sample the reward could not judge (None), which no statistic counts.
Iterative DPO (Xiong et al. 2024, arXiv:2312.11456) is the same loop with one rollout per
round over all prompts (--rollout-batch-size), several passes over its pairs (--num-ppo-epochs, --num-mini-batches)
and the reference moved to the policy after each round (--sync-ref-model, TR-DPO's update with alpha 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from preftune.config import Config, loss_params, optimizer_steps_per_rollout
from preftune.forward.reference import sync_reference_model
from preftune.forward.rewards import RewardFunction
from preftune.forward.rollout import token_logps
from preftune.objectives.logps import SequenceLogps
from preftune.objectives.losses import LOSSES, LossParams, compute_loss
from preftune.objectives.policy_gradient import masked_mean
from preftune.recipes import online
from preftune.recipes.online import OnlineRun, Rollout

ONLINE_DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected")


def ranked_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (2P,) of P prompts' two samples, rows 2i and 2i + 1 -> (first_is_chosen (P,) bool, decided (P,) bool:
    the two scores differ). A tie puts the first sample first, as TRL does, and is not decided."""
    first, second = scores[0::2], scores[1::2]
    return first >= second, first != second


def pair_logps(per_sequence: torch.Tensor, tokens: torch.Tensor, first_is_chosen: torch.Tensor) -> SequenceLogps:
    """Summed log-probs and token counts (2P,) of consecutive sample pairs -> chosen and rejected, (P,) each."""
    chosen_column = (~first_is_chosen).long()[:, None]
    pairs, counts = per_sequence.view(-1, 2), tokens.view(-1, 2)
    return SequenceLogps(pairs.gather(1, chosen_column).squeeze(1), pairs.gather(1, 1 - chosen_column).squeeze(1),
                         counts.gather(1, chosen_column).squeeze(1), counts.gather(1, 1 - chosen_column).squeeze(1))


@dataclass
class OnlineDPOObjective:
    config: Config
    params: LossParams
    pad_token_id: int = 0  # the tokenizer's: `setup` builds the objective once it is loaded, and never changes it
    command: str = "online-dpo"
    metric_names: tuple[str, ...] = ONLINE_DPO_METRICS
    minibatch_unit: int = 2  # a minibatch holds whole pairs

    @property
    def splits_minibatch(self) -> bool:
        """The loss is a mean over decided pairs, unless a loss type couples the pairs: AOT sorts the batch, sft
        averages the NLL over all the batch's chosen tokens."""
        return all(LOSSES[name].per_pair and name != "sft" for name in self.params.loss_types)

    @property
    def kl_coef(self) -> float:
        return self.params.beta  # DPO's beta is the KL weight of the objective it solves (TRL logs it so)

    def policy_of(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def score(self, run: OnlineRun, rollout: Rollout) -> dict[str, float]:
        """Rank each prompt's two samples; metrics of the scores of chosen and rejected, their gap, the tie rate,
        over the pairs whose two samples the reward judged (a pair with a None reward is undecided)."""
        first_is_chosen, decided = ranked_pairs(rollout.scores)
        judged = rollout.judged.view(-1, 2).all(1)
        decided = decided & judged
        # kept per row (both rows of a pair) so that `Rollout.rows` slices them with the samples
        rollout.extras.update(first_is_chosen=first_is_chosen.repeat_interleave(2),
                              decided=decided.repeat_interleave(2))
        pairs = rollout.scores.view(-1, 2)
        chosen, rejected = pairs.max(1).values, pairs.min(1).values
        return {"objective/chosen_scores": masked_mean(chosen, judged).item(),
                "objective/rejected_scores": masked_mean(rejected, judged).item(),
                "objective/scores_margin": masked_mean(chosen - rejected, judged).item(),
                "objective/tie_rate": masked_mean((~decided).float(), judged).item()}

    def loss(self, model: torch.nn.Module, minibatch: Rollout,
             on_policy: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO-family loss of the minibatch's decided pairs (rows 2i, 2i + 1 are one prompt's); it has no
        ratio to the sampling policy, so `on_policy` changes nothing."""
        mask = minibatch.mask
        tokens = mask.sum(1)
        logps = (token_logps(model, minibatch.samples, self.pad_token_id, minibatch.width, mask.device,
                             self.config.train.batch_layout) * mask).sum(1)
        first_is_chosen = minibatch.extras["first_is_chosen"][0::2]
        policy = pair_logps(logps, tokens, first_is_chosen)
        reference = pair_logps((minibatch.ref_logps * mask).sum(1), tokens, first_is_chosen)
        output = compute_loss(policy, reference, self.params)
        decided = minibatch.extras["decided"][0::2].float()
        count = decided.sum().clamp(min=1.0)  # all ties: a zero loss, no gradient

        def mean(values: torch.Tensor) -> torch.Tensor:
            return (values * decided).sum() / count

        loss = mean(output.losses)
        margins = output.chosen_rewards - output.rejected_rewards
        return loss, {"loss": loss.detach(), "rewards/chosen": mean(output.chosen_rewards),
                      "rewards/rejected": mean(output.rejected_rewards), "rewards/margins": mean(margins),
                      "rewards/accuracies": mean((margins > 0).float()),
                      "logps/chosen": mean(policy.chosen.detach()), "logps/rejected": mean(policy.rejected.detach())}

    def loss_terms(self, model: torch.nn.Module, minibatch: Rollout,
                   on_policy: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        yield self.loss(model, minibatch, on_policy)  # one forward: one term

    def loss_count(self, minibatch: Rollout) -> float:
        return minibatch.extras["decided"][0::2].sum().item()


def setup(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    """The run, its objective built once the tokenizer is loaded (the pad id its loss's forward needs)."""
    def make_objective(tokenizer: PreTrainedTokenizerBase) -> OnlineDPOObjective:
        return OnlineDPOObjective(config, loss_params(config.loss), tokenizer.pad_token_id)

    return online.setup(config, "online-dpo", make_objective, reward=reward)


def sync_reference(run: OnlineRun) -> None:
    """After a rollout: TR-DPO's reference update every --ref-model-sync-steps optimizer steps (TRL's
    SyncRefModelCallback; validation makes it a multiple of a rollout's steps; iterative DPO: alpha 1, every
    round)."""
    t = run.config.train
    if run.state.step * optimizer_steps_per_rollout(run.config, run.objective.command) % t.ref_model_sync_steps == 0:
        sync_reference_model(run.models.policy, run.models.reference, t.ref_model_mixup_alpha)


def run(config: Config, reward: RewardFunction | None = None) -> OnlineRun:
    """setup -> train -> save, with cleanup whatever happens (`reward`: in memory, in place of --reward)."""
    return online.run(setup(config, reward), after_step=sync_reference if config.train.sync_ref_model else None)
