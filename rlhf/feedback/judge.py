"""An AI judge for `rlhf label --by judge:<model>`: a causal LM asked which of two responses is better.

The judge reads text (it re-tokenizes prompts and responses with its own tokenizer, so it need not
share the policy's). For a pair (a, b) the question is `judge.template` with {prompt}, {a} and {b}
filled in (as a user turn of the judge's chat template when it has one); the preference for a is
softmax(log p(choice_a), log p(choice_b))[0] at the answer position. Asked again as (b, a) and
averaged: P(a > b) = (p(first | a, b) + 1 - p(first | b, a)) / 2, so a judge that always says "A"
ends at 0.5 for every pair instead of deciding by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlhf.config import JudgeConfig, ModelConfig
from rlhf.errors import UserError
from rlhf.protocols import CausalLM, Tokenizer

if TYPE_CHECKING:
    from rlhf.store.registry import Registry


@dataclass
class Judge:
    model: CausalLM
    tokenizer: Tokenizer
    cfg: JudgeConfig
    choice_ids: tuple[int, int]

    def question(self, prompt: str, first: str, second: str) -> list[int]:
        """The judge's token ids for one ordered pair, ending where the answer token goes."""
        text = self.cfg.template.replace("{prompt}", prompt).replace("{a}", first).replace("{b}", second)
        if self.cfg.chat_template and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            return list(ids if isinstance(ids, list) else ids["input_ids"])  # ids, or a BatchEncoding in newer transformers
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def first_preferred(self, questions: list[list[int]]) -> list[float]:
        """p(first response better) for each question, from the two choices' next-token logits."""
        out = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(questions), self.cfg.batch_size):
            batch = questions[start : start + self.cfg.batch_size]
            width = max(len(q) for q in batch)
            ids = torch.tensor([[pad] * (width - len(q)) + q for q in batch])
            mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in batch])
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1, :].float()
            pair = torch.log_softmax(logits, dim=-1)[:, list(self.choice_ids)]
            out += torch.softmax(pair, dim=-1)[:, 0].tolist()
        return out

    def scores(self, prompt: str, responses: list[str]) -> tuple[list[float], list[list[float]]]:
        """Each response's mean preference over the others, and the (K, K) matrix P(i > j) (0.5 on the diagonal)."""
        k = len(responses)
        pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
        asked = self.first_preferred([self.question(prompt, responses[i], responses[j]) for i, j in pairs])
        first = dict(zip(pairs, asked))
        better = [[0.5] * k for _ in range(k)]
        for i, j in pairs:
            better[i][j] = (first[(i, j)] + 1.0 - first[(j, i)]) / 2
        return [sum(better[i][j] for j in range(k) if j != i) / (k - 1) for i in range(k)], better


def choice_ids(tokenizer: Tokenizer, choices: list[str], *, key: str = "judge.choices") -> tuple[int, int]:
    """Each choice's single token id under the judge's tokenizer, or one line saying which is not one token."""
    ids = []
    for choice in choices:
        encoded = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise UserError(f"{key}: {choice!r} is {len(encoded)} tokens for the judge's tokenizer, not one; "
                            f"pick answer texts that are one token each (e.g. 'A' and 'B', or ' A' and ' B')")
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise UserError(f"{key}: {choices[0]!r} and {choices[1]!r} are the same token for the judge's tokenizer")
    return ids[0], ids[1]


def load_judge(target: str, cfg: JudgeConfig, registry: Registry, *, dtype: torch.dtype = torch.float32) -> Judge:
    """The judge model from a registry reference, folder, .gguf or hub name, frozen, dropout off."""
    from rlhf.models.loading import disable_dropout, load_causal_lm
    from rlhf.models.sources import check_causal_lm, load_tokenizer, resolve_model

    source = resolve_model(target, registry, key="by")
    check_causal_lm(source, key="by")
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.trust_remote_code, key="by")
    ids = choice_ids(tokenizer, cfg.choices)
    model = load_causal_lm(source, ModelConfig(name_or_path=target, trust_remote_code=cfg.trust_remote_code), tokenizer,
                           seed=0, dtype=dtype, key="by")
    disable_dropout(model)
    model.eval()
    return Judge(model, tokenizer, cfg, ids)
