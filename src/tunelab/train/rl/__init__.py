"""Online RL building blocks: rollouts, rewards, PPO and GRPO losses.

- :mod:`~tunelab.train.rl.rollout`: sample completions from the policy (batched ``generate`` with
  the KV cache), turn them into a padded training batch, per-token log-probs, entropy and values.
- :mod:`~tunelab.train.rl.rewards`: rule rewards (exact match, GSM8K answer, format, length),
  user reward functions (``module:function``) and a trained reward model as a scorer.
- :mod:`~tunelab.train.rl.ppo`: KL estimators and controllers, per-token rewards, GAE, whitening,
  clipped policy and value losses, entropy bonus, the value head.
- :mod:`~tunelab.train.rl.grpo`: group-normalised advantages and the GRPO loss.

The tensor functions are pure (no model, no optimiser) and take ``[batch, positions]`` tensors
with a mask of the completion tokens, so the training engine decides batching and accumulation.
"""
