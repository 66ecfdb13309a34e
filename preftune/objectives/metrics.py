"""The metrics TRL reports for DPO, named as TRL names them, and their reduction across micro-batches.

Each micro-batch contributes per-pair sums; `MetricTotals.means()` divides by the pairs seen, so a step of
uneven micro-batches is weighted by pairs, not by micro-batch.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from preftune.objectives.logps import SequenceLogps
from preftune.objectives.losses import LossOutput

METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def pair_sums(output: LossOutput, policy: SequenceLogps) -> dict[str, float]:
    """Sums over the pairs of one micro-batch for every metric in METRIC_NAMES (one device sync).

    logps/* are the log-probs the losses saw (`output`'s, LD-DPO-weighted as TRL logs them) when `output` has them.
    """
    chosen, rejected = output.chosen_rewards, output.rejected_rewards
    chosen_logps = policy.chosen if output.chosen_logps is None else output.chosen_logps
    rejected_logps = policy.rejected if output.rejected_logps is None else output.rejected_logps
    stacked = torch.stack(
        [
            output.losses.detach().float().sum(),
            chosen.sum(),
            rejected.sum(),
            (chosen > rejected).float().sum(),
            (chosen - rejected).sum(),
            chosen_logps.detach().sum(),
            rejected_logps.detach().sum(),
        ]
    )
    return dict(zip(METRIC_NAMES, stacked.tolist()))


class MetricTotals:
    """Running per-pair sums of the metrics; `means()` gives the pair-weighted averages."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.num_pairs = 0

    def add(self, sums: dict[str, float], num_pairs: int) -> None:
        for name, value in sums.items():
            self.sums[name] += value
        self.num_pairs += num_pairs

    def merge(self, other: MetricTotals) -> None:
        self.add(other.sums, other.num_pairs)

    def to_dict(self) -> dict:
        return {"sums": dict(self.sums), "num_pairs": self.num_pairs}

    @classmethod
    def from_dict(cls, saved: dict) -> MetricTotals:
        totals = cls()
        totals.add(saved["sums"], saved["num_pairs"])
        return totals

    def means(self, names: tuple[str, ...] = METRIC_NAMES) -> dict[str, float]:
        """Pair-weighted means of `names` (the DPO metrics unless a recipe logs others), in that order."""
        return {name: self.sums[name] / max(self.num_pairs, 1) for name in names}
