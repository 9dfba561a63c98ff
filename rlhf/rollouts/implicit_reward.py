"""A DPO policy as a reward model: its implicit reward r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x)),
summed over the response's tokens (Rafailov et al. 2023, section 5; RewardBench scores DPO models this way).

DPO's loss is Bradley-Terry on exactly this reward, so a `rlhf dpo` run trained on comparisons is a reward model
whose score is read from its token probabilities at every position of the response, where a scalar head reads one
hidden state at the last token. `rlhf dpo` (dpo.loss=dpo) stores what defines it beside the weights, in
implicit_reward.json: beta and the reference it trained against; PPO and best-of-N load both and score with them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.errors import UserError, first_line

if TYPE_CHECKING:  # torch is imported on first use: the launcher's checks read the spec
    import torch

    from rlhf.models.sources import ModelSource
    from rlhf.protocols import PolicyModel, ScoringModel
    from rlhf.rollouts.generation import Sequences
    from rlhf.rollouts.packed import PackedRollout

IMPLICIT_REWARD_FILE = "implicit_reward.json"


@dataclass(frozen=True)
class ImplicitRewardSpec:
    """What implicit_reward.json holds: beta, and the reference (a registry reference, folder or hub name)."""

    beta: float
    reference: str


def implicit_reward_spec(source: ModelSource, *, key: str = "reward.name_or_path") -> ImplicitRewardSpec | None:
    """The spec stored beside `source`'s weights, or None when it has none (a scalar-head reward model). JSON only:
    nothing read here runs code. A file that is there but unreadable stops in one line naming it."""
    if source.kind not in ("registry", "path"):
        return None
    path = Path(source.location) / IMPLICIT_REWARD_FILE
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
        beta, reference = float(found["beta"]), found["reference"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: unreadable implicit reward ({first_line(exc)}); rerun `rlhf dpo` to write it again") from None
    if not (math.isfinite(beta) and beta > 0) or not isinstance(reference, str) or not reference.strip():
        raise UserError(f"{path}: beta={beta!r}, reference={reference!r} define no implicit reward (beta must be positive, "
                        f"the reference a model); rerun `rlhf dpo` to write it again")
    if any(ord(c) < 32 for c in reference):
        raise UserError(f"{path}: the reference {reference!r} holds control characters; rerun `rlhf dpo` to write it again")
    return ImplicitRewardSpec(beta, reference)


def implicit_reward_json(beta: float, reference: str) -> str:
    """implicit_reward.json's text, as `rlhf dpo` writes it."""
    return json.dumps({"beta": beta, "reference": reference,
                       "reward": "beta * (log pi(y|x) - log pi_ref(y|x)), summed over the response's tokens"}, indent=2) + "\n"


@dataclass(frozen=True, eq=False)
class ImplicitReward:
    """The frozen policy and reference of an implicit reward, and its beta: `scores` gives (B,) rewards of a rollout."""

    policy: PolicyModel
    reference: PolicyModel
    beta: float

    def scores(self, seqs: Sequences, packed: PackedRollout | None = None) -> torch.Tensor:
        """(B,) beta * sum over each response's tokens of log pi - log pi_ref, at temperature 1 (the distributions
        DPO trained); from the packed rows when `packed` is given."""
        import torch

        from rlhf.rollouts.packed import rollout_logprobs

        with torch.no_grad():
            logp, _ = rollout_logprobs(self.policy, seqs, packed, temperature=1.0)
            ref, _ = rollout_logprobs(self.reference, seqs, packed, temperature=1.0)
        return self.beta * ((logp - ref) * seqs.response_mask).sum(dim=1)


def learned_scores(reward: ScoringModel | ImplicitReward, seqs: Sequences, packed: PackedRollout | None = None) -> torch.Tensor:
    """(B,) a reward model's scores of a rollout: a scalar head's at each sequence's last token, or an implicit reward."""
    from rlhf.rollouts.generation import sequence_scores
    from rlhf.rollouts.packed import packed_scores

    if isinstance(reward, ImplicitReward):
        return reward.scores(seqs, packed)
    return sequence_scores(reward, seqs) if packed is None else packed_scores(reward, packed)
