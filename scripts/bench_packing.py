"""SFT tokens/s with data.packing on and off, on rows of widely varied length (issue 31).

    OMP_NUM_THREADS=1 python scripts/bench_packing.py [--rounds 4] [--steps 2] [--attention sdpa]

Times the stage's own micro-batch step (rlhf.stages.sft.micro_batch_loss, backward, AdamW) on a
small random Llama (4 layers, hidden 256) in fp32, micro-batches of 16 rows whose lengths are
uniform in 16..512 (data.max_length 512). Packed and unpacked take turns, one round each, on the
same batches; each side's figure is the median over rounds of real (non-pad) tokens per second.
On the CPU the packed rows' attention is a dense block-diagonal mask over each packed row, so the
gain is the padding's share of the MLP and projections, less the larger attention per row.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from rlhf.data.tokenize import SFTExample
from rlhf.stages.sft import micro_batch_loss

MAX_LENGTH, MICRO_BATCH, VOCAB = 512, 16, 4096


def rows(rng: random.Random, n: int) -> list[SFTExample]:
    out = []
    for _ in range(n):
        length = rng.randint(16, MAX_LENGTH)
        prompt = rng.randint(1, length // 2)
        out.append(SFTExample([rng.randrange(3, VOCAB) for _ in range(length)], [t >= prompt for t in range(length)]))
    return out


def timed_round(model, optimizer, batches, *, packing_tokens: int | None) -> float:
    """Real tokens per second over the batches (one optimizer step each)."""
    start, tokens = time.perf_counter(), 0
    for batch in batches:
        num_targets = float(sum(r.num_targets for r in batch))
        loss, real = micro_batch_loss(model, batch, pad_id=0, packing_tokens=packing_tokens, num_tokens=num_targets,
                                      device=torch.device("cpu"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += real
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="micro-batches per round")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=MAX_LENGTH, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attention).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rng = random.Random(0)
    batches = [rows(rng, MICRO_BATCH) for _ in range(args.steps)]
    real = sum(len(r.input_ids) for b in batches for r in b)
    padded = sum(MICRO_BATCH * max(len(r.input_ids) for r in b) for b in batches)
    timed_round(model, optimizer, batches[:1], packing_tokens=None)  # warm-up
    timed_round(model, optimizer, batches[:1], packing_tokens=MAX_LENGTH)
    results: dict[str, list[float]] = {"unpacked": [], "packed": []}
    for _ in range(args.rounds):
        results["unpacked"].append(timed_round(model, optimizer, batches, packing_tokens=None))
        results["packed"].append(timed_round(model, optimizer, batches, packing_tokens=MAX_LENGTH))
    unpacked, packed = statistics.median(results["unpacked"]), statistics.median(results["packed"])
    print(f"attention={args.attention} threads={torch.get_num_threads()} rows/batch={MICRO_BATCH} lengths 16..{MAX_LENGTH}: "
          f"{real} real tokens in {padded} padded slots ({1 - real / padded:.0%} padding)")
    print(f"unpacked {unpacked:.0f} tokens/s, packed {packed:.0f} tokens/s, packed/unpacked {packed / unpacked:.2f}x "
          f"(median of {args.rounds} rounds of {args.steps} steps)")


if __name__ == "__main__":
    main()
