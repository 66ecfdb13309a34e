"""preftune: Direct Preference Optimization for causal language models.

The Python API (see `preftune.api`): `preftune.train(...)`, `preftune.evaluate(...)`, `preftune.score(...)`, and
the RLHF pipeline: `preftune.reward_model(...)`, `preftune.ppo(...)`, `preftune.rloo(...)`, `preftune.online_dpo(...)`.
"""

from preftune.api import evaluate, online_dpo, ppo, reward_model, rloo, score, train

__all__ = ["evaluate", "online_dpo", "ppo", "reward_model", "rloo", "score", "train"]
__version__ = "0.1.0"
