"""Padding-free batches: a micro-batch's rows packed end to end into a few fixed-length rows.

The sampler still decides which rows make a micro-batch (so resume and the loss's denominator are
exactly those of the unpacked run); packing only changes how those rows are laid out. Each row's
position ids restart at 0 and no attention mask is passed: transformers (>= 4.54) reads the
restarts as sequence boundaries and keeps attention inside each row, sliding windows included, on
eager and sdpa attention (a block-diagonal mask) and on flash_attention_2 (varlen kernels, the
same position ids). The tests check packed against unpacked loss and gradients per architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from rlhf.data.collate import rm_pairs
from rlhf.data.tokenize import RMExample, SFTExample
from rlhf.errors import UserError
from rlhf.protocols import HFConfig

# model_type values whose packed loss and gradients tests/unit/test_packing.py checks against the
# unpacked ones; another architecture may build its attention mask some other way.
PACKING_ARCHITECTURES = frozenset({"gpt2", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt_neox"})
# Architectures whose model builds its attention mask without the position ids (OPT): for them the
# packed rows' mask is built here, by transformers' own function, and passed as a 4D mask.
EXPLICIT_MASK_ARCHITECTURES = frozenset({"opt"})
# Attention implementations that take their mask from transformers' masking_utils (which detects
# packed rows from the position ids) or, for flash_attention_2, from the position ids directly.
PACKING_ATTENTION = frozenset({"eager", "sdpa", "flash_attention_2"})


def pack_rows(lengths: Sequence[int], *, capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices into `lengths` grouped into bins of at most `capacity` tokens.

    Every index lands in exactly one bin and no row is split. Deterministic: rows are taken
    longest first, ties by index, and each goes to the first bin with room; each bin lists its
    indices in ascending order.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a packed row of {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


class PackedRows(NamedTuple):
    """Sequences laid end to end. input_ids, position_ids (R, P) long; starts, lengths (N,) long:
    where sequence n begins in the flattened (R * P) rows, and its tokens."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor


def pack_sequences(seqs: list[list[int]], *, pad_id: int, capacity: int) -> PackedRows:
    """Pack sequences into R rows of P tokens (P = the fullest row, <= capacity) by `pack_rows`.

    Position ids restart at 0 at each sequence, and at the padding that ends a row, which thus forms
    a sequence of its own that no real token sees.
    """
    bins = pack_rows([len(s) for s in seqs], capacity=capacity)
    width = max(sum(len(seqs[i]) for i in b) for b in bins)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    starts = torch.zeros(len(seqs), dtype=torch.long)
    for r, b in enumerate(bins):
        column = 0
        for i in b:
            n = len(seqs[i])
            input_ids[r, column : column + n] = torch.as_tensor(seqs[i], dtype=torch.long)
            position_ids[r, column : column + n] = torch.arange(n)
            starts[i] = r * width + column
            column += n
        position_ids[r, column:] = torch.arange(width - column)
    return PackedRows(input_ids, position_ids, starts, torch.tensor([len(s) for s in seqs], dtype=torch.long))


def collate_packed_sft(batch: list[SFTExample], *, pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Pack a micro-batch of SFT examples (see `pack_sequences`).

    Returns input_ids, position_ids (R, P) long; response_mask (R, P) bool, True = counts in the
    loss, False at each example's first token (the token before it belongs to another example, so
    nothing there predicts it), on prompts and on padding; num_tokens () long, the real tokens.
    """
    packed = pack_sequences([ex.input_ids for ex in batch], pad_id=pad_id, capacity=capacity)
    response_mask = torch.zeros(packed.input_ids.numel(), dtype=torch.bool)
    for ex, start in zip(batch, packed.starts.tolist()):
        response_mask[start + 1 : start + len(ex.input_ids)] = torch.as_tensor(ex.response_mask[1:], dtype=torch.bool)
    return {"input_ids": packed.input_ids, "position_ids": packed.position_ids,
            "response_mask": response_mask.view_as(packed.input_ids), "num_tokens": packed.lengths.sum()}


def collate_packed_rm(batch: list[RMExample], *, pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Every sequence of a batch of preference groups, packed; the pairs as `collate_rm` gives them.

    Returns input_ids, position_ids (R, P) long; last_index (N,) long, each sequence's last token in
    the flattened (R * P) rows (where its reward is read); better, worse, margins, weights as collate_rm.
    """
    pairs, seqs = rm_pairs(batch)
    packed = pack_sequences(seqs, pad_id=pad_id, capacity=capacity)
    return {"input_ids": packed.input_ids, "position_ids": packed.position_ids,
            "last_index": packed.starts + packed.lengths - 1, **pairs}


class PackedResponses(NamedTuple):
    """Prompt + response sequences packed (see `pack_sequences`), to score the responses (DPO's family).

    input_ids, position_ids (R, P) long; targets (T,) long: each response token's index in the flattened
    (R * P) rows, sequence after sequence; owners (T,) long: the sequence (0..N-1) each belongs to;
    response_lengths (N,) long: each response's tokens (the length the losses normalize by).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    owners: torch.Tensor
    response_lengths: torch.Tensor

    def to(self, device: torch.device) -> PackedResponses:
        return PackedResponses(*(t.to(device) for t in self))


def collate_packed_responses(prompts: list[list[int]], responses: list[list[int]], *, pad_id: int,
                             capacity: int) -> PackedResponses:
    """Each prompt followed by its response, packed in rows of at most `capacity` tokens. Every prompt
    and response holds a token: a response's first token is read from the logits of its prompt's last."""
    if any(not p for p in prompts) or any(not r for r in responses):
        raise ValueError("every prompt and every response must hold at least one token")
    packed = pack_sequences([p + r for p, r in zip(prompts, responses)], pad_id=pad_id, capacity=capacity)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    first = packed.starts + torch.tensor([len(p) for p in prompts], dtype=torch.long)  # (N,) each response's first token
    # Token k of response n sits at first[n] + k: repeat each first index, then add 0..len-1 within each response.
    before = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)  # (T,) tokens of earlier responses
    targets = torch.repeat_interleave(first, lengths) + torch.arange(int(lengths.sum())) - before
    owners = torch.repeat_interleave(torch.arange(len(responses)), lengths)
    return PackedResponses(packed.input_ids, packed.position_ids, targets, owners, lengths)


def packed_forward_inputs(config: HFConfig, input_ids: torch.Tensor, position_ids: torch.Tensor, *,
                          dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The input ids (R', P') and the keyword arguments (position ids, and an attention mask or none)
    of a forward over packed rows (R, P), for the model of this transformers config.

    flash_attention_2 gets the rows as one row (1, R * P): its varlen path reads the sequence
    boundaries from the position ids of a batch of one only; the restarts at each row's start and
    at its padding keep the sequences apart. (Not run here: no GPU; the CPU paths are tested.)
    eager and sdpa keep R rows (their dense mask costs P^2 a row, not (R * P)^2) and get no mask,
    transformers building the block-diagonal one from the position ids, except for
    EXPLICIT_MASK_ARCHITECTURES, which get it built here by transformers' own function.
    """
    if getattr(config, "_attn_implementation", None) == "flash_attention_2":
        return input_ids.reshape(1, -1), {"position_ids": position_ids.reshape(1, -1)}
    inputs = {"position_ids": position_ids}
    if config.model_type in EXPLICIT_MASK_ARCHITECTURES:
        from transformers.masking_utils import create_causal_mask

        # inputs_embeds only gives the mask its shape, dtype and device.
        shape_only = torch.empty((*position_ids.shape, 0), dtype=dtype, device=position_ids.device)  # (R, P, 0)
        inputs["attention_mask"] = create_causal_mask(config=config, inputs_embeds=shape_only, attention_mask=None, cache=None,
                                                      position_ids=position_ids)
    return input_ids, inputs


def check_packing_supported(config: HFConfig, *, key: str = "data.packing") -> None:
    """Refuse packing, in one line, for a model (its transformers config) whose packed forward is not
    known to equal the unpacked one."""
    attention = getattr(config, "_attn_implementation", None)
    if config.model_type not in PACKING_ARCHITECTURES:
        raise UserError(f"{key}=true is not checked for model_type '{config.model_type}' (checked: "
                        f"{', '.join(sorted(PACKING_ARCHITECTURES))}); set {key}=false")
    if attention not in PACKING_ATTENTION:
        raise UserError(f"{key}=true needs model.attn_implementation in {sorted(PACKING_ATTENTION)}, not '{attention}'; "
                        f"set {key}=false")
