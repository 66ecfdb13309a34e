"""Layer 6, forward: every forward pass of a model that training and measurement share. Imports the layers below
(data, objectives, config, runtime, models).

- `logprobs`: (model, Batch) -> SequenceLogps, the one training/eval forward (completion tokens only, the output
  head only where it is read);
- `reference`: where the reference's log-probs come from (a frozen model, the adapter switched off, none, or the
  precomputed cache) and TR-DPO's updates;
- `rollout`: prompts -> sampled completions (batched, KV-cached, one seed per sample when asked, the sampler's own
  log-probs) and their per-token log-probs in any batch layout;
- `rewards`: what scores a completion: VADER's sentiment, the arithmetic checker, a user's `module:function` (TRL's
  keyword form or one sample's texts), or a reward model; several weighted as TRL's reward_funcs (`Rewards`);
- `answers`: the arithmetic task's checker, rewards of TRL's form (accuracy, format).
"""
