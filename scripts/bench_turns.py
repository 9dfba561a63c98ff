"""Multi-turn rollouts with turns ended in generation at their stop strings (rlhf/rollouts/stops.py) against
the way before: each turn generated to its budget (or every row's EOS) and cut after its first stop string.

    OMP_NUM_THREADS=1 python scripts/bench_turns.py [--rounds 5] [--batch 64] [--max-new-tokens 8] [--max-turns 3]

`sample_episodes` on the embedded default's toy model (random init, seed 0) and the toy task's train prompts,
with ToyRetryEnv (a wrong sum is asked again) whose turns end at their first digit, a stand-in for a tool call's
"</tool>" that the random toy samples about one token in ten. The two ways take turns, one round each on the
same prompts and seed. Per rollout (one sample_episodes call) and way: generated token positions (rows x
decoding steps, the forwards' rows: a finished row still takes a position until the batch ends), kept policy
tokens, and the median wall time over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rlhf.rollouts.multiturn as multiturn
from rlhf.rollouts.generation import Sampling, generate
from rlhf.rollouts.stops import generate_turns
from rlhf.tasks.envs import ToyRetryEnv
from rlhf.toy import ToyModelConfig, build_model, build_tokenizer
from rlhf.toy.task import ToyTask, ToyTaskConfig


class DigitStopEnv(ToyRetryEnv):
    stop_strings = tuple("0123456789")


def cut_after(model, prompts, sampling, *, tokenizer, stops, budgets=None):
    """The way before: generate to the budget, then cut after the first token whose prefix holds a stop string."""
    turns = []
    for tokens, budget in zip(generate(model, prompts, sampling), budgets or [sampling.max_new_tokens] * len(prompts)):
        cut = next((k for k in range(1, len(tokens) + 1) if any(s in tokenizer.decode(tokens[:k]) for s in stops)), len(tokens))
        turns.append(tokens[:cut][:budget])
    return turns


def one_rollout(model, tokenizer, prompts, sampling, args, way, seed) -> tuple[int, int, float]:
    multiturn.generate_turns = way  # what sample_episodes calls each turn
    positions = [0]
    hook = model.register_forward_hook(lambda m, a, kw, out: positions.__setitem__(0, positions[0] + kw["input_ids"].shape[0]),
                                       with_kwargs=True)
    torch.manual_seed(seed)
    start = time.perf_counter()
    episodes = multiturn.sample_episodes(model, prompts, sampling, env_class=DigitStopEnv, tokenizer=tokenizer,
                                         max_turns=args.max_turns, max_tokens=2 * args.max_turns * args.max_new_tokens, per_turn=False)
    elapsed = time.perf_counter() - start
    hook.remove()
    return positions[0], int(episodes.seqs.response_mask.sum()), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-turns", type=int, default=3)
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=0).eval()
    rows = ToyTask(ToyTaskConfig()).demonstrations("train")[: args.batch]
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=args.max_new_tokens)
    ways = {"generate to the budget, cut after": cut_after, "stop in generation": generate_turns}
    results: dict[str, list[tuple[int, int, float]]] = {name: [] for name in ways}
    one_rollout(model, tokenizer, prompts, sampling, args, generate_turns, seed=0)  # warm-up
    for r in range(args.rounds):
        for name, way in ways.items():
            results[name].append(one_rollout(model, tokenizer, prompts, sampling, args, way, seed=r))
    print(f"{args.batch} episodes, up to {args.max_turns} turns of {args.max_new_tokens} tokens, {args.rounds} rounds")
    for name, rows in results.items():
        positions, kept, seconds = zip(*rows)
        print(f"{name:>34}: {statistics.mean(positions):8.1f} generated positions, {statistics.mean(kept):7.1f} kept policy tokens, "
              f"{1000 * statistics.median(seconds):7.1f} ms per rollout (median)")


if __name__ == "__main__":
    main()
