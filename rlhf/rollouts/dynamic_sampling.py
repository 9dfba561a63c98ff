"""The plumbing of DAPO's dynamic sampling in `rlhf ppo` (ppo.dynamic_sampling; the math is in
rlhf/algos/dynamic_sampling.py): one step's generation rounds, the groups chosen from them joined into
one rollout batch, and the step's counts.

Each round is a whole rollout batch of its own (prompts left-padded to its longest prompt, responses
right-padded to its longest response), so joining rows of several rounds pads them to the widest of
both and recomputes the position ids from the attention mask, as generation made them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf.algos.dynamic_sampling import GroupChoice, choose_groups, degenerate_groups, group_rows
from rlhf.rollouts.generation import SampledLogprobs, ScoredRollout, Sequences
from rlhf.rollouts.multiturn import Episodes
from rlhf.training.engine import Dist
from rlhf.training.rank_sums import RankSums


@dataclass
class Drawn:
    """One generation round: the sampled batch, generation's log-probs (or None), its scores, and the
    shaped score (B,) the group advantage is computed from, which decides whether a group is degenerate."""

    seqs: Sequences
    sampled: SampledLogprobs | None
    scored: ScoredRollout
    shaped: torch.Tensor
    generate_s: float = 0.0
    score_s: float = 0.0
    episodes: Episodes | None = None
    """With rollout.env (one round only: dynamic sampling is refused with it)."""


def choice_of(rounds: list[Drawn], *, group_size: int, quota: int) -> GroupChoice:
    """The batch's groups among every round's, in draw order (round by round)."""
    degenerate = torch.cat([degenerate_groups(r.shaped, group_size=group_size) for r in rounds])
    return choose_groups(degenerate, quota=quota)


def join_chosen(rounds: list[Drawn], choice: GroupChoice, *, group_size: int, pad_id: int) -> Drawn:
    """The chosen groups' rows of every round as one round (timings summed); a single round whose groups are
    all chosen comes back as it is."""
    per_round = rounds[0].shaped.shape[0] // group_size
    if len(rounds) == 1 and choice.groups.numel() == per_round:
        return rounds[0]
    parts = []
    for r, drawn in enumerate(rounds):
        mine = choice.groups[(choice.groups >= r * per_round) & (choice.groups < (r + 1) * per_round)] - r * per_round
        if mine.numel():
            parts.append((drawn, group_rows(mine, group_size=group_size).to(drawn.shaped.device)))
    prompt_width = max(d.seqs.prompt_width for d, _ in parts)
    width = max(d.seqs.response_width for d, _ in parts)
    seqs = _cat_sequences([_padded(d.seqs.rows(rows), prompt_width, width, pad_id) for d, rows in parts])
    scored = _cat_scored([d.scored for d, _ in parts], [rows for _, rows in parts], width, seqs)
    sampled = None
    if parts[0][0].sampled is not None:
        sampled = SampledLogprobs(logprobs=torch.cat([_right(_sampled(d).logprobs[rows], width) for d, rows in parts]),
                                  entropy=torch.cat([_right(_sampled(d).entropy[rows], width) for d, rows in parts]))
    return Drawn(seqs=seqs, sampled=sampled, scored=scored, shaped=torch.cat([d.shaped[rows] for d, rows in parts]),
                 generate_s=sum(d.generate_s for d in rounds), score_s=sum(d.score_s for d in rounds))


def dynamic_metrics(choice: GroupChoice, *, rounds: int, dist: Dist) -> dict[str, float]:
    """Every rank's groups this step: kept_groups (informative, trained on), dropped_groups (all rewards equal,
    left out), filler_groups (all equal but trained on: the cap was hit), surplus_groups (informative, drawn
    after this rank's quota was met); sampling_rounds, the generation rounds (the same on every rank)."""
    sums = RankSums(("kept", "dropped", "filler", "surplus"), dist.device)
    sums.add(kept=float(choice.kept), dropped=float(choice.dropped), filler=float(choice.filler), surplus=float(choice.surplus))
    total = sums.over_ranks()
    return {"sampling_rounds": float(rounds), **{f"{name}_groups": total[name] for name in ("kept", "dropped", "filler", "surplus")}}


def _right(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, R') -> (B, width), zeros on the right."""
    return F.pad(x, (0, width - x.shape[1]))


def _padded(seqs: Sequences, prompt_width: int, width: int, pad_id: int) -> Sequences:
    """`seqs` with its prompts left-padded to `prompt_width` and its responses right-padded to `width` columns."""
    lead, tail = prompt_width - seqs.prompt_width, width - seqs.response_width
    attention_mask = F.pad(seqs.attention_mask, (lead, tail), value=0)
    return Sequences(input_ids=F.pad(seqs.input_ids, (lead, tail), value=pad_id), attention_mask=attention_mask,
                     position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
                     response_mask=F.pad(seqs.response_mask, (0, tail), value=False), has_eos=seqs.has_eos,
                     prompt_width=prompt_width)


def _cat_sequences(parts: list[Sequences]) -> Sequences:
    names = [f.name for f in dataclasses.fields(Sequences) if f.name != "prompt_width"]
    return Sequences(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names}, prompt_width=parts[0].prompt_width)


def _sampled(drawn: Drawn) -> SampledLogprobs:
    assert drawn.sampled is not None  # every round keeps generation's log-probs when the first does
    return drawn.sampled


def _cat_scored(parts: list[ScoredRollout], rows: list[torch.Tensor], width: int, seqs: Sequences) -> ScoredRollout:
    """The rows of each round's scores, per-token tensors padded to `width`, on the joined `seqs`."""
    def cat(name: str) -> torch.Tensor:
        values = [getattr(p, name) for p in parts]
        return torch.cat([_right(v[i], width) if v.dim() == 2 else v[i] for v, i in zip(values, rows)])

    def cat_optional(name: str) -> torch.Tensor | None:
        return None if getattr(parts[0], name) is None else cat(name)

    reward_parts = {name: torch.cat([p.reward_parts[name][i] for p, i in zip(parts, rows)]) for name in parts[0].reward_parts}
    return ScoredRollout(seqs=seqs, logprobs=cat("logprobs"), ref_logprobs=cat("ref_logprobs"), values=cat_optional("values"),
                         scores=cat_optional("scores"), entropy=cat("entropy"), reward_parts=reward_parts,
                         ensemble_std=cat_optional("ensemble_std"))
