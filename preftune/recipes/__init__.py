"""Layer 9, recipes: the training loops, each setup -> train -> save, readable top to bottom. Imports every layer
below; only the study and the faces import it.

- `pairs`: the loop on preference pairs, with an `Objective` plugged in: `dpo` (the DPO family) and
  `reward_model` (Bradley-Terry);
- `online/`: the loop on the policy's own samples, in parts (state, schedule, rollouts, optimisation, held_out,
  loop), with an `OnlineObjective` plugged in, built complete by the recipe once the tokenizer is loaded: `ppo`,
  `rloo`, `online_dpo`; their math is objectives/policy_gradient.py and objectives/losses.py;
- `model_card`: the README.md model card each recipe writes beside the model it saves.

A new loop is a module here and its math in objectives/; nothing else changes.
"""
