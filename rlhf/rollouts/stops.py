"""Policy turns that end in generation: each row of a batch stops at its first stop string (an
environment's `stop_strings`, rlhf/rollouts/multiturn.py), its EOS, or its own token budget, and the
batch stops once every row has.

Why not transformers' `stop_strings=` (StopStringCriteria): it matches token strings from the
vocabulary against the end of the whole sequence, prompt included, so a stop string that begins in
the context (an observation, the prompt) can end a turn after one token, and a tokenizer whose
token strings are not its decoded text (byte fallback, added tokens) can miss or invent a match.
Here a turn's text is what `tokenizer.decode` gives for the turn's own tokens, the text the
environment's `step` reads, so a turn ends with the token that first puts a stop string in it.

Sampling is unchanged: a row that has stopped gets padding while the others go on (transformers
still draws a token for it, so the other rows' random draws are the ones they would get without
the stop), and the tokens a row keeps are those it would have sampled before its stop; only the
tokens after it are never generated. A criterion is local to its rank: under ZeRO-3 `synced_gpus`
keeps a finished rank stepping until every rank is done, as it does for EOS.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.protocols import CausalLM, Tokenizer
from rlhf.rollouts.generation import Sampling, generate


class TurnEnds:
    """A transformers stopping criterion for one `generate` call (StoppingCriteria's call without its base
    class, so that importing this module, as the launcher's preflight does, leaves transformers unloaded);
    it keeps each row's tokens as they come. A row ends after `budgets[i]` tokens (None: no budgets) or at
    the first token after which its decoded tokens contain a stop string. `ends[i]`: row i's token count
    when it ended that way, None when it ran on (to EOS, or to the call's max_new_tokens)."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...], *, eos_id: int, budgets: list[int] | None = None) -> None:
        self.tokenizer, self.stops, self.eos_id, self.budgets = tokenizer, stops, eos_id, budgets
        self.rows: list[list[int]] = []
        self.ends: list[int | None] = []
        self._open: list[bool] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        last = input_ids[:, -1].tolist()  # called once per new token, the first call with the first new token
        if not self.rows:
            self.rows, self.ends, self._open = [[] for _ in last], [None] * len(last), [True] * len(last)
        for i, token in enumerate(last):
            if self._open[i]:
                self._take(i, token)
        return torch.tensor([end is not None for end in self.ends], dtype=torch.bool, device=input_ids.device)

    def _take(self, i: int, token: int) -> None:
        row = self.rows[i]
        row.append(token)
        if token == self.eos_id:
            self._open[i] = False  # transformers ends it; `generate` cuts after the EOS
        elif (self.budgets is not None and len(row) >= self.budgets[i]) or self._stopped(row):
            self.ends[i], self._open[i] = len(row), False

    def _stopped(self, row: list[int]) -> bool:
        if not self.stops:
            return False
        text = self.tokenizer.decode(row)
        return any(stop in text for stop in self.stops)


def generate_turns(model: CausalLM, prompts: list[list[int]], sampling: Sampling, *, tokenizer: Tokenizer, stops: tuple[str, ...],
                   budgets: list[int] | None = None) -> list[list[int]]:
    """`generate`'s continuations, each ending at its first stop string (the token that completes it
    kept), its EOS (kept), `budgets[i]` tokens or sampling.max_new_tokens, whichever comes first."""
    from transformers import StoppingCriteriaList
    ends = TurnEnds(tokenizer, stops, eos_id=sampling.eos_id, budgets=budgets)
    turns = generate(model, prompts, sampling, stopping=StoppingCriteriaList([ends]))
    if not ends.ends:  # no token generated (max_new_tokens 0)
        return turns
    # A row ended here has padding after its end, which may be EOS itself: cut at the end, not at an EOS.
    return [turn if end is None else turn[:end] for turn, end in zip(turns, ends.ends)]
