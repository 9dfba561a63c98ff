"""Generation and the forwards PPO scores with: sampled responses, each model's log-probs, values and scores
(the rollout's scoring loop is `rlhf.rollouts.scoring`).

A rollout batch is laid out as [left-padded prompts | right-padded responses]: P prompt columns,
R response columns. Logits and values at column P - 1 + t belong to response token t (the state
before it is emitted), so every per-token tensor of a rollout is (B, R) with one response mask.
Position ids come from the attention mask, as in generation, so padding never shifts a position.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, cast

import torch

from rlhf.algos.ppo import entropy_from_logits, logprobs_from_logits
from rlhf.algos.reward import ensemble_score, ensemble_spread, sequence_rewards
from rlhf.data.collate import left_pad_prompts
from rlhf.protocols import AdapterLM, CausalLM, PolicyModel, ScoringModel, StoppingCriteria


@dataclass(frozen=True, eq=False)
class Sampling:
    """How responses are drawn: one object from the stage's config down to `model.generate`.

    Temperature 0 decodes greedily (top_k and top_p then play no part). `zero3_engine` is the
    DeepSpeed engine holding the model under ZeRO-3 (None otherwise); with `gather` its weights are
    gathered once per call rather than per layer per token. Prompts go to `device` (None: stay on
    the CPU)."""

    pad_id: int
    eos_id: int
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    zero3_engine: PolicyModel | None = None
    gather: bool = True
    device: torch.device | None = None

    def greedy(self) -> Sampling:
        return replace(self, temperature=0.0)


@torch.no_grad()
def generate(model: CausalLM, prompts: list[list[int]], sampling: Sampling, *, stopping: StoppingCriteria | None = None) -> list[list[int]]:
    """Sample (or, at temperature 0, greedily decode) a continuation of each prompt.

    Returns each response's token ids up to and including its first EOS (responses cut by
    max_new_tokens have no EOS). See `_generate_tokens` for padding and ZeRO-3; `stopping`: transformers'
    StoppingCriteriaList that ends rows besides EOS (rlhf/rollouts/stops.py), rows it ended padded after their end.
    """
    _, new_tokens, _ = _generate_tokens(model, prompts, sampling, stopping=stopping)
    eos_id = sampling.eos_id
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in new_tokens.tolist()]


@dataclass(frozen=True)
class SampledLogprobs:
    """What generation saw of the policy it sampled from: (B, R) log-probs of the sampled response
    tokens and (B, R) entropies, from generation's own logits at the sampling temperature, 0 at
    padding. The same as `policy_logprobs(..., with_entropy=True)` of the rollout up to rounding
    (the KV cache sums in another order): PPO's old log-probs without another forward."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


@torch.no_grad()
def sample_rollout(model: CausalLM, prompts: list[list[int]], sampling: Sampling) -> Sequences:
    """Sample a response to each prompt and lay the batch out for scoring: prompts left-padded,
    responses right-padded, masks from lengths (a pad may equal EOS). What the tests' plain
    `build_sequences` (tests/sequences.py) gives for `generate`'s responses, built from
    generation's own tensors on the device instead of through Python lists (one sync, for the width)."""
    return sample_rollout_with_logprobs(model, prompts, sampling, keep_logprobs=False)[0]


@torch.no_grad()
def sample_rollout_with_logprobs(
    model: CausalLM, prompts: list[list[int]], sampling: Sampling, *, keep_logprobs: bool = True
) -> tuple[Sequences, SampledLogprobs | None]:
    """`sample_rollout`, and with `keep_logprobs` (at a temperature above 0) the sampled tokens'
    log-probs and entropies from generation's logits (None otherwise)."""
    keep_logprobs = keep_logprobs and sampling.temperature > 0
    prompt_batch, new_tokens, logits = _generate_tokens(model, prompts, sampling, keep_logits=keep_logprobs)
    is_eos = new_tokens == sampling.eos_id  # (B, N)
    has_eos = is_eos.any(dim=1)
    # A response runs up to and including its first EOS. Later tokens are padding, which may be
    # the EOS id itself, so lengths come from the first EOS, never from a count of non-pad ids.
    lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, new_tokens.shape[1])  # (B,)
    width = int(lengths.max())
    response_mask = torch.arange(width, device=new_tokens.device)[None, :] < lengths[:, None]  # (B, R)
    response_ids = new_tokens[:, :width].masked_fill(~response_mask, sampling.pad_id)
    attention_mask = torch.cat([prompt_batch["attention_mask"], response_mask.long()], dim=1)
    seqs = Sequences(
        input_ids=torch.cat([prompt_batch["input_ids"], response_ids], dim=1), attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0), response_mask=response_mask, has_eos=has_eos,
        prompt_width=prompt_batch["input_ids"].shape[1],
    )
    if logits is None:
        return seqs, None
    drawn_from = torch.stack(logits[:width], dim=1)  # (B, R, V): the logits each response token was drawn from
    padding = ~response_mask
    return seqs, SampledLogprobs(
        logprobs=logprobs_from_logits(drawn_from, response_ids, temperature=sampling.temperature).masked_fill(padding, 0.0),
        entropy=entropy_from_logits(drawn_from, temperature=sampling.temperature).masked_fill(padding, 0.0),
    )


def _generate_tokens(
    model: CausalLM, prompts: list[list[int]], sampling: Sampling, *, keep_logits: bool = False, stopping: StoppingCriteria | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """(the left-padded prompt batch on the sampling's device, the generated ids (B, N), and with
    `keep_logits` the raw logits of each step, N tensors (B, V), else None); rows that finished
    early are filled with the pad id after their EOS.

    Prompts are left-padded so every row's last prompt token sits at the same position and the
    KV cache grows in step; the attention mask keeps padding out (transformers derives position
    ids from it).

    `model` is the module. Under ZeRO-3 (`sampling.zero3_engine`) the parameters are gathered once
    for the whole call (unless `sampling.gather` is off, for an actor too large to hold whole) and
    `synced_gpus` keeps every rank stepping until all are done, because a partitioned forward is a
    collective that all ranks must join. The gathered weights are released when the call ends.
    """
    device, engine = sampling.device, sampling.zero3_engine
    batch = left_pad_prompts(prompts, pad_id=sampling.pad_id)
    prompt_batch = {k: batch[k].to(device) if device else batch[k] for k in ("input_ids", "attention_mask")}
    how: dict[str, Any] = {"do_sample": False}
    if sampling.temperature > 0:
        how = {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
    whole = engine is not None and sampling.gather
    with _whole_for_generation(engine) if whole else contextlib.nullcontext(), _only_our_sampling(model):
        output = model.generate(
            **prompt_batch,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=sampling.pad_id,
            eos_token_id=sampling.eos_id,
            synced_gpus=engine is not None,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=keep_logits,
            stopping_criteria=stopping,
            **how,
        )
    if whole and torch.cuda.is_available():
        # The whole actor was materialized for this call, beside the KV cache: hand those blocks
        # back now, or the allocator keeps them cached through scoring and training, whose
        # tensors have other shapes (fragmentation, out-of-memory on a tight GPU).
        torch.cuda.empty_cache()
    return prompt_batch, output.sequences[:, prompt_batch["input_ids"].shape[1] :], output.logits if keep_logits else None


def _whole_for_generation(engine: PolicyModel | None) -> contextlib.AbstractContextManager:
    """A ZeRO-3 engine's weights gathered whole, with DeepSpeed's per-module fetch and release hooks
    taken off until the context ends (DeepSpeed's own `unwrap_model_for_generation`). Gathering
    alone is not enough: each module's forward hook releases the weights again, so every new token
    all-gathers the whole model (SmolLM2-135M on 2 CPU ranks: 66 s for 12 tokens)."""
    from deepspeed.runtime.zero import unwrap_model_for_generation

    return unwrap_model_for_generation(engine)


@contextlib.contextmanager
def _only_our_sampling(model: CausalLM) -> Iterator[None]:
    """Generate with no setting from the checkpoint's generation_config.json.

    transformers fills every setting a call leaves unset from the model's generation config, so a
    chat checkpoint that ships repetition_penalty, no_repeat_ngram_size, min_new_tokens,
    suppress_tokens or min_p would sample from another distribution than the one PPO scores (and
    the evaluation would not measure the policy). For the call, each model in the stack (a peft
    wrapper and the transformers model inside it) gets a config that holds only the special tokens.
    """
    from transformers import GenerationConfig

    swapped: list[tuple[torch.nn.Module, GenerationConfig]]
    swapped = [(m, m.generation_config) for m in model.modules() if isinstance(getattr(m, "generation_config", None), GenerationConfig)]
    for module, original in swapped:
        module.generation_config = GenerationConfig(
            bos_token_id=original.bos_token_id, eos_token_id=original.eos_token_id, pad_token_id=original.pad_token_id,
        )
    try:
        yield
    finally:
        for module, original in swapped:
            module.generation_config = original


@dataclass
class Sequences:
    """Prompts and their sampled responses as one batch.

    input_ids, attention_mask, position_ids: (B, P + R) long; response_mask: (B, R) bool, True at
    each response's tokens (its EOS included); has_eos: (B,) bool; prompt_width: P. In a multi-turn
    episode (rlhf/rollouts/multiturn.py) the response side holds the environment's tokens too: in the attention
    mask, not in response_mask, whose holes every per-token computation skips.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    prompt_width: int

    def to(self, device: torch.device) -> Sequences:
        return Sequences(**{f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "prompt_width"},
                         prompt_width=self.prompt_width)

    def rows(self, index: torch.Tensor) -> Sequences:
        """The rollouts at `index` (a minibatch)."""
        return Sequences(**{f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "prompt_width"},
                         prompt_width=self.prompt_width)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def trimmed(self) -> Sequences:
        """The same rollouts without the columns that are padding in every row: left of the longest
        prompt and right of the longest response. A forward pass over them would be wasted; the
        kept columns keep their positions (they come from the mask), so every result is the same."""
        prompt_lengths = self.attention_mask[:, : self.prompt_width].sum(dim=1)
        longest_prompt, longest_response = torch.stack([prompt_lengths.max(), self.response_extents.max()]).tolist()
        lead = min(self.prompt_width - longest_prompt, self.prompt_width - 1)  # keep the column before response token 0
        if lead == 0 and longest_response == self.response_width:
            return self
        end = self.prompt_width + longest_response
        return Sequences(
            input_ids=self.input_ids[:, lead:end], attention_mask=self.attention_mask[:, lead:end],
            position_ids=self.position_ids[:, lead:end], response_mask=self.response_mask[:, :longest_response],
            has_eos=self.has_eos, prompt_width=self.prompt_width - lead,
        )

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    @property
    def response_extents(self) -> torch.Tensor:
        """(B,) one past each row's last response token: its length when the mask is a prefix (one turn),
        more when it has holes (a multi-turn rollout's environment tokens, rlhf/rollouts/multiturn.py)."""
        columns = torch.arange(1, self.response_width + 1, device=self.response_mask.device)
        return (self.response_mask.long() * columns).amax(dim=1)


def policy_logprobs(
    model: PolicyModel, seqs: Sequences, *, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) log-probs of the response tokens under `model` (a causal LM or its engine), from
    logits divided by the sampling temperature, and optionally (B, R) entropies of those
    distributions; 0 at padding. Differentiable; wrap in no_grad for scoring.

    Runs on the batch without its all-padding columns, and asks the model for the logits of the
    response positions only where it can (`logits_to_keep`): the LM head over the prompt, and a
    (B, P, V) float tensor, would be thrown away.
    """
    full_width = seqs.response_width
    seqs = seqs.trimmed()
    width = seqs.response_width
    keep = {"logits_to_keep": width + 1} if _accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, position_ids=seqs.position_ids, use_cache=False, **keep
    ).logits[:, -(width + 1) : -1]  # (B, R, V): column P - 1 + t predicts response token t
    padding = ~seqs.response_mask
    logp = logprobs_from_logits(logits, seqs.response_ids, temperature=temperature).masked_fill(padding, 0.0)
    entropy = entropy_from_logits(logits.detach(), temperature=temperature).masked_fill(padding, 0.0) if with_entropy else None
    return _pad_columns(logp, full_width), None if entropy is None else _pad_columns(entropy, full_width)


def reference_logprobs(reference: PolicyModel | None, actor: PolicyModel, seqs: Sequences, *, temperature: float) -> torch.Tensor:
    """(B, R) response log-probs under the frozen `reference`, or, when it is None, under `actor`
    (a peft model, or an engine holding one) with its LoRA adapters switched off for the call: the
    starting policy without a second copy. Not differentiable."""
    with torch.no_grad():
        if reference is not None:
            return policy_logprobs(reference, seqs, temperature=temperature)[0]
        peft_model = cast(AdapterLM, actor.module if hasattr(actor, "module") else actor)  # no reference: the actor has adapters
        with peft_model.disable_adapter():
            return policy_logprobs(actor, seqs, temperature=temperature)[0]


def pack_sequences(
    prompts: list[list[int]], responses: list[list[int]], *, pad_id: int, eos_id: int, device: torch.device | None = None
) -> Sequences:
    """Given prompts and responses laid out as a sampled rollout is (prompts left-padded, responses
    right-padded), so `policy_logprobs` scores stored responses (DPO's pairs) the way it scores
    sampled ones. Every response holds at least one token; masks come from lengths, never from
    token ids (a pad may equal EOS)."""
    if any(not r for r in responses):
        raise ValueError("every response must hold at least one token")
    left = left_pad_prompts(prompts, pad_id=pad_id)
    lengths = torch.tensor([len(r) for r in responses])
    width = int(lengths.max())
    response_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    for i, r in enumerate(responses):
        response_ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    response_mask = torch.arange(width)[None, :] < lengths[:, None]  # (B, R)
    attention_mask = torch.cat([left["attention_mask"], response_mask.long()], dim=1)  # (B, P + R)
    seqs = Sequences(
        input_ids=torch.cat([left["input_ids"], response_ids], dim=1), attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0), response_mask=response_mask,
        has_eos=torch.tensor([r[-1] == eos_id for r in responses]), prompt_width=left["input_ids"].shape[1],
    )
    return seqs if device is None else seqs.to(device)


def token_values(critic: ScoringModel, seqs: Sequences) -> torch.Tensor:
    """(B, R) the critic's value of the state before each response token (0 at padding). Differentiable."""
    full_width = seqs.response_width
    seqs = seqs.trimmed()
    values = critic(seqs.input_ids, seqs.attention_mask)[:, seqs.prompt_width - 1 : -1]
    return _pad_columns(values.masked_fill(~seqs.response_mask, 0.0), full_width)


def sequence_scores(reward_model: ScoringModel, seqs: Sequences) -> torch.Tensor:
    """(B,) the reward model's score of each whole sequence (its head at the last real token)."""
    seqs = seqs.trimmed()
    return sequence_rewards(reward_model(seqs.input_ids, seqs.attention_mask), seqs.attention_mask)


@dataclass(frozen=True, eq=False)
class RewardEnsemble:
    """reward_ensemble (Coste et al. 2023): frozen reward models scored beside the main one (PPO's, best-of-N's)."""

    members: tuple[ScoringModel, ...]
    stats: torch.Tensor
    """(M + 1, 2) float64: each model's stored mean and std, the main reward model first."""
    penalty: float

    def combine(self, first: torch.Tensor, seqs: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
        """The main model's raw scores `first` (B,) and the members' of `seqs` -> (B,) mean - penalty x std of the
        normalized scores (in `first`'s dtype) and (B,) that std, both computed in float64."""
        raw = torch.stack([first, *(sequence_scores(m, seqs) for m in self.members)]).double()
        mean, std = self.stats.to(raw.device).unbind(dim=1)
        return ensemble_score(raw, mean, std, self.penalty).to(first.dtype), ensemble_spread(raw, mean, std)


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, R') -> (B, width), zeros on the right: per-token results of a trimmed batch, back in the rollout's layout."""
    return x if x.shape[1] == width else torch.nn.functional.pad(x, (0, width - x.shape[1]))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_class: type[torch.nn.Module]) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _accepts_logits_to_keep(model: PolicyModel) -> bool:
    """Whether the transformers model inside `model` (a DeepSpeed engine, a peft model, or itself)
    can compute only its last logits."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine's model
    if hasattr(inner, "get_base_model"):  # peft passes the argument through to its base model
        inner = inner.get_base_model()
    return _forward_takes_logits_to_keep(type(inner))  # type: ignore[arg-type]  # a class is hashable; mypy reads its unbound __hash__


def minibatch_rows(
    response_lengths: torch.Tensor, *, micro_batch_size: int, group_by_length: bool = False
) -> list[torch.Tensor]:
    """Row indices of one PPO epoch's minibatches: a random partition of the rollout batch.

    With `group_by_length`, rollouts of similar response length share a minibatch (random among
    equal lengths; minibatches in random order), so each is padded only to its own longest
    response; the minibatches are then less random mixtures. Indices are on the lengths' device.
    """
    order = torch.randperm(response_lengths.shape[0])
    if group_by_length:
        order = order[torch.argsort(response_lengths.cpu()[order], stable=True)]
        chunks = order.split(micro_batch_size)
        order = torch.cat([chunks[i] for i in torch.randperm(len(chunks)).tolist()])
    return list(order.to(response_lengths.device).split(micro_batch_size))


@dataclass
class ScoredRollout:
    """A rollout batch and what PPO needs from the four models: logprobs, ref_logprobs, values
    (None without a critic) and entropy (of the sampling distributions) are (B, R); scores (B,): the
    reward model's raw scores (None without one), or with an ensemble its mean - penalty x std."""

    seqs: Sequences
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor | None
    entropy: torch.Tensor
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Each reward component's (B,) score as it came (`rlhf.rollouts.rewards.RewardScores.parts`), once the stage combined them."""
    ensemble_std: torch.Tensor | None = None
    """(B,) float64 the std across the ensemble's normalized scores (None without an ensemble)."""
