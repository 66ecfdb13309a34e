"""Layer 8, tasks: the built-in tasks, each a source of prompts, pairs and a ground truth that a command runs a
recipe on. Imports the layers below; never a recipe (running a task is a command's job).

- `sentiment`: the default job, the DPO paper's controlled-sentiment experiment in miniature: movie-review
  prompts, pairs sampled from the reference and labelled by VADER, the before/after report;
- `sources`: where a run's prompts come from: --prompts, the prompts of --data's pairs, or the default task's.
"""
