"""The verifiable chat task (`rlhf.chat_task`): write its data, or measure a model's exact-answer rate.

    python scripts/chat_task.py write FOLDER [--train-size 256] [--eval-size 32] [--seed 0]
    python scripts/chat_task.py score MODEL FOLDER [--max-new-tokens 16]

`write` puts demonstrations-, comparisons- and prompts-{train,eval}.jsonl (chat `messages` form)
into FOLDER for `rlhf sft`, `rlhf rm` and `rlhf ppo`. `score` answers FOLDER's held-out questions
greedily with MODEL (a save_pretrained folder, e.g. a registry entry's `path`, or a `.gguf` file)
and prints the share answered exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf.chat_task import exact_answer_rate, write_task


def score(model_path: str, folder: Path, max_new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.rollout import generate

    if model_path.endswith(".gguf"):
        from rlhf.gguf import ensure_converted
        from rlhf.registry import default_root

        model_path = str(ensure_converted(model_path, default_root()))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    rows = [json.loads(line) for line in (folder / "prompts-eval.jsonl").read_text().splitlines()]
    prompts = [list(tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True)["input_ids"])
               for r in rows]
    with torch.no_grad():
        replies = generate(model, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                           max_new_tokens=max_new_tokens, temperature=0.0)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
    return exact_answer_rate(texts, [r["answer"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write")
    w.add_argument("folder", type=Path)
    w.add_argument("--train-size", type=int, default=256)
    w.add_argument("--eval-size", type=int, default=32)
    w.add_argument("--seed", type=int, default=0)
    s = commands.add_parser("score")
    s.add_argument("model")
    s.add_argument("folder", type=Path)
    s.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.command == "write":
        for name, path in write_task(args.folder, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed).items():
            print(f"{name}: {path}")
    else:
        print(f"exact-answer rate: {score(args.model, args.folder, args.max_new_tokens):.3f}")


if __name__ == "__main__":
    main()
