"""The warning before `rlhf ppo` launches a policy that nothing holds near its reference while a learned reward model
scores it: a reward model is a proxy, and a policy free to drift finds what it overrates.

Measured (README, the chat task): DAPO's recipe (ppo.beta=0) against a reward model that ranks 75% of held-out pairs
right took SmolLM2's exact-answer rate from 0.65 to 0.16 in 24 steps while the reward model's score of its samples
rose; the task's PPO with a KL penalty did not collapse. A warning, never an error: with a reward function (a
grader, `python:`) or the oracle, beta=0 is the usual RLVR recipe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf.config import PPOConfig


def unanchored_policy_warning(cfg: PPOConfig) -> str | None:
    """One line when ppo.beta is 0 and a learned reward model is among reward.name_or_path's sources; else None."""
    from rlhf.rollouts.rewards import learned_source, parse_sources

    if cfg.ppo.beta > 0:
        return None
    learned = learned_source(parse_sources(cfg.reward.name_or_path, cfg.reward.weights))
    if learned is None:
        return None
    return (f"ppo.beta=0 against the learned reward model {learned.text}: nothing keeps the policy near the reference, "
            "so it can drift into replies the reward model overrates (reward hacking); watch eval/kl and the gold score, "
            "or set ppo.beta (0.2 is the default)")
