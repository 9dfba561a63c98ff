"""`rlhf sft` end to end through the CLI and the real DeepSpeed launcher, on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import (
    ONE_PROCESS,
    QUICK,
    RLHF,
    assert_ok,
    cli_env,
    entries,
    metric_rows,
    resume_and_check,
    rlhf,
)

pytestmark = pytest.mark.slow


def logged_losses(entry: dict) -> list[float]:
    return [row["loss"] for row in metric_rows(entry) if "loss" in row]


def assert_learned(entry: dict) -> None:
    # Every stage reports the pre-clipping gradient norm (ZeRO-0 included, where DeepSpeed drops it).
    norms = [row["grad_norm"] for row in metric_rows(entry) if "loss" in row]
    assert norms and all(n > 0 and n == n for n in norms), norms
    losses = logged_losses(entry)
    assert losses[-1] < 0.8 * losses[0], losses
    metrics = entry["metrics"]
    # The untrained model almost never writes a sum; the trained one gets many digits right.
    assert metrics["oracle_score"] > metrics["initial_oracle_score"] + 10, metrics
    assert metrics["loss"] < metrics["initial_loss"] - 1.0, metrics


def assert_loads_with_transformers(entry: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(entry["path"])
    tokenizer = AutoTokenizer.from_pretrained(entry["path"])
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_help_lists_the_stage_commands(home):
    result = rlhf("--help", home=home)
    assert_ok(result)
    for command in ("sft", "registry", "config"):
        assert command in result.stdout


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> tuple[Path, dict]:
    """A 1-rank run of the quick config: 32 sequences per step, like the 2-rank runs' 2 x 16."""
    home = tmp_path_factory.mktemp("one_rank")
    result = rlhf("sft", *ONE_PROCESS, "-c", QUICK, "train.max_steps=80", "tracking.wandb=true", "run.tags=first", home=home)
    assert_ok(result)
    [entry] = entries(home)
    return home, entry


def test_one_rank_learns_and_registers_with_wandb_offline(one_rank):
    home, entry = one_rank
    assert entry["stage"] == "sft" and entry["status"] == "completed" and entry["tags"] == ["first"]
    assert entry["parents"] == [] and entry["base_model"].startswith("toy-llama")
    assert_learned(entry)
    assert_loads_with_transformers(entry)
    run_dir = Path(entry["run_dir"])
    assert (run_dir / "config.yaml").is_file()
    # wandb ran offline (no network here) and wrote its run folder inside the run.
    assert list((run_dir / "wandb").glob("offline-run-*")), list(run_dir.rglob("*"))[:20]


def deepspeed_shared_memory_buffers() -> set[str]:
    return {path.name for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


# ZeRO-3 only: two-rank ZeRO-2 engines run in the ppo tests, and stage 3 partitions more.
@pytest.mark.parametrize("zero_stage", [3])
def test_two_ranks_learn_under_zero(home, one_rank, zero_stage):
    shared_memory_before = deepspeed_shared_memory_buffers()
    result = rlhf("sft", "-n", "2", "-c", QUICK, f"engine.zero_stage={zero_stage}", "engine.micro_batch_size=16",
                  "train.max_steps=80", home=home)
    assert_ok(result)
    # DeepSpeed's CPU shared-memory all-reduce never unlinks its 69 MB per-rank buffer; the stages
    # keep it off, or a few hundred runs fill the machine's memory.
    assert deepspeed_shared_memory_buffers() <= shared_memory_before
    [entry] = entries(home)
    assert entry["config"]["engine"]["zero_stage"] == zero_stage
    assert_learned(entry)
    assert_loads_with_transformers(entry)
    # The loss is a mean over the global batch's tokens, so splitting the same 32 sequences over
    # two ranks (and partitioning the optimizer) must not change the training curve.
    baseline = logged_losses(one_rank[1])
    assert logged_losses(entry) == pytest.approx(baseline, rel=2e-3)
    # Gathered ZeRO shards are saved under exactly the keys an unpartitioned save writes.
    from safetensors import safe_open

    def saved_keys(e: dict) -> set[str]:
        with safe_open(str(Path(e["path"]) / "model.safetensors"), "pt") as f:
            return set(f.keys())

    assert saved_keys(entry) == saved_keys(one_rank[1])
    if zero_stage == 3:
        # A second run starts from the first by reference: the registry records the lineage.
        # (One rank: the start from a ZeRO-3 save is the subject, not the launch.)
        follow = rlhf("sft", *ONE_PROCESS, "-c", QUICK, "engine.zero_stage=3", "model.name_or_path=sft:latest",
                      "train.max_steps=10", "data.eval=null", home=home)
        assert_ok(follow)
        first, second = entries(home)
        assert second["parents"] == [first["id"]]
        assert second["base_model"] == first["base_model"]
        shown = rlhf("registry", "show", "sft:latest", home=home)
        assert_ok(shown)
        assert first["id"] in shown.stdout and second["id"] in shown.stdout


@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_lora_run_saves_merged_or_adapter(home, save):
    # With gradient checkpointing too: frozen embeddings must still let gradients reach the adapters.
    result = rlhf("sft", *ONE_PROCESS, "-c", QUICK, "model.lora.enabled=true", "model.lora.r=8", f"model.lora.save={save}",
                  "optim.lr=1e-2", "model.gradient_checkpointing=true", "train.max_steps=30", "data.eval=null",
                  home=home)
    assert_ok(result)
    [entry] = entries(home)
    assert entry["adapter"] == save
    from transformers import AutoModelForCausalLM

    from rlhf.toy import ToyModelConfig, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    initial = build_model(ToyModelConfig(), tokenizer, seed=42)
    name = "model.layers.0.self_attn.q_proj.weight"
    if save == "merged":
        assert_loads_with_transformers(entry)
        # Merging folded trained deltas into the weights: they differ from the initial model
        # where adapters were trained, and equal it where none were.
        merged = AutoModelForCausalLM.from_pretrained(entry["path"]).state_dict()
        assert not torch.allclose(merged[name], initial.state_dict()[name])
        assert torch.equal(merged["model.embed_tokens.weight"], initial.state_dict()["model.embed_tokens.weight"])
    else:
        from peft import PeftModel

        # The adapter applies to the same base (the toy model's seed-42 init) and changes its outputs.
        ids = tokenizer("12+34=", return_tensors="pt").input_ids
        before = initial(ids).logits
        adapted = PeftModel.from_pretrained(initial, entry["path"])
        assert (adapted(ids).logits - before).abs().max() > 1e-3


# The offload paths on one rank in `make test`; the same on two ranks in `make test-full`.
@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.full)])
def test_zero3_with_optimizer_and_parameter_offload(home, ranks):
    launch = ONE_PROCESS if ranks == 1 else ("-n", "2", "engine.micro_batch_size=16")
    result = rlhf("sft", *launch, "-c", QUICK, "engine.zero_stage=3", "engine.offload_optimizer=true",
                  "engine.offload_params=true", "train.max_steps=24", "train.log_every=4", "data.eval=null",
                  "eval.max_rows=16", home=home)
    assert_ok(result)
    [entry] = entries(home)
    losses = logged_losses(entry)
    assert losses[-1] < 0.8 * losses[0], losses
    assert_loads_with_transformers(entry)


def test_sigterm_saves_where_the_run_is_and_resume_continues_there(home):
    """What a cluster sends on preemption, to every process of the job: the ranks finish the step in
    flight, checkpoint it (no periodic checkpoint is due), and exit 143; `--resume` continues there.
    (A SIGKILLed run resuming from its last periodic checkpoint is tested in the ppo tests.)"""
    proc = subprocess.Popen(
        [RLHF, "sft", "-c", QUICK, "train.max_steps=400", "train.save_every=0", "train.eval_every=0",
         "train.log_every=1", "data.eval=null"],
        env=cli_env(home), cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not [row for row in _rows(home) if row.get("step", 0) >= 20]:
            assert time.time() < deadline and proc.poll() is None, "the run ended before it could be stopped"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        # The CLI dies at once; the ranks finish their step and save, so wait for the whole group.
        deadline = time.time() + 120
        while proc.poll() is None or _group_alive(proc.pid):  # poll() reaps the CLI, a zombie in the group
            assert time.time() < deadline, "the ranks did not stop within 120 s of SIGTERM"
            time.sleep(0.2)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    [run_dir] = list((home / "runs").iterdir())
    stopped_at = json.loads((run_dir / "checkpoints" / "resume.json").read_text())["step"]
    assert 20 <= stopped_at < 400
    entry = resume_and_check("sft", run_dir, home=home, max_steps=400)
    assert_loads_with_transformers(entry)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _rows(home: Path) -> list[dict]:
    return [json.loads(line) for path in home.glob("runs/*/metrics.jsonl")
            for line in path.read_text().splitlines() if line.endswith("}")]


# What DeepSpeed's launcher says on every start, none of it actionable on one machine.
LAUNCHER_CHATTER = ("Unable to find hostfile", "[INFO] [launch.py", "Setting CUDA_VISIBLE_DEVICES")


def test_library_chatter_shows_only_with_verbose(home):
    # The DeepSpeed launcher (its chatter is the subject), one short step, no evaluation.
    short = ("-c", QUICK, "train.max_steps=1", "optim.warmup_steps=0", "train.eval_every=0", "data.eval=null")
    # A fresh interpreter: what a user sees includes what the libraries say when first imported.
    quiet = rlhf("sft", *short, home=home, fresh_interpreter=True)
    assert_ok(quiet)
    assert "sft finished" in quiet.stdout  # our own lines stay
    # The last step's line once, then the final evaluation labeled as such (the oracle's score: no
    # eval data), not a second `step 1/1` line.
    lines = quiet.stdout.splitlines()
    [step_line] = [i for i, line in enumerate(lines) if line.startswith("step 1/1")]
    [final_line] = [i for i, line in enumerate(lines) if line.startswith("final  ")]
    assert step_line < final_line and lines[final_line].startswith("final  eval/oracle_score="), quiet.stdout
    assert not [line for line in quiet.output.splitlines() if any(c in line for c in LAUNCHER_CHATTER)], quiet.output
    assert "FutureWarning" not in quiet.output
    loud = rlhf("sft", "-v", *short, home=home, fresh_interpreter=True)
    assert_ok(loud)
    assert all(c in loud.output for c in LAUNCHER_CHATTER), loud.output
