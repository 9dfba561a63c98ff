"""The embedded default: tokenizer, tiny model, addition task and its oracle.

Expected values are worked out by hand (or with int arithmetic independent of the oracle), never
taken from the function under test.
"""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path

import pytest
import torch
import transformers

from rlhf.toy import (
    TOY,
    ToyModelConfig,
    ToyTask,
    ToyTaskConfig,
    build_model,
    build_tokenizer,
    model_identity,
    oracle_score,
)

SMALL = ToyTaskConfig(train_size=500, eval_size=100)


def _true_sum(prompt: str) -> str:
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b))


# ----------------------------------------------------------------------------- oracle


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("12+34=", "46", 1.0),  # exact
        ("12+34=", " 46 ", 1.0),  # surrounding whitespace is not the model's mistake
        ("12+34=", "47", 0.5),  # units wrong: 1 of 2 positions
        ("12+34=", "36", 0.5),  # tens wrong
        ("12+34=", "406", 1 / 3),  # extra digit: right-aligned "6" matches; "0"!="4"; "4" extra
        ("12+34=", "6", 0.5),  # dropped tens: "6" matches, over max(1, 2) = 2
        ("12+34=", "4", 0.0),  # dropped units: "4" vs "6"
        ("99+99=", "198", 1.0),
        ("99+99=", "188", 2 / 3),  # carry mistake in the tens
        ("99+99=", "98", 2 / 3),  # dropped carry: "98" vs "198" -> 2 of 3
        ("99+99=", "0198", 0.75),  # a leading zero is a wrong extra position
        ("12+34=", "", 0.0),  # empty
        ("12+34=", "forty-six", 0.0),  # junk
        ("12+34=", "46a", 0.0),  # digits and junk
        ("12+34=", "4 6", 0.0),
        ("12+34=", "-46", 0.0),
        ("12+34=", "4²", 0.0),  # unicode "digits" are not digits here
        ("User: what is 3+4=", "7", 1.0),  # the task prompt at the end of a longer text
        ("<|user|>\n12+34=\n<|assistant|>\n", "46", 1.0),  # rendered by the chat template
        ("<|user|>\n1+1=\n<|assistant|>\n2</s><|user|>\n12+34=\n<|assistant|>\n", "2", 0.0),
    ],
)
def test_oracle_hand_cases(prompt: str, response: str, expected: float) -> None:
    assert oracle_score(prompt, response) == pytest.approx(expected, abs=1e-12)


def test_oracle_rejects_a_prompt_that_is_not_a_sum() -> None:
    with pytest.raises(ValueError, match="a\\+b="):
        oracle_score("hello", "46")


# ----------------------------------------------------------------------------- task


def test_rows_have_the_contract_keys_and_sizes() -> None:
    task = ToyTask(SMALL)
    for split, size in (("train", 500), ("eval", 100)):
        demos = task.demonstrations(split)
        assert len(demos) == size and set(demos[0]) == {"prompt", "response"}
        pairs = task.comparisons(split)
        assert len(pairs) == size and set(pairs[0]) == {"prompt", "chosen", "rejected"}
        ranked = task.ranked(split)
        assert len(ranked) == size and set(ranked[0]) == {"prompt", "responses"}
        prompts = task.prompts(split)
        assert len(prompts) == size and set(prompts[0]) == {"prompt"}
    for row in task.prompts("train"):
        a, b = row["prompt"].rstrip("=").split("+")
        assert row["prompt"].endswith("=") and 10 <= int(a) <= 99 and 10 <= int(b) <= 99
    with pytest.raises(ValueError):
        task.prompts("test")


def test_rows_are_deterministic_and_follow_the_seed() -> None:
    def everything(cfg: ToyTaskConfig) -> list:
        task = ToyTask(cfg)
        return [
            getattr(task, kind)(split)
            for kind in ("demonstrations", "comparisons", "ranked", "prompts")
            for split in ("train", "eval")
        ]

    assert everything(SMALL) == everything(SMALL)
    other = everything(dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert all(a != b for a, b in zip(everything(SMALL), other))


def test_rows_do_not_depend_on_call_order() -> None:
    first, second = ToyTask(SMALL), ToyTask(SMALL)
    second.comparisons("train")
    second.ranked("eval")
    assert first.demonstrations("train") == second.demonstrations("train")


def test_train_and_eval_prompts_are_disjoint() -> None:
    task = ToyTask(ToyTaskConfig(train_size=4000, eval_size=200))
    train, held_out = set(), set()
    for kind in ("demonstrations", "comparisons", "ranked", "prompts"):
        train |= {row["prompt"] for row in getattr(task, kind)("train")}
        held_out |= {row["prompt"] for row in getattr(task, kind)("eval")}
    assert train.isdisjoint(held_out)
    # Not vacuous: both sides are large.
    assert len(train) > 3000 and len(held_out) > 150


def test_demonstration_corruption_rate_matches_demo_noise() -> None:
    for noise in (0.0, 0.3, 1.0):
        demos = ToyTask(ToyTaskConfig(demo_noise=noise, train_size=4000)).demonstrations("train")
        wrong = [row for row in demos if row["response"] != _true_sum(row["prompt"])]
        # Binomial(4000, 0.3) has std 0.007; 0.03 is over four of them.
        assert len(wrong) / len(demos) == pytest.approx(noise, abs=0.03)
        # Corruptions are realistic wrong answers: digits only, close in length to the sum.
        for row in wrong:
            assert row["response"].isdigit()
            assert abs(len(row["response"]) - len(_true_sum(row["prompt"]))) <= 1


def test_comparisons_are_strictly_ordered_by_the_oracle() -> None:
    pairs = ToyTask(SMALL).comparisons("train")
    for row in pairs:
        assert oracle_score(row["prompt"], row["chosen"]) > oracle_score(
            row["prompt"], row["rejected"]
        )
    # The pairs are not all "correct vs junk": the RM must see near misses on both sides.
    near_misses = [
        row for row in pairs
        if 0 < oracle_score(row["prompt"], row["rejected"])
        and oracle_score(row["prompt"], row["chosen"]) < 1
    ]
    assert len(near_misses) > len(pairs) // 20


@pytest.mark.parametrize("k", [2, 4, 6])
def test_ranked_lists_are_strictly_decreasing_and_of_length_k(k: int) -> None:
    for digits in (1, 2):
        cfg = dataclasses.replace(SMALL, ranked_k=k, digits=digits)
        for row in ToyTask(cfg).ranked("train"):
            assert len(row["responses"]) == k
            scores = [oracle_score(row["prompt"], r) for r in row["responses"]]
            assert all(a > b for a, b in zip(scores, scores[1:])), (row, scores)


def test_write_produces_the_ten_jsonl_files(tmp_path: Path) -> None:
    task = ToyTask(SMALL)
    paths = task.write(tmp_path / "data")
    expected = {
        f"{kind}_{split}" for kind in ("sft", "pairs", "ranked", "prompts", "feedback")
        for split in ("train", "eval")
    }
    assert set(paths) == expected
    for name, path in paths.items():
        assert path == tmp_path / "data" / f"{name}.jsonl"
    rows = [json.loads(line) for line in paths["pairs_eval"].read_text().splitlines()]
    assert rows == task.comparisons("eval")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        f"{name}.jsonl" for name in expected
    )


def test_task_config_fields_have_docstrings() -> None:
    import ast
    import inspect

    import rlhf.toy.model as model_module
    import rlhf.toy.task as task_module

    for module, cls_name in ((task_module, "ToyTaskConfig"), (model_module, "ToyModelConfig")):
        cls = next(
            node for node in ast.parse(inspect.getsource(module)).body
            if isinstance(node, ast.ClassDef) and node.name == cls_name
        )
        body = cls.body
        documented = {
            stmt.target.id for stmt, nxt in zip(body, body[1:])
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
        }
        fields = {f.name for f in dataclasses.fields(getattr(module, cls_name))}
        assert documented == fields, cls_name


# ----------------------------------------------------------------------------- tokenizer


def test_sentinel() -> None:
    assert TOY == "toy"


def test_tokenizer_round_trips_printable_text() -> None:
    tok = build_tokenizer()
    text = string.printable.replace("\t", "").replace("\r", "").replace("\x0b", "").replace(
        "\x0c", ""
    ) + "  two  spaces\n<|user|>\nWhat is 12+34?\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_tokenizer_specials() -> None:
    tok = build_tokenizer()
    assert len(tok) == 4 + 95 + 1  # specials + printable ASCII + newline
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<pad>", "<s>", "</s>", "<unk>"
    )
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template is None
    with_bos = tok.encode("12+34=")
    without = tok.encode("12+34=", add_special_tokens=False)
    assert with_bos == [tok.bos_token_id] + without
    assert tok.eos_token_id not in with_bos
    assert tok.convert_ids_to_tokens(without) == list("12+34=")
    assert tok.decode(with_bos, skip_special_tokens=True) == "12+34="
    assert tok.encode("é", add_special_tokens=False) == [tok.unk_token_id]


def test_tokenizer_ids_are_fixed() -> None:
    # Pinned by hand from the documented layout: specials 0..3, then chr(32..126), then "\n".
    vocab = build_tokenizer().get_vocab()
    assert vocab["<pad>"] == 0 and vocab["<s>"] == 1 and vocab["</s>"] == 2 and vocab["<unk>"] == 3
    assert vocab[" "] == 4 and vocab["0"] == 4 + 16 and vocab["~"] == 98 and vocab["\n"] == 99
    assert build_tokenizer().get_vocab() == vocab


def test_tokenizer_survives_save_and_auto_load(tmp_path: Path) -> None:
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello, world!\n 12+34=46 ~"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(
        text, add_special_tokens=False
    )
    assert loaded.decode(tok.encode(text), skip_special_tokens=True) == text
    assert loaded.get_vocab() == tok.get_vocab()
    for name in ("pad", "bos", "eos", "unk"):
        assert getattr(loaded, f"{name}_token_id") == getattr(tok, f"{name}_token_id")


# ----------------------------------------------------------------------------- model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_weights_follow_the_seed_only() -> None:
    tok, cfg = build_tokenizer(), ToyModelConfig()
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    first = build_model(cfg, tok, seed=7)
    # Building forks the global RNG: the caller's random stream is left where it was.
    assert torch.equal(torch.rand(3), before)
    torch.manual_seed(99)  # a different global state must not matter
    assert _same_weights(first, build_model(cfg, tok, seed=7))
    assert not _same_weights(first, build_model(cfg, tok, seed=8))


def test_model_config_and_parameter_count() -> None:
    tok = build_tokenizer()
    model = build_model(ToyModelConfig(), tok, seed=0)
    c = model.config
    assert (c.vocab_size, c.pad_token_id, c.bos_token_id, c.eos_token_id) == (100, 0, 1, 2)
    assert c.attention_dropout == 0.0
    # By hand, h=128, i=352, V=100, 2 layers, untied:
    #   per layer: q,k,v,o 4*128*128 = 65536; gate,up,down 3*128*352 = 135168; 2 norms 256
    #   embeddings 100*128 = 12800, lm_head 12800, final norm 128
    expected = 2 * (65536 + 135168 + 256) + 12800 + 12800 + 128
    n = sum(p.numel() for p in model.parameters())
    assert n == expected == 427648
    assert 300_000 <= n <= 500_000


def test_model_save_and_auto_load_give_identical_logits(tmp_path: Path) -> None:
    tok = build_tokenizer()
    model = build_model(ToyModelConfig(), tok, seed=0)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tok.encode("12+34=46"), tok.encode("98+76=17")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_model_identity() -> None:
    cfg = ToyModelConfig()
    ident = model_identity(cfg)
    prefix, digest = ident.rsplit("-", 1)
    assert prefix == "toy-llama-h128-l2"
    assert len(digest) == 8 and all(c in "0123456789abcdef" for c in digest)
    assert model_identity(ToyModelConfig()) == ident
    assert model_identity(dataclasses.replace(cfg, intermediate_size=256)) != ident


def test_model_config_is_validated() -> None:
    with pytest.raises(ValueError, match="divisible"):
        build_model(ToyModelConfig(num_heads=3), build_tokenizer(), seed=0)


def test_feedback_labels_are_the_oracles_verdict_and_about_balanced() -> None:
    rows = ToyTask(ToyTaskConfig(train_size=2000)).feedback("train")
    assert len(rows) == 2000
    for row in rows:
        assert isinstance(row["label"], bool)
        assert row["label"] == (oracle_score(row["prompt"], row["completion"]) == 1.0), row
    desirable = sum(row["label"] for row in rows)
    assert 900 <= desirable <= 1100  # a fair coin per row: 1000 +- 2.2 standard deviations
