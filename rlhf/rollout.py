"""Generation and scoring for PPO: sampled responses, then one batched forward pass of each model.

A rollout batch is laid out as [left-padded prompts | right-padded responses]: P prompt columns,
R response columns. Logits and values at column P - 1 + t belong to response token t (the state
before it is emitted), so every per-token tensor of a rollout is (B, R) with one response mask.
Position ids come from the attention mask, as in generation, so padding never shifts a position.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Any

import torch

from rlhf.algos.ppo import entropy_from_logits, logprobs_from_logits
from rlhf.algos.reward import sequence_rewards
from rlhf.data.collate import left_pad_prompts, pad_right


@torch.no_grad()
def generate(
    model: Any,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    zero3: bool = False,
    gather: bool = True,
    device: torch.device | None = None,
) -> list[list[int]]:
    """Sample (or, at temperature 0, greedily decode) a continuation of each prompt.

    Prompts are left-padded so every row's last prompt token sits at the same position and the
    KV cache grows in step; the attention mask keeps padding out. Returns each response's token
    ids up to and including its first EOS (responses cut by max_new_tokens have no EOS).

    Under ZeRO-3 the parameters are gathered once for the whole call rather than once per token
    (unless `gather` is off, for an actor too large to hold whole), and `synced_gpus` keeps every
    rank stepping until all are done, because a partitioned forward is a collective that all ranks
    must join.
    """
    batch = left_pad_prompts(prompts, pad_id=pad_id)
    input_ids = batch["input_ids"].to(device) if device else batch["input_ids"]
    attention_mask = batch["attention_mask"].to(device) if device else batch["attention_mask"]
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    gather: contextlib.AbstractContextManager = contextlib.nullcontext()
    if zero3 and gather:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gather:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            synced_gpus=zero3,
            use_cache=True,
            **sampling,
        )
    responses = []
    for row in output[:, input_ids.shape[1] :].tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        responses.append(row[:cut])
    return responses


@dataclass
class Sequences:
    """Prompts and their sampled responses as one batch.

    input_ids, attention_mask, position_ids: (B, P + R) long; response_mask: (B, R) bool, True at
    each response's tokens (its EOS included); has_eos: (B,) bool; prompt_width: P.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    prompt_width: int

    def rows(self, index: torch.Tensor) -> Sequences:
        """The rollouts at `index` (a minibatch)."""
        return Sequences(**{f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "prompt_width"},
                         prompt_width=self.prompt_width)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)


def build_sequences(
    prompts: list[list[int]], responses: list[list[int]], *, pad_id: int, eos_id: int, device: torch.device | None = None
) -> Sequences:
    """Lay prompts (left-padded) and responses (right-padded) side by side. Every response holds at
    least one token. Masks come from lengths, never from token ids (a pad may equal EOS)."""
    if any(not r for r in responses):
        raise ValueError("every response must hold at least one token")
    left = left_pad_prompts(prompts, pad_id=pad_id)
    right = pad_right(responses, pad_value=pad_id)  # (B, R)
    lengths = torch.tensor([len(r) for r in responses])
    response_mask = torch.arange(right.shape[1])[None, :] < lengths[:, None]  # (B, R)
    attention_mask = torch.cat([left["attention_mask"], response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    has_eos = torch.tensor([r[-1] == eos_id for r in responses])
    seqs = Sequences(
        input_ids=torch.cat([left["input_ids"], right], dim=1), attention_mask=attention_mask, position_ids=position_ids,
        response_mask=response_mask, has_eos=has_eos, prompt_width=left["input_ids"].shape[1],
    )
    if device is not None:
        seqs = Sequences(**{f.name: getattr(seqs, f.name).to(device) for f in fields(seqs) if f.name != "prompt_width"},
                         prompt_width=seqs.prompt_width)
    return seqs


def policy_logprobs(
    model: Any, seqs: Sequences, *, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) log-probs of the response tokens under `model` (a causal LM or its engine), from
    logits divided by the sampling temperature, and optionally (B, R) entropies of those
    distributions. Differentiable; wrap in no_grad for scoring."""
    logits = model(
        input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids, use_cache=False
    ).logits[:, seqs.prompt_width - 1 : -1]  # (B, R, V): column P - 1 + t predicts response token t
    logp = logprobs_from_logits(logits, seqs.response_ids, temperature=temperature)
    entropy = entropy_from_logits(logits.detach(), temperature=temperature) if with_entropy else None
    return logp, entropy


def token_values(critic: Any, seqs: Sequences) -> torch.Tensor:
    """(B, R) the critic's value of the state before each response token. Differentiable."""
    return critic(seqs.input_ids, seqs.attention_mask)[:, seqs.prompt_width - 1 : -1]


def sequence_scores(reward_model: Any, seqs: Sequences) -> torch.Tensor:
    """(B,) the reward model's score of each whole sequence (its head at the last real token)."""
    return sequence_rewards(reward_model(seqs.input_ids, seqs.attention_mask), seqs.attention_mask)


@dataclass
class ScoredRollout:
    """A rollout batch and what PPO needs from the four models: logprobs, ref_logprobs, values
    (None without a critic) and entropy (of the sampling distributions) are (B, R); scores (B,)."""

    seqs: Sequences
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor
    entropy: torch.Tensor


@torch.no_grad()
def score_rollout(
    seqs: Sequences,
    *,
    actor: Any,
    reference: Any,
    critic: Any | None,
    reward: Any,
    temperature: float,
    chunk: int,
    reference_is_actor_without_adapters: bool = False,
) -> ScoredRollout:
    """One forward pass of each model over the rollout, `chunk` rows at a time: the actor's
    log-probs (PPO's old policy) and entropies, the reference's log-probs (the KL penalty), the
    critic's values (when given) and the reward model's scores.

    With `reference_is_actor_without_adapters` (LoRA on the actor) `reference` is ignored and the
    reference log-probs come from the actor with its adapters switched off: no second copy.
    """
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": [], "ref_logprobs": [], "values": [], "scores": []}
    for start in range(0, seqs.input_ids.shape[0], chunk):
        part = seqs.rows(torch.arange(start, min(start + chunk, seqs.input_ids.shape[0]), device=seqs.input_ids.device))
        logp, entropy = policy_logprobs(actor, part, temperature=temperature, with_entropy=True)
        parts["logprobs"].append(logp)
        parts["entropy"].append(entropy)
        if reference_is_actor_without_adapters:
            peft_model = actor.module if hasattr(actor, "module") else actor
            with peft_model.disable_adapter():
                parts["ref_logprobs"].append(policy_logprobs(actor, part, temperature=temperature)[0])
        else:
            parts["ref_logprobs"].append(policy_logprobs(reference, part, temperature=temperature)[0])
        if critic is not None:
            parts["values"].append(token_values(critic, part))
        parts["scores"].append(sequence_scores(reward, part))
    joined = {k: torch.cat(v) if v else None for k, v in parts.items()}
    return ScoredRollout(seqs=seqs, **joined)
