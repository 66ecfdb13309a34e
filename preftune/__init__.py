"""preftune: Direct Preference Optimization for causal language models.

The Python API (see `preftune.api`): `preftune.train(...)`, `preftune.evaluate(...)`, `preftune.score(...)`.
"""

from preftune.api import evaluate, score, train

__all__ = ["evaluate", "score", "train"]
__version__ = "0.1.0"
