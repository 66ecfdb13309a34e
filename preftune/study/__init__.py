"""Layer 10, study: DPO against RLHF on the same labels, measured. Imports the recipes and tasks below it.

- `frontier`: `preftune frontier`, each method in its own process, cached per method in the run folder;
- `methods`: the methods (DPO, Preferred-FT, reward model then PPO / RLOO / online DPO, PPO-GT, best-of-N), each
  measured the same way with its budgets and costs;
- `report`: the frontier's tables and plots (reward against KL, against each budget).
"""
