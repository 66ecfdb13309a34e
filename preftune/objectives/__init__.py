"""Layer 2, objectives: the math of every loss, pure functions of tensors. Imports torch and nothing of preftune's
above `data` (no model, no config, no process).

- `logps`: `SequenceLogps`, the per-pair log-probabilities a preference loss reads;
- `losses`: `LOSSES`, the DPO loss family (one function and one row each, the paper and equation on the formula
  line); `compute_loss`;
- `policy_gradient`: the online recipes' math (KL-shaped rewards, GAE, clipped surrogate and value losses,
  whitening, leave-one-out advantages, the adaptive KL coefficient);
- `metrics`: the metrics TRL names for DPO, reduced over micro-batches and processes.
"""
