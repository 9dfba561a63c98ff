"""The config loader: defaults, YAML, dotted overrides, and the errors users see."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhf.config import STAGE_CONFIGS, SFTConfig, field_docs, leaf_keys, load_config, save_config
from rlhf.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_default():
    cfg = load_config(SFTConfig)
    assert cfg.model.name_or_path == "toy"
    assert cfg.data.train == "toy"
    assert cfg.engine.zero_stage == 0


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.5\n  warmup_steps: 3\nengine:\n  zero_stage: 2\n")
    cfg = load_config(SFTConfig, path, ["optim.lr=1e-5", "engine.zero_stage=3", "run.tags=a,b", "data.eval=null"])
    assert cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.optim.warmup_steps == 3  # from the file, untouched by overrides
    assert cfg.engine.zero_stage == 3
    assert cfg.run.tags == ["a", "b"]
    assert cfg.data.eval is None


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads 1e-5 as a string; the loader must still give the float.
    cfg = load_config(SFTConfig, write(tmp_path, "optim:\n  lr: 1e-5\n"))
    assert cfg.optim.lr == pytest.approx(1e-5)


def test_unknown_key_in_file_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.1\n  lrr: 0.2\n")
    with pytest.raises(UserError) as err:
        load_config(SFTConfig, path)
    message = str(err.value)
    assert f"{path}:3" in message
    assert "'optim.lrr'" in message and "did you mean 'optim.lr'" in message
    assert "\n" not in message


def test_unknown_override_names_the_override():
    with pytest.raises(UserError, match=r"override 'engine.zero=3'.*unknown config key 'engine.zero'"):
        load_config(SFTConfig, None, ["engine.zero=3"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=fast", r"'optim.lr' expects float, got 'fast'"),
        ("train.max_steps=1.5", r"'train.max_steps' expects int"),
        ("engine.zero_stage=4", r"'engine.zero_stage' must be one of 0 \| 1 \| 2 \| 3"),
        ("tracking.wandb=maybe", r"'tracking.wandb' expects bool"),
        ("model=x", r"'model' is a section"),
        ("noequals", r"not key=value"),
    ],
)
def test_wrong_type_from_command_line(override, expected):
    with pytest.raises(UserError, match=expected):
        load_config(SFTConfig, None, [override])


def test_wrong_type_in_file_names_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  seed: 1\n  max_steps: many\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:3: 'train.max_steps' expects int, got 'many'")):
        load_config(SFTConfig, path)


def test_bool_in_file_is_not_an_int(tmp_path):
    with pytest.raises(UserError, match="expects int"):
        load_config(SFTConfig, write(tmp_path, "train:\n  max_steps: true\n"))


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"cfg.yaml:3: .*fix the YAML syntax"):
        load_config(SFTConfig, write(tmp_path, "train:\n  seed: 1\n\tmax_steps: 2\nx: 1\n"))
    with pytest.raises(UserError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")


def test_cross_field_validation():
    with pytest.raises(UserError, match="offload_params needs engine.zero_stage=3"):
        load_config(SFTConfig, None, ["engine.offload_params=true", "engine.zero_stage=2"])
    with pytest.raises(UserError, match="engine.micro_batch_size must be at least 1"):
        load_config(SFTConfig, None, ["engine.micro_batch_size=0"])


def test_configs_are_frozen():
    cfg = load_config(SFTConfig)
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(SFTConfig, None, ["optim.lr=0.25", "run.tags=x"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(SFTConfig, tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    stage = path.name.split("-")[0].removesuffix(".yaml")
    from rlhf.config import STAGE_CONFIGS

    load_config(STAGE_CONFIGS[stage], path)


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_every_config_field_is_read_somewhere(stage):
    """A key nobody reads is a lie in the docs: each leaf must be accessed as `.name` in the code."""
    sources = "\n".join(
        p.read_text() for d in ("rlhf", "stages") for p in (REPO / d).rglob("*.py") if p.name != "config.py"
    )
    unread = [key for key in leaf_keys(STAGE_CONFIGS[stage]) if not re.search(rf"\.{key.split('.')[-1]}\b", sources)]
    assert unread == []


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_every_field_is_documented(stage):
    docs = field_docs(STAGE_CONFIGS[stage])
    undocumented = [k for k in leaf_keys(STAGE_CONFIGS[stage]) if not docs.get(k)]
    # weight_decay/beta1/beta2/seed and friends explain themselves; everything else needs a line.
    allowed = {"optim.weight_decay", "optim.beta1", "optim.beta2", "optim.min_lr_ratio", "train.seed", "tracking.wandb_project"}
    allowed |= {f"critic_{key}" for key in allowed if key.startswith("optim.")}
    assert sorted(set(undocumented) - allowed) == []


def test_a_stage_default_survives_overrides_of_other_keys_in_its_section(tmp_path):
    from rlhf.config import RMConfig

    assert load_config(RMConfig).model.name_or_path == "sft:latest"
    cfg = load_config(RMConfig, None, ["model.tokenizer=/some/tokenizer", "optim.warmup_steps=3"])
    assert cfg.model.name_or_path == "sft:latest" and cfg.model.tokenizer == "/some/tokenizer"
    assert cfg.optim.warmup_steps == 3 and cfg.optim.lr == RMConfig().optim.lr
    (tmp_path / "rm.yaml").write_text("model:\n  gradient_checkpointing: true\n")
    assert load_config(RMConfig, tmp_path / "rm.yaml").model.name_or_path == "sft:latest"


def test_resolved_config_stores_local_paths_absolute(tmp_path, monkeypatch):
    from rlhf.runs import resolve_config

    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n')
    (tmp_path / "toy").mkdir()  # a folder named like the sentinel must not hijack it
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config("sft", None, ["data.train=train.jsonl", "data.eval=toy", "run.registry=reg"])
    assert cfg.data.train == str(tmp_path / "train.jsonl")
    assert cfg.data.eval == "toy"  # not a path: left as written
    assert cfg.model.name_or_path == "toy"
    assert cfg.run.registry == str(tmp_path / "reg")


@pytest.mark.parametrize("overrides, fragments", [
    (["ppo.ptx_coef=0.1"], ["ppo.ptx_coef", "data.ptx"]),
    (["rollout.batch_size=48", "engine.micro_batch_size=32"], ["rollout.batch_size (48)", "engine.micro_batch_size"]),
    (["ppo.kl_target=6", "ppo.beta=0"], ["ppo.kl_target", "ppo.beta"]),
    (["rollout.temperature=0"], ["rollout.temperature"]),
])
def test_ppo_settings_that_cannot_work(overrides, fragments):
    from rlhf.config import PPOConfig

    with pytest.raises(UserError) as err:
        load_config(PPOConfig, None, overrides)
    assert all(f in str(err.value) for f in fragments), str(err.value)
