"""Layer 8, tasks: the built-in tasks, each a source of prompts, pairs and a ground truth that a command runs a
recipe on. Imports the layers below; never a recipe (running a task is a command's job).

- `sentiment`: the default job, the DPO paper's controlled-sentiment experiment in miniature: movie-review
  prompts, pairs sampled from the reference and labelled by VADER, the before/after report;
- `arithmetic`: the verifiable task (--task arithmetic): small-number problems with an `answer` column, held-out
  facts disjoint from training ones, pairs of the reference's own answers labelled by the checker, the accuracy
  report;
- `sources`: where a run's prompts come from: --prompts (with their other columns), the prompts of --data's
  pairs, or the built-in task's (--task).
"""
