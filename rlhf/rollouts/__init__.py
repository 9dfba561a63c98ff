"""Sampling and scoring responses: generation (`generation`) and one batched forward pass of each model over a
rollout (`scoring`; padding-free in `packed`), multi-turn episodes with an environment (`multiturn`), DAPO's
dynamic sampling rounds (`dynamic_sampling`), and where a reward comes from: a reward model, `python:` functions,
the oracle, or their weighted sum (`rewards`)."""
