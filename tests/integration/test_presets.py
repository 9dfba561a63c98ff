"""The shipped presets (configs/*opt*, configs/*llama-7b-lora*) run as written, at tiny size.

Each preset runs through the CLI with every key it sets kept (ZeRO stage, bf16, gradient
checkpointing, sdpa, LoRA and its merge on save, the cosine schedule, adaptive beta, PPO-ptx,
wandb offline, ...) and only what cannot travel overridden: the hub model becomes a tiny random
model of the same architecture, the hub data a local file with the same columns, and the lengths
and step counts shrink to a CPU's. `rlhf sft -> rm -> ppo` chain as the presets' comments say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import REPO, assert_ok, entries, metric_rows, rlhf
from tests.integration.test_architectures import tiny_model_folder

pytestmark = [pytest.mark.slow, pytest.mark.full]

# Short runs: every preset's own intervals replaced by one step, so evaluation and checkpoints happen.
# The presets' warmups (up to 100 steps) are longer than these runs, which rlhf refuses: one step of warmup.
SHORT = ("train.max_steps=2", "train.eval_every=1", "train.save_every=1", "eval.max_rows=8", "optim.warmup_steps=1")


def rm_static_like(path: Path) -> str:
    """Rows with Dahoas/rm-static's columns (prompt, response, chosen, rejected) in the toy's alphabet."""
    rows = [{"prompt": f"{a}+{b}=", "response": str(a + b), "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(10, 26) for b in (3, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def preset(name: str) -> tuple[str, dict]:
    path = REPO / "configs" / name
    return str(path), yaml.safe_load(path.read_text())


def test_opt_presets_sft_rm_ppo(tmp_path):
    home, data = tmp_path / "home", rm_static_like(tmp_path / "rm-static.jsonl")
    opt = tiny_model_folder("opt", tmp_path / "opt")
    files = {"data.train": data, "data.eval": data}
    runs = {}
    for stage, name, extra in (
        ("sft", "sft-opt-1.3b.yaml", [f"model.name_or_path={opt}"]),
        ("rm", "rm-opt-350m.yaml", [f"model.name_or_path={opt}", "eval.reward_stats_rows=16"]),
        # 256 new tokens would pass the tiny model's 128 learned positions.
        ("ppo", "ppo-opt-1.3b.yaml", [f"data.ptx={data}", "rollout.max_new_tokens=8", "data.ptx_max_length=32",
                                        "critic_optim.warmup_steps=1"]),
    ):
        config, written = preset(name)
        result = rlhf(stage, "-c", config, *(f"{k}={v}" for k, v in files.items()), *extra, *SHORT, home=home, timeout=900)
        assert_ok(result)
        [runs[stage]] = [e for e in entries(home) if e["stage"] == stage]
        assert_preset_kept(runs[stage]["config"], written, overridden={*files, *(e.split("=")[0] for e in extra)})
    ppo_rows = [r for r in metric_rows(runs["ppo"]) if "policy_loss" in r]
    assert all(r["ptx_loss"] > 0 for r in ppo_rows)  # PPO-ptx on, as the preset sets
    assert set(runs["ppo"]["parents"]) >= {runs["sft"]["id"], runs["rm"]["id"]}  # sft:latest and rm:latest
    for run in runs.values():  # wandb on, offline: its run folder is written beside the metrics
        assert any(Path(run["run_dir"]).glob("wandb/*run-*")), run["run_dir"]


def test_llama_7b_lora_preset(tmp_path):
    home, data = tmp_path / "home", rm_static_like(tmp_path / "rm-static.jsonl")
    llama = tiny_model_folder("llama", tmp_path / "llama")
    config, written = preset("sft-llama-7b-lora.yaml")
    overrides = {"model.name_or_path": str(llama), "data.train": data, "data.eval": data}
    result = rlhf("sft", "-c", config, *(f"{k}={v}" for k, v in overrides.items()), *SHORT, home=home, timeout=900)
    assert_ok(result)
    [entry] = entries(home)
    assert_preset_kept(entry["config"], written, overridden=set(overrides))
    # ZeRO-3 partitions and LoRA adapters merged on save: a plain Llama folder, no adapter files.
    folder = Path(entry["path"])
    assert (folder / "config.json").is_file() and not (folder / "adapter_config.json").exists()


def assert_preset_kept(used: dict, written: dict, *, overridden: set[str], prefix: str = "") -> None:
    """Every key the preset sets has the preset's value in the run's config, unless overridden."""
    for key, value in written.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            assert_preset_kept(used[key], value, overridden=overridden, prefix=f"{dotted}.")
        elif dotted not in overridden and dotted not in {s.split("=")[0] for s in SHORT}:
            # PyYAML reads 2e-4 (no dot) as a string; the stage's config reads it as the float it is.
            expected = float(value) if isinstance(used[key], float) else value
            assert used[key] == expected, (dotted, used[key], value)
