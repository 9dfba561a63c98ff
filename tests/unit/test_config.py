"""The config loader: defaults, YAML, dotted overrides, and the errors users see."""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from pathlib import Path

import pytest
import yaml

from rlhf.config import STAGE_CONFIGS, SFTConfig, field_docs, leaf_keys, load_config, save_config
from rlhf.errors import UserError
from tests.config_reads import ConfigReads, config_classes

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
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(SFTConfig, None, ["optim.lr=0.25", "run.tags=x"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(SFTConfig, tmp_path / "config.yaml") == cfg


def yaml_leaves(node: dict, prefix: str = "") -> dict[str, object]:
    """Every dotted key a YAML mapping sets, with its value as PyYAML reads it."""
    leaves = {}
    for key, value in node.items():
        leaves.update(yaml_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return leaves


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_as_written(path):
    """Each preset loads as the stage its name starts with, and every value it sets arrives as written."""
    stage = path.name.split("-")[0]
    assert stage in STAGE_CONFIGS, f"{path.name}: a preset's name starts with its stage"
    # The preset's own run commands, and the README's, name the same stage.
    for text in (path.read_text(), (REPO / "README.md").read_text()):
        for named in re.findall(rf"rlhf (\w+) -c configs/{re.escape(path.name)}", text):
            assert named == stage, f"`rlhf {named} -c configs/{path.name}`"
    cfg = load_config(STAGE_CONFIGS[stage], path)
    written = yaml_leaves(yaml.safe_load(path.read_text()) or {})
    assert written, f"{path.name} sets nothing"
    for key, value in written.items():
        loaded = functools.reduce(getattr, key.split("."), cfg)
        if isinstance(loaded, float) and isinstance(value, str):
            value = float(value)  # PyYAML reads 2e-4 (no dot) as a string; the typed config reads a float
        assert loaded == value and isinstance(loaded, bool) == isinstance(value, bool), (key, value, loaded)


@functools.cache
def config_reads() -> ConfigReads:
    paths = [p for d in ("rlhf", "stages") for p in sorted((REPO / d).rglob("*.py"))]
    return ConfigReads(paths, config_classes(STAGE_CONFIGS.values()))


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_every_config_field_is_read_somewhere(stage):
    """A key nobody reads is a lie in the docs: each must be read along its whole path, not by its
    last name alone (what counts as a read: tests/config_reads.py)."""
    cls = STAGE_CONFIGS[stage]
    unread = [key for key in leaf_keys(cls) if not config_reads().is_read(cls, key)]
    assert unread == []


@pytest.mark.parametrize("stage, key", [
    ("ppo", "reward.seed"),  # seed is read as train.seed and sampling.seed
    ("sft", "train.nosuchthing_xyz"),
    ("ppo", "eval.temperature"),  # read as SFT's and DPO's eval.temperature, and PPO's rollout.temperature
    ("bon", "eval.batch_size"),  # every other stage's eval section has one
    ("ppo", "critic.lora.seed"),
])
def test_a_key_whose_last_name_is_read_elsewhere_is_not_read(stage, key):
    assert not config_reads().is_read(STAGE_CONFIGS[stage], key)


def test_what_counts_as_reading_a_key(tmp_path):
    """The ways of reading a key config_reads credits, and the checks it does not."""
    source = tmp_path / "stage.py"
    source.write_text(
        "from typing import Any\n"
        "from rlhf.config import OptimConfig, SFTConfig\n\n"
        "def build(optim: OptimConfig):\n    return optim.lr\n\n"
        "def main(cfg: SFTConfig):\n    build(cfg.optim)\n    t = cfg.train\n    return t.seed, cfg.eval.batch_size\n\n"
        "def untyped(cfg: Any, data):\n    m = cfg.model\n    return m.lora.r, data.max_length, getattr(cfg.engine, 'grad_accum')\n\n"
        "class Checked:\n    def validate(self, cfg: SFTConfig):\n        return cfg.model.tokenizer, cfg.run.tags\n"
    )
    reads = ConfigReads([source], config_classes([SFTConfig]))
    read = {key for key in leaf_keys(SFTConfig) if reads.is_read(SFTConfig, key)}
    assert read == {"optim.lr", "train.seed", "eval.batch_size", "model.lora.r", "data.max_length", "engine.grad_accum"}


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
    from rlhf.store.runs import resolve_config

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


@pytest.mark.parametrize("overrides, fragments", [
    (["reward.name_or_path=oracle", "reward_ensemble.name_or_path=[rm:a]"],
     ["reward_ensemble.name_or_path adds reward models", "names none", "put a reward model there, or drop reward_ensemble"]),
    (["reward_ensemble.name_or_path=[rm:a]", "reward_ensemble.penalty=-1"], ["reward_ensemble.penalty must be at least 0, got -1"]),
])
def test_ppo_reward_ensemble_settings_that_cannot_work_in_one_line(overrides, fragments):
    from rlhf.config import PPOConfig

    with pytest.raises(UserError) as err:
        load_config(PPOConfig, None, overrides)
    assert all(f in str(err.value) for f in fragments) and "\n" not in str(err.value), str(err.value)
    load_config(PPOConfig, None, ["reward_ensemble.name_or_path=[rm:a]", "reward_ensemble.penalty=0"])  # what the fixes give


# ----------------------------------------------------------------------------------------------
# Each PPO model has its own trust_remote_code: trusting the actor's repository trusts no other.

CUSTOM_CODE = {
    "configuration_custom.py": "from transformers import LlamaConfig\n\n\n"
                               "class CustomConfig(LlamaConfig):\n    model_type = 'rlhf_custom_llama'\n",
    # Built by hand: the stock head gets its backbone from AutoModel, which knows no custom config.
    "modeling_custom.py": "import torch\nfrom transformers import LlamaForSequenceClassification, LlamaModel, LlamaPreTrainedModel\n\n"
                          "from .configuration_custom import CustomConfig\n\n\n"
                          "class CustomForSequenceClassification(LlamaForSequenceClassification):\n"
                          "    config_class = CustomConfig\n\n"
                          "    def __init__(self, config):\n"
                          "        LlamaPreTrainedModel.__init__(self, config)\n"
                          "        self.num_labels = config.num_labels\n"
                          "        self.model = LlamaModel(config)\n"
                          "        self.score = torch.nn.Linear(config.hidden_size, self.num_labels, bias=False)\n"
                          "        self.post_init()\n",
    "tokenization_custom.py": "from transformers import PreTrainedTokenizerFast\n\n\n"
                              "class CustomTokenizerFast(PreTrainedTokenizerFast):\n    pass\n",
}


def custom_code_reward_model(folder: Path) -> Path:
    """A tiny random reward model whose config and tokenizer name classes in the folder's own code
    (`auto_map`), as a hub repository with custom code does: transformers runs that code only when
    trusted. The toy tokenizer's vocabulary, so it matches a toy actor."""
    import json

    from rlhf.toy import ToyModelConfig, build_model, build_tokenizer

    build_model(ToyModelConfig(), build_tokenizer(), seed=1, head="scalar").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    for name, code in CUSTOM_CODE.items():
        (folder / name).write_text(code)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="rlhf_custom_llama", architectures=["CustomForSequenceClassification"], auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForSequenceClassification": "modeling_custom.CustomForSequenceClassification",
    })
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="CustomTokenizerFast",
                            auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizerFast"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def ppo_with_custom_reward(tmp_path: Path, *flags: str):
    from rlhf.config import PPOConfig

    folder = custom_code_reward_model(tmp_path / f"custom-rm-{'-'.join(flags) or 'plain'}")
    cfg = load_config(PPOConfig, None, ["model.name_or_path=toy", "model.trust_remote_code=true",
                                        f"critic.name_or_path={folder}", f"reward.name_or_path={folder}", *flags])
    return cfg, folder


def test_the_actors_trust_does_not_extend_to_the_reward_models_tokenizer(tmp_path):
    from rlhf.models.sources import ModelSource, ppo_sources
    from rlhf.store.registry import Registry
    from rlhf.toy import build_tokenizer

    actor, tokenizer = ModelSource("toy", "toy"), build_tokenizer()
    cfg, folder = ppo_with_custom_reward(tmp_path, "critic.trust_remote_code=true")
    with pytest.raises(UserError) as err:
        ppo_sources(cfg, Registry(tmp_path / "reg"), actor, tokenizer)
    message = str(err.value)
    assert "custom code" in message and "set reward.trust_remote_code=true" in message, message
    # Trusting the reward model's own repository is what lets it load.
    cfg, folder = ppo_with_custom_reward(tmp_path, "critic.trust_remote_code=true", "reward.trust_remote_code=true")
    assert ppo_sources(cfg, Registry(tmp_path / "reg"), actor, tokenizer).reward.location == str(folder)


def test_the_reward_model_loads_under_its_own_flag(tmp_path):
    import torch

    from rlhf.models.loading import load_scalar_model
    from rlhf.models.sources import resolve_model
    from rlhf.models.stage_models import frozen_model_config
    from rlhf.store.registry import Registry
    from rlhf.toy import build_tokenizer

    cfg, folder = ppo_with_custom_reward(tmp_path)
    source = resolve_model(str(folder), Registry(tmp_path / "reg"), key="reward.name_or_path")
    assert cfg.model.trust_remote_code and not frozen_model_config(cfg, "reward").trust_remote_code
    with pytest.raises(UserError, match=r"reward.name_or_path: cannot load .*custom code.*set reward.trust_remote_code=true"):
        load_scalar_model(source, frozen_model_config(cfg, "reward"), build_tokenizer(), seed=0, dtype=torch.float32,
                          trained_head=True, key="reward.name_or_path")
    cfg, folder = ppo_with_custom_reward(tmp_path, "reward.trust_remote_code=true")
    model = load_scalar_model(source, frozen_model_config(cfg, "reward"), build_tokenizer(), seed=0, dtype=torch.float32,
                              trained_head=True, key="reward.name_or_path")
    assert type(model.hf_model).__name__ == "CustomForSequenceClassification"  # the folder's own code ran


def test_a_null_reference_is_the_actor_and_loads_under_the_actors_flag():
    from rlhf.config import PPOConfig
    from rlhf.models.stage_models import frozen_model_config

    cfg = load_config(PPOConfig, None, ["model.trust_remote_code=true"])
    assert frozen_model_config(cfg, "reference").trust_remote_code
    cfg = load_config(PPOConfig, None, ["model.trust_remote_code=true", "reference.name_or_path=/some/model"])
    assert not frozen_model_config(cfg, "reference").trust_remote_code
    cfg = load_config(PPOConfig, None, ["reference.name_or_path=/m", "reference.trust_remote_code=true"])
    reference = frozen_model_config(cfg, "reference")
    assert reference.trust_remote_code and not reference.lora.enabled and not reference.gradient_checkpointing


# ----------------------------------------------------------------------------------------------
# Bad input that used to give a traceback or be silently accepted.


def test_a_config_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"optim:\n  lr: 0.1\n  # caf\xe9\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:3: not UTF-8 text (byte 0xe9); re-encode the file as UTF-8")):
        load_config(SFTConfig, path)


@pytest.mark.parametrize("text, expected", [
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", r"cfg.yaml:3: 'optim.lr' is set twice \(first on line 2\)"),
    ("optim:\n  lr:\n    peak: 1\n", r"cfg.yaml:2: 'optim.lr' is a single value, not a section"),
    ("optim:\n  lr: !!python/name:os.system x\n", r"cfg.yaml:2: could not determine a constructor"),
    ("optim:\n  lr: .inf\n", r"cfg.yaml:2: 'optim.lr' must be a finite number"),
    ("optim:\n  ? [a, b]\n  : 1\n", r"cfg.yaml:2: a key must be a plain name"),
    ("a\0b: 1\n", r"cfg.yaml:1: .*fix the YAML syntax"),
])
def test_config_files_that_cannot_be_read_as_written(tmp_path, text, expected):
    with pytest.raises(UserError, match=expected):
        load_config(SFTConfig, write(tmp_path, text))


@pytest.mark.parametrize("override, expected", [
    ("run.tags=[a", r"override 'run.tags=\[a': 'run.tags' is not a valid list"),
    ("optim.lr=nan", r"'optim.lr' must be a finite number, got 'nan'"),
    ("optim.lr=-inf", r"'optim.lr' must be a finite number"),
    ("optim.lr=1e999", r"'optim.lr' must be a finite number"),
    ("optim.lr.peak=1", r"override 'optim.lr.peak=1': 'optim.lr' is a single value"),
    ("ppo.beta=1", r"override 'ppo.beta=1': unknown config key 'ppo'"),
])
def test_overrides_that_cannot_be_read(override, expected):
    with pytest.raises(UserError, match=expected):
        load_config(SFTConfig, None, [override])


def test_a_huge_integer_for_a_float_is_not_finite(tmp_path):
    with pytest.raises(UserError, match="must be a finite number"):
        load_config(SFTConfig, write(tmp_path, f"optim:\n  lr: {10**400}\n"))


@pytest.mark.parametrize("stage, override, expected", [
    ("sft", "train.save_every=-1", "train.save_every must be at least 0, got -1"),
    ("rm", "train.eval_every=-1", "train.eval_every must be at least 0, got -1"),
    ("sft", "eval.max_rows=-1", "eval.max_rows must be at least 0, got -1"),
    ("rm", "eval.reward_stats_rows=-1", "eval.reward_stats_rows must be at least 0, got -1"),
    ("sft", "train.keep_checkpoints=0", "train.keep_checkpoints must be at least 1, got 0"),
    ("sft", "train.seed=-1", "train.seed must be in [0, 4294967295], got -1"),
    ("sft", "train.seed=4294967296", "train.seed must be in [0, 4294967295]"),
    ("sft", "train.max_steps=0", "train.max_steps must be in [1, 1000000000000], got 0"),
    ("dpo", "train.max_steps=1000000000001", "train.max_steps must be in [1, 1000000000000], got 1000000000001"),
    ("rm", "optim.warmup_steps=-1", "optim.warmup_steps must be at least 0, got -1"),
    ("sft", "optim.weight_decay=-1", "optim.weight_decay must be at least 0"),
    ("sft", "optim.grad_clip=-1", "optim.grad_clip must be at least 0"),
    ("sft", "optim.eps=0", "optim.eps must be positive, got 0.0"),
    ("sft", "optim.beta2=1", "optim.beta2 must be in [0, 1), got 1.0"),
    ("sft", "optim.min_lr_ratio=-0.5", "optim.min_lr_ratio must be in [0, 1]"),
    ("sft", "eval.max_new_tokens=0", "eval.max_new_tokens must be at least 1"),
    ("sft", "eval.temperature=-1", "eval.temperature must be at least 0, got -1.0"),
    ("sft", "data.max_length=1", "data.max_length must be at least 2 (one prompt and one response token), got 1"),
    ("sft", "data.train=", "data.train is empty"),
    ("sft", "model.lora.enabled=true model.lora.alpha=0", "model.lora.alpha must be at least 1"),
    ("sft", "model.lora.enabled=true model.lora.dropout=1", "model.lora.dropout must be in [0, 1)"),
    ("rm", "run.tags=latest", "run.tags: invalid tag 'latest'"),
    ("rm", "run.tags=a/b", "run.tags: invalid tag 'a/b'"),
    ("ppo", "eval.max_rows=-1", "eval.max_rows must be at least 0"),
    ("ppo", "critic_optim.beta1=-0.1", "critic_optim.beta1 must be in [0, 1)"),
    ("ppo", "critic.lora.enabled=true critic.lora.r=0", "critic.lora.r must be at least 1"),
    ("ppo", "ppo.max_kl=0", "ppo.max_kl must be positive"),
    ("ppo", "ppo.score_clip=-1", "ppo.score_clip must be positive"),
    ("ppo", "data.ptx_max_length=1", "data.ptx_max_length must be at least 2"),
    ("ppo", "rollout.score_batch_size=-1", "rollout.score_batch_size must be at least 0, got -1"),
    ("sft", "train.max_steps=10 optim.warmup_steps=11",
     "optim.warmup_steps=11 is longer than the run's 10 optimizer steps (train.max_steps=10); lower it, e.g. optim.warmup_steps=1"),
    ("dpo", "train.max_steps=3", "optim.warmup_steps=10 is longer than the run's 3 optimizer steps"),
    # PPO: 2 steps x 4 epochs x (64 rollouts / 8 per minibatch) = 64 optimizer steps.
    ("ppo", "train.max_steps=2 rollout.batch_size=64 engine.micro_batch_size=8 ppo.epochs=4 critic_optim.warmup_steps=65",
     "critic_optim.warmup_steps=65 is longer than the run's 64 optimizer steps (train.max_steps=2)"),
])
def test_values_out_of_range(stage, override, expected):
    with pytest.raises(UserError) as err:
        load_config(STAGE_CONFIGS[stage], None, override.split(" "))
    assert expected in str(err.value), str(err.value)


def test_a_warmup_as_long_as_the_run_is_accepted():
    assert load_config(SFTConfig, None, ["train.max_steps=10", "optim.warmup_steps=10"]).optim.warmup_steps == 10
    ppo = load_config(STAGE_CONFIGS["ppo"], None, ["train.max_steps=2", "rollout.batch_size=64", "engine.micro_batch_size=8",
                                                   "engine.grad_accum=2", "ppo.epochs=4", "optim.warmup_steps=32"])
    assert ppo.optimizer_steps() == 32


def test_a_critic_free_run_does_not_check_the_warmup_of_the_critic_it_never_trains():
    short = ["train.max_steps=2", "optim.warmup_steps=0", "ppo.epochs=1", "rollout.batch_size=64", "engine.micro_batch_size=64"]
    grpo = load_config(STAGE_CONFIGS["ppo"], None, [*short, "ppo.estimator=grpo", "rollout.samples_per_prompt=4"])
    assert grpo.optimizer_steps() == 2 and grpo.critic_optim.warmup_steps == 10
    with pytest.raises(UserError, match="critic_optim.warmup_steps=10 is longer than the run's 2 optimizer steps"):
        load_config(STAGE_CONFIGS["ppo"], None, short)  # with gae the critic trains


def test_zero_means_off_and_null_turns_optional_floats_off():
    from rlhf.config import PPOConfig

    cfg = load_config(SFTConfig, None, ["train.save_every=0", "train.eval_every=0", "eval.max_rows=0", "optim.grad_clip=0"])
    assert (cfg.train.save_every, cfg.train.eval_every, cfg.eval.max_rows) == (0, 0, 0)
    cfg = load_config(PPOConfig, None, ["ppo.max_kl=null", "ppo.score_clip=null", "ppo.no_eos_score=-3"])
    assert cfg.ppo.max_kl is None and cfg.ppo.score_clip is None and cfg.ppo.no_eos_score == -3


def test_fp16_needs_a_cuda_gpu():
    from rlhf.config import EngineConfig, check_precision

    with pytest.raises(UserError, match="engine.precision=fp16 needs a CUDA GPU"):
        check_precision(EngineConfig(precision="fp16"), cuda_available=False)
    check_precision(EngineConfig(precision="fp16"), cuda_available=True)
    for precision in ("bf16", "fp32"):
        check_precision(EngineConfig(precision=precision), cuda_available=False)


def test_model_references_that_name_nothing(tmp_path):
    """What a model key resolves to when it names nothing: each says why, not a hub error."""
    import json

    from rlhf.models.sources import resolve_model
    from rlhf.store.registry import Registry

    registry = Registry(tmp_path / "reg")
    (registry.root / "entries").mkdir(parents=True)
    gone = tmp_path / "reg" / "runs" / "sft-20260101-000000-0badf01d"
    (registry.root / "entries" / f"{gone.name}.json").write_text(json.dumps({
        "id": gone.name, "stage": "sft", "status": "completed", "created": "2026-01-01T00:00:00.000000+00:00",
        "path": str(gone / "final"), "run_dir": str(gone), "config": {},
    }))
    cases = {
        "": "model.name_or_path is empty; set it to 'toy', a registry reference",
        "  ": "model.name_or_path is empty",
        "sft:latest": f"model.name_or_path=sft:latest: the folder of sft entry {gone.name} is gone",
        "models/opt/final": "model.name_or_path=models/opt/final: no such folder",
        "~/no-such-model-for-rlhf": "no such folder",
        "./missing": "no such folder",
    }
    for value, expected in cases.items():
        with pytest.raises(UserError) as err:
            resolve_model(value, registry)
        assert expected in str(err.value), (value, str(err.value))
    (gone / "final").mkdir(parents=True)  # back, but without its weights
    with pytest.raises(UserError, match=f"the folder of sft entry {gone.name} .* has no config.json"):
        resolve_model("sft:latest", registry)
    assert resolve_model("someorg/some-model", registry).kind == "hub"  # one slash: a hub name


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{m}'] * 9)}]\n" for m, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, expected", [
    (LAUGHS, "more than 100,000 values once its YAML aliases are expanded (an alias bomb?)"),  # 9**9 values
    ("train: &t\n  seed: *t\n", ":1: a YAML alias that contains itself"),
    ("optim: &o [1, *o]\n", ":1: a YAML alias that contains itself"),
])
def test_a_yaml_file_that_expands_without_bound_is_refused_at_once(tmp_path, text, expected):
    started = time.monotonic()
    with pytest.raises(UserError, match=re.escape(expected)):
        load_config(SFTConfig, write(tmp_path, text))
    assert time.monotonic() - started < 1.0


def test_yaml_nested_past_the_parsers_depth_is_one_line(tmp_path):
    with pytest.raises(UserError, match="nested too deep to be a config"):
        load_config(SFTConfig, write(tmp_path, "x: " + "[" * 5_000 + "]" * 5_000 + "\n"))
