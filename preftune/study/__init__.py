"""Layer 10, study: DPO against RLHF on the same labels, measured. Imports the recipes and tasks below it.

- `runner`: `preftune study` (alias `frontier`): label budgets x seeds x methods, each unit in its own process,
  cached per unit in the study folder;
- `unit`: one unit (method, budget, seed) in its process: trains or samples, measures, writes its record;
- `methods`: the method table (DPO, Preferred-FT, reward model then PPO / RLOO / online DPO, best-of-N, the
  ground-truth ceilings), the points and costs a unit records;
- `measure`: the held-out measurement every point shares;
- `stats`: intervals over seeds, matched KL, paired differences, the decision over constraints;
- `report`: the tables, plots and the summary, from the records alone.
"""
