"""The names by which a config picks a variant of the objectives in rlhf.algos: preference losses, KL estimators,
loss aggregations, advantage estimators.

They live here, apart from the math, because this module imports no torch: rlhf.config validates against the
same names the functions take (one list each, nothing to drift) while `rlhf --help` and config errors stay fast.
"""

from __future__ import annotations

from typing import Literal, get_args

# rlhf/algos/preference.py. No reference model is loaded for SimPO and ORPO; KTO alone takes unpaired
# (prompt, completion, label) rows.
PreferenceLoss = Literal["dpo", "ipo", "kto", "simpo", "orpo"]
PREFERENCE_LOSSES: tuple[str, ...] = get_args(PreferenceLoss)
REFERENCE_FREE_LOSSES: tuple[str, ...] = ("simpo", "orpo")
UNPAIRED_LOSSES: tuple[str, ...] = ("kto",)

# rlhf/algos/ppo.py: the per-token estimates of the KL to the reference.
KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)

# rlhf/algos/critic_free.py: how per-token losses become a minibatch's loss.
LossAggregation = Literal["token_mean", "sequence_mean", "token_sum"]
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)

# Advantage estimators: gae needs a critic (rlhf/algos/ppo.py); the others are rlhf/algos/critic_free.py's, and
# grpo and rloo compare the responses to one prompt (a group of rollout.samples_per_prompt).
AdvantageEstimator = Literal["gae", "grpo", "rloo", "reinforce_pp"]
CRITIC_FREE_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo")
