"""The loop every online recipe shares, moved here from recipes/online.py (its parts follow in the next commit)."""

from preftune.recipes.online.loop import *  # noqa: F403
