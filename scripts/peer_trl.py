"""The peer comparison of issue 16: `rlhf ppo` against TRL's PPOTrainer (trl 1.12.0,
`trl.experimental.ppo`) on the same SFT policy, reward model, value model (the RM's backbone with a
zero head), prompts and settings, one rank, runs alternating round by round:

  rlhf      `rlhf ppo --launcher python` (one process, the stage as users run it);
  trl       TRL's PPOTrainer as shipped;
  trl-nogc  the same with the two `gc.collect()` calls of each TRL step made no-ops (only the name
            TRL's PPO module calls is replaced); its final weights must equal trl's bit for bit.

TRL's phases are timed by wrapping the functions its loop calls (nothing of TRL is edited). Every
final policy is then scored the same way, by rlhf's own evaluation functions: the oracle's sampled
and greedy score on the held-out prompts, and the KL to the SFT policy per held-out response.
Prints a Markdown table and writes one JSON line per run (with the command) to --out/results.jsonl.

Runs in its own venv, never ours: `make peer-bench PEER_ARGS="--sft sft:latest --rm rm:latest"`
(the SFT and RM entries of the embedded default, e.g. from `rlhf pipeline --stages sft,rm`).

`--task chat --data TASK` runs the same comparison on a real chat model: the verifiable chat task
(`scripts/chat_task.py write TASK`) with its SFT and RM entries (SmolLM2-135M-Instruct, e.g. from
`scripts/chat_task.py run`), 16 rollouts of up to 16 tokens a step, and the task's grader (the
exact-answer rate of 4 sampled and of the greedy reply per held-out question) in place of the
toy's oracle. `--lora` trains LoRA adapters on the policy in both (TRL's `peft_config`; the
reference is the policy with its adapters off, the value model stays whole, as TRL runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

from rlhf.config import PPOConfig, kl_estimator_of, load_config
from rlhf.errors import UserError

VARIANTS = ("rlhf", "trl", "trl-nogc")
# Issue 16's PPO settings as our config keys, the same on both tasks; max steps, models, seed and
# registry come from the command line.
PPO_SETTINGS = (
    "rollout.samples_per_prompt=1", "engine.grad_accum=1", "ppo.beta=0.05", "ppo.kl_estimator=k1", "ppo.kl_in=reward",
    "ppo.clip_range=0.2", "ppo.value_clip_range=0.2", "ppo.gamma=1.0", "ppo.lam=0.95", "ppo.whiten_advantages=true",
    "ppo.whiten_rewards=false", "ppo.value_head=zero", "ppo.estimator=gae", "engine.precision=fp32", "engine.zero_stage=0",
    "train.eval_every=0", "train.save_every=0",
)
# Sizes per task: the toy's are the issue's; the chat task's are the README's chat-task PPO (sized
# for 2 CPU cores), with one learning rate for both models since TRL steps one optimizer.
TASK_SETTINGS = {
    "toy": ("rollout.batch_size=64", "rollout.max_new_tokens=8", "ppo.epochs=4", "engine.micro_batch_size=32"),
    "chat": ("data.train={data}/prompts-train.jsonl", "data.eval={data}/prompts-eval.jsonl", "data.max_prompt_length=96",
             "rollout.batch_size=16", "rollout.max_new_tokens=16", "ppo.epochs=2", "engine.micro_batch_size=8",
             "optim.warmup_steps=2", "critic_optim.warmup_steps=2"),
}
CHAT_LR = {"full": 1e-5, "lora": 1e-4}  # a LoRA adapter needs about 10x the rate of full fine-tuning


def bench_overrides(*, sft: str, rm: str, steps: int, seed: int, registry: str, task: str = "toy", data: str = "",
                    lora: bool = False) -> list[str]:
    """The `rlhf ppo` overrides of one benchmark run (TRL's settings are translated from the same config)."""
    if task == "chat" and not data:
        raise UserError("--data: the chat task needs its folder (scripts/chat_task.py write FOLDER)")
    sized = [o.format(data=data) for o in TASK_SETTINGS[task]]
    if task == "chat":
        lr = CHAT_LR["lora" if lora else "full"]
        sized += [f"optim.lr={lr}", f"critic_optim.lr={lr}"]
    return [*PPO_SETTINGS, *sized, f"model.lora.enabled={str(lora).lower()}", f"model.name_or_path={sft}",
            f"critic.name_or_path={rm}", f"reward.name_or_path={rm}", f"train.max_steps={steps}", f"train.seed={seed}",
            f"run.registry={registry}"]


def trl_settings(cfg: PPOConfig) -> dict[str, Any]:
    """TRL PPOConfig fields for the run `cfg` describes; one line naming the key when TRL cannot
    express it. Where the two differ by design the value chosen is the closest (see BENCHMARKS.md):
    TRL steps one optimizer and one LR schedule per PPO step over both models, so warmup is
    counted in PPO steps; it subtracts missing_eos_penalty from the score instead of replacing it."""
    ppo, rollout, optim = cfg.ppo, cfg.rollout, cfg.optim
    refuse = {
        "ppo.estimator": (ppo.estimator != "gae", "gae"), "ppo.kl_in": (ppo.kl_in != "reward", "reward"),
        "rollout.samples_per_prompt": (rollout.samples_per_prompt != 1, "1"), "engine.grad_accum": (cfg.engine.grad_accum != 1, "1"),
        "ppo.whiten_advantages": (not ppo.whiten_advantages, "true (TRL always whitens)"),
        "ppo.value_clip_range": (ppo.value_clip_range is None, "a number (TRL always clips values)"),
        "ppo.kl_target": (ppo.kl_target is not None, "null (TRL's beta is fixed)"),
        "ppo.ptx_coef": (ppo.ptx_coef != 0, "0"), "optim.lr": (optim.lr != cfg.critic_optim.lr, "critic_optim.lr (one optimizer)"),
        "ppo.kl_estimator": (kl_estimator_of(ppo) not in ("k1", "k3"), "k1 or k3"),
        "critic.lora.enabled": (cfg.critic.lora.enabled, "false (TRL's peft_config adapts the policy only)"),
    }
    for key, (bad, fix) in refuse.items():
        if bad:
            raise UserError(f"{key}: TRL's PPOTrainer cannot run this setting; set it to {fix} for the peer comparison")
    updates_per_step = ppo.epochs * (rollout.batch_size // cfg.engine.micro_batch_size)
    return {
        "per_device_train_batch_size": rollout.batch_size, "gradient_accumulation_steps": 1,
        "num_mini_batches": rollout.batch_size // cfg.engine.micro_batch_size, "num_ppo_epochs": ppo.epochs,
        "local_rollout_forward_batch_size": rollout.batch_size, "total_episodes": cfg.train.max_steps * rollout.batch_size,
        "response_length": rollout.max_new_tokens, "temperature": rollout.temperature, "stop_token": "eos",
        "kl_coef": ppo.beta, "kl_estimator": kl_estimator_of(ppo), "cliprange": ppo.clip_range,
        "cliprange_value": ppo.value_clip_range, "vf_coef": 1.0, "gamma": ppo.gamma, "lam": ppo.lam,
        "whiten_rewards": ppo.whiten_rewards,
        "missing_eos_penalty": None if ppo.no_eos_score is None else -ppo.no_eos_score,
        "learning_rate": optim.lr, "adam_beta1": optim.beta1, "adam_beta2": optim.beta2, "adam_epsilon": optim.eps,
        "weight_decay": optim.weight_decay, "lr_scheduler_type": optim.schedule,
        "warmup_steps": round(optim.warmup_steps / updates_per_step), "max_grad_norm": optim.grad_clip,
        "seed": cfg.train.seed, "num_sample_generations": 0, "save_strategy": "no", "report_to": [],
        "use_cpu": True, "bf16": False, "fp16": False, "disable_tqdm": True, "logging_steps": 1,
    }


# ---------------------------------------------------------------- one TRL run (a child process)

class PhaseClock:
    """Per-step phase boundaries of TRL's loop, from wrappers around the functions it calls:
    generate = batch_generation; score = from there to the first forward with gradients (old
    log-probs from the generation logits, reference, values, rewards, GAE); train = from there
    to the last optimizer.zero_grad. backward_step sums accelerator.backward and optimizer.step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.backward_step_s = 0.0

    def install(self, module: Any, trainer: Any) -> None:
        import torch

        generate, forward = module.batch_generation, module.forward

        def timed_generation(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = generate(*args, **kwargs)
            self.steps.append({"gen_start": started, "gen_end": time.perf_counter()})
            return out

        def timed_forward(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() and "train_start" not in self.steps[-1]:
                self.steps[-1]["train_start"] = time.perf_counter()
            return forward(*args, **kwargs)

        module.batch_generation, module.forward = timed_generation, timed_forward
        trainer.accelerator.backward = self._summed(trainer.accelerator.backward)
        trainer.optimizer.step = self._summed(trainer.optimizer.step)
        zero_grad = trainer.optimizer.zero_grad

        def marked_zero_grad(*args: Any, **kwargs: Any) -> Any:
            out = zero_grad(*args, **kwargs)
            self.steps[-1]["train_end"] = time.perf_counter()
            return out

        trainer.optimizer.zero_grad = marked_zero_grad

    def _summed(self, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            self.backward_step_s += time.perf_counter() - started
            return out
        return wrapper

    def totals(self) -> dict[str, float]:
        s = self.steps
        return {"generate_s": sum(p["gen_end"] - p["gen_start"] for p in s),
                "score_s": sum(p["train_start"] - p["gen_end"] for p in s),
                "train_s": sum(p["train_end"] - p["train_start"] for p in s), "backward_step_s": self.backward_step_s}


def normalized_reward_head(model: Any, *, mean: float, std: float) -> None:
    """Fold PPO's score normalization (s - mean) / std into the reward model's bias-free head, so
    TRL, which reads the head directly, sees the normalized score `rlhf ppo` uses."""
    import torch

    old = model.score
    head = torch.nn.Linear(old.in_features, 1, bias=True, dtype=old.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(old.weight / std)
        head.bias.fill_(-mean / std)
    model.score = head


def trl_models(cfg: PPOConfig) -> dict[str, Any]:
    """The models and the tokenizer, loaded by rlhf's own loaders from the same entries `rlhf ppo`
    uses: TRL's value model is the critic `rlhf ppo` starts from (RM backbone, zero head). With
    LoRA the policy is loaded whole and `peft_config` carries our adapter settings (TRL wraps the
    policy itself and takes the reference as the policy with its adapters off)."""
    import torch

    from rlhf.models.loading import disable_dropout, load_causal_lm, load_scalar_model, peft_lora_config
    from rlhf.models.sources import causal_lm_and_tokenizer, ppo_sources, reward_stats
    from rlhf.models.stage_models import frozen_model_config, load_critic
    from rlhf.store.registry import Registry

    registry = Registry(Path(cfg.run.registry))
    actor_source, tokenizer = causal_lm_and_tokenizer(cfg.model, registry)
    sources = ppo_sources(cfg, registry, actor_source, tokenizer)
    seed, dtype = cfg.train.seed, torch.float32
    lora = cfg.model.lora
    whole = dataclasses.replace(cfg.model, lora=dataclasses.replace(lora, enabled=False))
    policy = load_causal_lm(actor_source, whole, tokenizer, seed=seed, dtype=dtype)
    reference = None if lora.enabled else load_causal_lm(actor_source, frozen_model_config(cfg, "reference"), tokenizer,
                                                         seed=seed, dtype=dtype)
    reward = load_scalar_model(sources.reward, frozen_model_config(cfg, "reward"), tokenizer, seed=seed, dtype=dtype,
                               trained_head=True).hf_model
    if cfg.ppo.normalize_score:
        normalized_reward_head(reward, **reward_stats(sources.reward))
    value = load_critic(cfg, sources.critic, tokenizer, dtype=dtype).hf_model
    for model in (policy, reference, reward, value):
        if model is not None:
            disable_dropout(model)
    tokenizer.padding_side = "left"  # TRL's collator pads the queries it generates from
    distinct_pad_token(tokenizer)
    return {"policy": policy, "reference": reference, "reward": reward, "value": value, "tokenizer": tokenizer,
            "peft_config": peft_lora_config(lora) if lora.enabled else None}


def distinct_pad_token(tokenizer: Any) -> None:
    """TRL builds every attention mask as `ids != pad_token_id`. A chat model whose pad token is its
    EOS (SmolLM2's `<|im_end|>`) would then have each turn's closing `<|im_end|>` in the prompts
    masked out, and the reward read one token before the reply's EOS; so TRL gets another special
    token that no prompt or reply holds as its pad (the same ids go in, only padding changes)."""
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    spare = [t for t in (tokenizer.bos_token, tokenizer.unk_token) if t is not None and t != tokenizer.eos_token]
    if not spare:
        raise UserError("the tokenizer's pad token is its EOS and it has no other special token TRL could pad with")
    tokenizer.pad_token = spare[0]


def run_trl(cfg: PPOConfig, out: Path, *, collect_garbage: bool) -> dict[str, Any]:
    """One TRL PPOTrainer run; saves the final policy (adapters merged) and value model under `out`
    and returns its timings."""
    import transformers
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig as TRLConfig
    from trl.experimental.ppo import PPOTrainer

    from rlhf.data.load import stage_datasets

    transformers.set_seed(cfg.train.seed)
    m = trl_models(cfg)
    train_prompts, _, eval_prompts, _ = stage_datasets("ppo", cfg, m["tokenizer"], world_size=1)
    if not collect_garbage:  # only the name TRL's PPO module calls; gc itself is untouched
        trl_ppo.gc = types.SimpleNamespace(collect=lambda generation=2: 0)
    trainer = PPOTrainer(args=TRLConfig(output_dir=str(out / "trl"), **trl_settings(cfg)), processing_class=m["tokenizer"],
                         model=m["policy"], ref_model=m["reference"], reward_model=m["reward"], value_model=m["value"],
                         train_dataset=Dataset.from_dict({"input_ids": train_prompts}),
                         eval_dataset=Dataset.from_dict({"input_ids": eval_prompts[:64]}), peft_config=m["peft_config"])
    clock = PhaseClock()
    clock.install(trl_ppo, trainer)
    started = time.perf_counter()
    trainer.train()
    loop_s = time.perf_counter() - started
    policy = trainer.policy_model.merge_and_unload() if m["peft_config"] else trainer.policy_model
    policy.save_pretrained(out / "policy", safe_serialization=True)
    m["tokenizer"].save_pretrained(out / "policy")
    m["value"].save_pretrained(out / "value", safe_serialization=True)
    return {"loop_s": loop_s, "steps": len(clock.steps), **clock.totals(), "policy": str(out / "policy"),
            "optimizer": f"{trainer.args.optim} ({type(trainer.optimizer.optimizer).__name__}, both models)"}


# ---------------------------------------------------------------- one rlhf run (a subprocess)

def run_rlhf(overrides: list[str], *, tag: str, env: dict[str, str]) -> dict[str, Any]:
    """`rlhf ppo` on one rank as users run it; its loop time and phases from its metrics.jsonl."""
    from rlhf.store.registry import Registry

    rlhf_cli = Path(sys.executable).with_name("rlhf")
    command = [str(rlhf_cli), "ppo", "--launcher", "python", *overrides, f"run.tags={tag}"]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    registry = dict(o.split("=", 1) for o in overrides)["run.registry"]
    entry = Registry(Path(registry)).resolve(f"ppo:{tag}")
    rows = [json.loads(line) for line in (Path(entry.run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "time_train_s" in r]
    baseline = next(r for r in rows if r["step"] == 0)  # logged just before the first step
    return {"loop_s": steps[-1]["time"] - baseline["time"], "steps": len(steps),
            "generate_s": sum(r["time_generate_s"] for r in steps), "score_s": sum(r["time_score_s"] for r in steps),
            "train_s": sum(r["time_train_s"] for r in steps), "policy": entry.path, "entry": entry.id,
            "own_eval": entry.metrics}


# ---------------------------------------------------------------- the same evaluation for every final policy

CHAT_SAMPLES = 4  # sampled replies per held-out question in the chat task's exact-answer rate


def evaluate_policy(cfg: PPOConfig, policy_dir: str, *, task: str = "toy") -> dict[str, float]:
    """What `rlhf ppo`'s final evaluation reports, by its own functions: the KL to the SFT policy
    summed over each sampled held-out response's tokens (k1, the mean over responses), and the
    quality of sampled and greedy responses to the held-out prompts: the toy's oracle score (0-100),
    or the chat task's exact-answer rate (its grader, `rlhf.tasks.chat.exact_reward`)."""
    import torch

    from rlhf.data.load import stage_datasets
    from rlhf.models.loading import disable_dropout, load_causal_lm
    from rlhf.models.sources import ModelSource, causal_lm_and_tokenizer
    from rlhf.models.stage_models import frozen_model_config
    from rlhf.rollouts.generation import Sampling
    from rlhf.store.registry import Registry

    sft_source, tokenizer = causal_lm_and_tokenizer(cfg.model, Registry(Path(cfg.run.registry)))
    frozen = frozen_model_config(cfg, "reference")
    reference = load_causal_lm(sft_source, frozen, tokenizer, seed=cfg.train.seed, dtype=torch.float32)
    policy = load_causal_lm(ModelSource("path", policy_dir), frozen, tokenizer, seed=cfg.train.seed, dtype=torch.float32)
    for model in (reference, policy):
        disable_dropout(model)
        model.eval()
    _, _, eval_prompts, _ = stage_datasets("ppo", cfg, tokenizer, world_size=1)
    r = cfg.rollout
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=r.max_new_tokens,
                        temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
    texts = [tokenizer.decode(p, skip_special_tokens=True) for p in eval_prompts]
    torch.manual_seed(cfg.train.seed)  # every policy is judged on the same sampling stream
    with torch.no_grad():
        if task == "chat":
            return chat_quality(policy, reference, tokenizer, eval_prompts, sampling, cfg)
        return toy_quality(policy, reference, tokenizer, eval_prompts, texts, sampling, cfg)


def sampled_kl(policy: Any, reference: Any, seqs: Any, temperature: float) -> float:
    """Summed over the batch: each sampled response's k1 KL to the reference, its tokens summed."""
    import torch

    from rlhf.rollouts.generation import policy_logprobs

    logp = policy_logprobs(policy, seqs, temperature=temperature)[0]
    ref_logp = policy_logprobs(reference, seqs, temperature=temperature)[0]
    return float(((logp - ref_logp) * seqs.response_mask).sum(dtype=torch.float64))


def toy_quality(policy: Any, reference: Any, tokenizer: Any, prompts: list, texts: list[str], sampling: Any,
                cfg: PPOConfig) -> dict[str, float]:
    import torch

    from rlhf.rollouts.generation import sample_rollout
    from rlhf.training.engine import Dist
    from rlhf.training.evaluation import oracle_eval

    kl_sum, size = 0.0, cfg.eval.batch_size
    for start in range(0, len(prompts), size):
        kl_sum += sampled_kl(policy, reference, sample_rollout(policy, prompts[start : start + size], sampling), sampling.temperature)
    oracle = oracle_eval(policy, tokenizer, texts, batch_size=size, sampling=sampling,
                         dist=Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    return {"oracle_sampled": oracle["oracle_score"], "oracle_greedy": oracle["oracle_greedy"], "kl": kl_sum / len(prompts)}


def chat_quality(policy: Any, reference: Any, tokenizer: Any, prompts: list, sampling: Any, cfg: PPOConfig) -> dict[str, float]:
    """The grader's exact-answer rate of CHAT_SAMPLES sampled replies per held-out question (the KL
    from the same samples) and of the greedy reply: the reward PPO's grader option computes."""
    from rlhf.rollouts.generation import sample_rollout
    from rlhf.rollouts.rewards import rollout_texts
    from rlhf.tasks.chat import exact_reward

    greedy = dataclasses.replace(sampling, temperature=0.0)
    exact, greedy_exact, kl_sum, size = 0.0, 0.0, 0.0, cfg.eval.batch_size
    for start in range(0, len(prompts), size):
        batch = prompts[start : start + size]
        seqs = sample_rollout(policy, batch * CHAT_SAMPLES, sampling)
        exact += sum(exact_reward(*rollout_texts(seqs, tokenizer)))
        kl_sum += sampled_kl(policy, reference, seqs, sampling.temperature)
        greedy_exact += sum(exact_reward(*rollout_texts(sample_rollout(policy, batch, greedy), tokenizer)))
    n = len(prompts)
    return {"exact_sampled": exact / (n * CHAT_SAMPLES), "exact_greedy": greedy_exact / n, "kl": kl_sum / (n * CHAT_SAMPLES)}


def identical_weights(first: str, second: str) -> bool:
    """Whether two runs' saved final policy and value model hold bit-identical tensors."""
    from safetensors.torch import load_file

    for part in ("policy", "value"):
        a, b = (load_file(str(Path(run) / part / "model.safetensors")) for run in (first, second))
        if a.keys() != b.keys() or any(not a[k].equal(b[k]) for k in a):
            return False
    return True


# ---------------------------------------------------------------- the comparison

def pinned(name: str, registry: str) -> str:
    """A registry reference as the entry id it names now (`sft:latest` must not move between runs)."""
    from rlhf.store.entry import is_reference
    from rlhf.store.registry import Registry

    if not is_reference(name):
        return name
    entry = Registry(Path(registry)).resolve(name)
    return f"{entry.stage}:{entry.id}"


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`args.rounds` rounds of rlhf, trl, trl-nogc, each run in its own process, each final policy
    evaluated alike once its run ended (outside the timings); one JSON line per run as it ends."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sft, rm = (pinned(name, args.registry) for name in (args.sft, args.rm))
    overrides = bench_overrides(sft=sft, rm=rm, steps=args.steps, seed=args.seed, registry=args.registry, task=args.task,
                                data=args.data and str(Path(args.data).resolve()), lora=args.lora)
    cfg = load_config(PPOConfig, None, overrides)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRL_EXPERIMENTAL_SILENCE": "1"}
    nonce, command = time.strftime("%Y%m%d%H%M%S"), shlex.join([Path(sys.executable).name, *sys.argv])
    results = []
    for round_no in range(1, args.rounds + 1):
        for variant in args.variants:
            print(f"round {round_no}: {variant} ...", flush=True)
            result = {"variant": variant, "round": round_no, "steps": args.steps, "sft": sft, "rm": rm, "task": args.task,
                      "lora": args.lora,
                      **one_run(variant, out / f"{variant}-r{round_no}", overrides, args, env=env, tag=f"peer-{nonce}-r{round_no}")}
            result.update(evaluate_policy(cfg, result["policy"], task=args.task))
            result["rollouts_per_s"] = args.steps * cfg.rollout.batch_size / result["loop_s"]
            if variant == "trl-nogc" and "trl" in args.variants:
                result["weights_identical_to_trl"] = identical_weights(str(out / f"trl-r{round_no}"), str(out / f"{variant}-r{round_no}"))
            results.append(result)
            with open(out / "results.jsonl", "a") as file:
                file.write(json.dumps({**result, "command": command, "versions": versions()}) + "\n")
    return results


def one_run(variant: str, run_dir: Path, overrides: list[str], args: argparse.Namespace, *, env: dict[str, str],
            tag: str) -> dict[str, Any]:
    """One timed run in a process of its own: `rlhf ppo`, or this script as a TRL child."""
    if variant == "rlhf":
        return run_rlhf(overrides, tag=tag, env=env)
    command = [sys.executable, __file__, "--child", variant, "--child-dir", str(run_dir), "--threads", str(args.threads),
               *[f"--override={o}" for o in overrides]]
    subprocess.run(command, env=env, check=True)
    return json.loads((run_dir / "result.json").read_text())


LABELS = {"rlhf": "`rlhf ppo`", "trl": "TRL PPOTrainer as shipped", "trl-nogc": "TRL, its `gc.collect()` calls made no-ops"}


def span(values: list[float], digits: int = 1) -> str:
    """'low-high' of a figure over rounds ('x' when they agree at this precision)."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


QUALITY = {"toy": ("oracle", "oracle sampled / greedy"), "chat": ("exact", "exact-answer rate sampled / greedy")}


def table(results: list[dict[str, Any]], task: str = "toy") -> str:
    """Issue 16's table: ranges over rounds, rollouts/s as the median."""
    quality, label = QUALITY[task]
    lines = [f"| | loop s | rollouts/s (median) | generate / score / train s | {label} | KL |",
             "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        rows = [r for r in results if r["variant"] == variant]
        if not rows:
            continue
        col = {k: [r[k] for r in rows] for k in rows[0] if isinstance(rows[0][k], (int, float))}
        digits = 3 if task == "chat" else 1  # a rate, or the oracle's 0-100
        lines.append(
            f"| {LABELS[variant]} | {span(col['loop_s'])} | {statistics.median(col['rollouts_per_s']):.3g} | "
            f"{span(col['generate_s'])} / {span(col['score_s'])} / {span(col['train_s'])} | "
            f"{span(col[quality + '_sampled'], digits)} / {span(col[quality + '_greedy'], digits)} | {span(col['kl'], 2)} |"
        )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "trl", "deepspeed", "accelerate", "datasets")}


def variant_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown run {unknown[0]!r}; choose from {','.join(VARIANTS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", default="sft:latest", help="the SFT policy: a registry reference or folder")
    parser.add_argument("--rm", default="rm:latest", help="the reward model (and the value model's backbone)")
    parser.add_argument("--registry", default=os.environ.get("RLHF_HOME", "rlhf_runs"), help="registry root (default $RLHF_HOME)")
    parser.add_argument("--steps", type=int, default=150, help="PPO steps of every run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three runs, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (OMP_NUM_THREADS)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="rlhf_runs/peer", help="folder of TRL's runs and results.jsonl")
    parser.add_argument("--task", choices=tuple(TASK_SETTINGS), default="toy",
                        help="toy: the embedded default; chat: the verifiable chat task in --data (a real chat model)")
    parser.add_argument("--data", default="", help="the chat task's folder (scripts/chat_task.py write FOLDER)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters on the policy (model.lora.* defaults)")
    parser.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                        help=f"comma-separated runs of each round, of {','.join(VARIANTS)} (default all)")
    parser.add_argument("--child", choices=("trl", "trl-nogc"), help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> None:
    """One TRL run in this process: its result.json in --child-dir."""
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.child_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = run_trl(load_config(PPOConfig, None, args.override), out, collect_garbage=args.child == "trl")
    (out / "result.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.child:
            child(args)
            return
        results = compare(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(table(results, args.task))
    print(f"versions: {versions()}; trl-nogc weights identical to trl: "
          f"{[r.get('weights_identical_to_trl') for r in results if r['variant'] == 'trl-nogc']}")


if __name__ == "__main__":
    main()
