"""preftune: Direct Preference Optimization for causal language models.

The Python API (see `preftune.api`): `preftune.train(...)`, `preftune.evaluate(...)`, `preftune.score(...)`, and
the RLHF pipeline: `preftune.reward_model(...)`, `preftune.ppo(...)`, `preftune.rloo(...)`, `preftune.grpo(...)`,
`preftune.online_dpo(...)`.

The package is cut into layers, bottom to top; a module imports only its own layer and those below (each folder's
`__init__` says its job; tests/test_layers.py holds the order): errors -> data -> objectives -> config -> runtime
-> models -> forward -> evaluation -> tasks -> recipes -> study -> the faces (commands, api, cli).
"""

from preftune.api import evaluate, grpo, online_dpo, ppo, reward_model, rloo, score, train

__all__ = ["evaluate", "grpo", "online_dpo", "ppo", "reward_model", "rloo", "score", "train"]
__version__ = "0.1.0"
