"""Layer 7, evaluation: measuring models, used by the recipes during and after training and by the commands.
Imports the layers below; never a recipe.

- `measure`: the policy and its reference as models (every case a run has) and one measurement: samples from both,
  KL with its standard error, ground-truth and implicit rewards;
- `pairs`: preference metrics and implicit rewards of a model pair on pairs or candidates (eval, score);
- `judge`: win rates under a ground-truth reward;
- `report`: OUTPUT_DIR/report.md and the final training means;
- `plot`: `preftune plot`, the curves of a run's metrics.jsonl.
"""
