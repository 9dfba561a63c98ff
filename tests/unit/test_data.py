"""Data layer: sources, formats, chat templates, tokenization/masking, collation.

Token ids are hand-computed from the fixture's char-level vocabulary:
<pad>=0, <s>=1, </s>=2, <unk>=3, a printable char c -> ord(c) - 28 (so " "=4, "a"=69, "b"=70,
"c"=71, "d"=72, "e"=73), "\\n"=99. The tokenizer prepends <s> when add_special_tokens=True.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.data.collate import collate_sft, left_pad_prompts, pad_right
from rlhf.data.formats import (
    ASSISTANT_MARKER,
    Comparison,
    Prompt,
    PromptResponse,
    Ranked,
    split_shared_prefix,
    to_comparisons,
    to_prompt_responses,
    to_prompts,
    to_ranked,
)
from rlhf.data.sources import Records, load_records
from rlhf.data.templates import DEFAULT_CHAT_TEMPLATE, render_chat
from rlhf.data.tokenize import SFTExample, tokenize_prompts, tokenize_sft
from rlhf.errors import UserError

A, B, C, D, E = 69, 70, 71, 72, 73
BOS, EOS, PAD = 1, 2, 0


def _make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(32, 127):
        vocab[chr(i)] = i - 28
    vocab["\n"] = 99
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tok():
    t = _make_tokenizer()
    assert t.chat_template is None  # so the default template is the one under test
    return t


@pytest.fixture(scope="module")
def tok_templated():
    t = _make_tokenizer()
    t.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    return t


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recs(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Records:
    return load_records(write_jsonl(tmp_path / name, rows))


def test_tokenizer_fixture_ids(tok):
    assert tok("ab c\n").input_ids == [BOS, A, B, 4, C, 99]
    assert tok("ab", add_special_tokens=False).input_ids == [A, B]
    assert tok("x</s>", add_special_tokens=False).input_ids == [ord("x") - 28, EOS]


# ---------------------------------------------------------------- sources


def test_jsonl_blank_lines_and_line_numbers(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n   \n{"prompt": "c", "response": "d"}\n\n')
    r = load_records(str(p))
    assert len(r.rows) == 2
    assert r.line_numbers == [1, 4]
    assert r.where(1) == f"{p}:4"
    assert r.rows["prompt"][:] == ["a", "c"]


def test_jsonl_union_of_keys(tmp_path):
    r = recs(tmp_path, [{"prompt": "a"}, {"prompt": "b", "margin": 1.5}])
    assert list(r.rows["margin"]) == [None, 1.5]


def test_json_array_and_json_lines(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=2))
    r = load_records(str(p))
    assert list(r.rows["prompt"]) == ["a", "b"]
    assert r.line_numbers is None
    assert r.where(1) == f"{p} row 2"

    q = tmp_path / "lines.json"
    q.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    r = load_records(str(q))
    assert list(r.rows["prompt"]) == ["a", "b"] and r.where(1) == f"{q}:2"


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y", "z"], "response": ["1", "2", "3"]}), p)
    r = load_records(str(p))
    assert list(r.rows["response"]) == ["1", "2", "3"]
    assert r.line_numbers is None
    assert r.where(1) == f"{p} row 2"


@pytest.mark.parametrize("src", ["nope/train.jsonl", "./missing", "~/no/such/dir/x", "a/b/c"])
def test_missing_file(src):
    with pytest.raises(UserError) as e:
        load_records(src, key="data.train")
    assert str(e.value) == f"data file not found: {src} (data.train); check the path"


def test_malformed_line(tmp_path):
    p = tmp_path / "file.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt" "b"}\n')
    with pytest.raises(UserError) as e:
        load_records(str(p), key="data.train")
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: not valid JSON (Expecting ':' delimiter: column 11)")
    assert msg.endswith("(data.train)") and "\n" not in msg


def test_malformed_json_array(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(UserError, match=rf"{p.name}:3: not valid JSON"):
        load_records(str(p))


def test_non_object_row(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"x.jsonl:2: expected a JSON object, got an array"):
        load_records(str(p))


def test_mixed_types_names_row(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": 7}\n')
    with pytest.raises(UserError, match=r"m.jsonl:3: column 'prompt' changes type"):
        load_records(str(p))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(UserError) as e:
        load_records(str(p), key="data.eval")
    assert str(e.value).startswith(f"{p}: no rows (data.eval)")


def test_fake_hub_name_fails_fast(monkeypatch):
    import datasets
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        load_records("no-such-org-xyz/no-such-dataset-xyz:test", key="data.train")
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert msg.startswith("no-such-org-xyz/no-such-dataset-xyz:test: neither a local file nor a loadable hub dataset")
    assert "(data.train)" in msg and "\n" not in msg


def test_hub_where():
    import datasets

    r = Records(rows=datasets.Dataset.from_dict({"x": [1, 2]}), source="org/name:test", line_numbers=None, hub_split="test")
    assert r.where(17) == "org/name[test] row 18"


# ---------------------------------------------------------------- templates / formats


MSGS = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
]


def test_default_template_rendering(tok):
    assert render_chat(tok, MSGS[:2], add_generation_prompt=True) == "<|system|>\nS\n<|user|>\nHi\n<|assistant|>\n"
    # Training view == generation view + response + EOS (what tokenize_sft builds).
    full = render_chat(tok, MSGS, add_generation_prompt=False)
    assert full == render_chat(tok, MSGS[:2], add_generation_prompt=True) + "Yo" + "</s>"
    assert "eos_token" in DEFAULT_CHAT_TEMPLATE


def test_render_chat_rejects_bad_roles(tok):
    with pytest.raises(UserError, match=r"here: message 1 has role 'bot'"):
        render_chat(tok, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
                    add_generation_prompt=True, where="here")
    with pytest.raises(UserError, match=r"here: message 0 \(user\) content must be a string"):
        render_chat(tok, [{"role": "user", "content": 3}], add_generation_prompt=True, where="here")


def test_prompt_response_columns(tmp_path, tok):
    r = recs(tmp_path, [{"prompt": "ab", "response": "c"}, {"prompt": "d", "response": "e"}])
    assert to_prompt_responses(r, tok) == [
        PromptResponse("ab", "c", r.where(0)),
        PromptResponse("d", "e", r.where(1)),
    ]
    r = recs(tmp_path, [{"prompt": "ab", "completion": "c"}], name="c.jsonl")
    assert to_prompt_responses(r, tok)[0].response == "c"


def test_messages_default_and_own_template(tmp_path, tok, tok_templated):
    r = recs(tmp_path, [{"messages": MSGS}])
    (ex,) = to_prompt_responses(r, tok)
    assert ex.prompt == "<|system|>\nS\n<|user|>\nHi\n<|assistant|>\n" and ex.response == "Yo"
    (ex,) = to_prompt_responses(r, tok_templated)
    assert ex.prompt == "[system]S[user]Hi[assistant]" and ex.response == "Yo"


def test_messages_must_end_with_assistant(tmp_path, tok):
    r = recs(tmp_path, [{"messages": MSGS[:2]}])
    with pytest.raises(UserError, match=r"d.jsonl:1: the last message must be the assistant's"):
        to_prompt_responses(r, tok)


def test_missing_column_lists_found_and_accepted(tmp_path, tok):
    r = recs(tmp_path, [{"text": "x", "label": 1}])
    for convert, accepted in [
        (to_prompt_responses, "prompt+response"),
        (to_comparisons, "prompt+chosen+rejected"),
        (to_ranked, "prompt+responses"),
        (to_prompts, "prompt, messages"),
    ]:
        with pytest.raises(UserError) as e:
            convert(r, tok)
        msg = str(e.value)
        assert "found: text, label" in msg and accepted in msg and msg.endswith("(data.train)")


def test_bad_values_name_the_row(tmp_path, tok):
    r = recs(tmp_path, [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": ""}])
    with pytest.raises(UserError, match=r"d.jsonl:2: 'response' is empty"):
        to_prompt_responses(r, tok)
    r = recs(tmp_path, [{"prompt": ["not", "messages"], "response": "b"}], name="n.jsonl")
    with pytest.raises(UserError, match=r"n.jsonl:1: message 0 is str"):
        to_prompt_responses(r, tok)


def test_comparisons_explicit_with_margin(tmp_path, tok):
    r = recs(tmp_path, [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": 2},
                        {"prompt": "q", "chosen": "c2", "rejected": "r2"}])
    assert to_comparisons(r, tok) == [
        Comparison("p", "c", "r", 2.0, r.where(0)),
        Comparison("q", "c2", "r2", None, r.where(1)),
    ]
    r = recs(tmp_path, [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}], name="m.jsonl")
    with pytest.raises(UserError, match=r"m.jsonl:1: 'margin' must be a number"):
        to_comparisons(r, tok)


def test_hh_rlhf_prefix_split(tmp_path, tok):
    shared = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: What is 2+2?\n\nAssistant:"
    r = recs(tmp_path, [
        {"chosen": shared + " It is 4.", "rejected": shared + " It is 5."},
        # no marker at all: cut at the longest common prefix
        {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"},
    ])
    a, b = to_comparisons(r, tok)
    assert (a.prompt, a.chosen, a.rejected, a.margin) == (shared, " It is 4.", " It is 5.", None)
    assert (b.prompt, b.chosen, b.rejected) == ("Q: hi A: ", "yes", "no")


# Pieces that make the marker's edge cases common: a marker cut by the end of the common prefix
# ("Assist" + "ant:"), several markers, one text a prefix of the other, no marker at all.
CONVERSATION_PIECES = ["\n\nHuman:", "\n\nAssistant:", "Assistant:", "Assist", "ant:", " It is", " 4", " 5", "\n"]
conversation_text = st.lists(st.sampled_from(CONVERSATION_PIECES), max_size=6).map("".join)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(shared=conversation_text, chosen_tail=conversation_text, rejected_tail=conversation_text)
def test_split_shared_prefix_cuts_after_the_last_marker_inside_the_common_prefix(shared, chosen_tail, rejected_tail):
    chosen, rejected = shared + chosen_tail, shared + rejected_tail
    prompt, chosen_reply, rejected_reply = split_shared_prefix(chosen, rejected)
    assert prompt + chosen_reply == chosen and prompt + rejected_reply == rejected
    common = os.path.commonprefix([chosen, rejected])
    marker = common.rfind(ASSISTANT_MARKER)  # only a marker wholly inside the common prefix
    assert prompt == (common[: marker + len(ASSISTANT_MARKER)] if marker >= 0 else common)


def test_comparisons_as_message_lists(tmp_path, tok):
    user = {"role": "user", "content": "Hi"}
    r = recs(tmp_path, [{
        "chosen": [user, {"role": "assistant", "content": "Good"}],
        "rejected": [user, {"role": "assistant", "content": "Bad"}],
    }])
    (c,) = to_comparisons(r, tok)
    assert (c.prompt, c.chosen, c.rejected) == ("<|user|>\nHi\n<|assistant|>\n", "Good", "Bad")


def test_ranked(tmp_path, tok):
    r = recs(tmp_path, [{"prompt": "p", "responses": ["best", "mid", "worst"]}])
    assert to_ranked(r, tok) == [Ranked("p", ("best", "mid", "worst"), r.where(0))]
    r = recs(tmp_path, [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "p", "responses": ["only"]}], name="r.jsonl")
    with pytest.raises(UserError, match=r"r.jsonl:2: 'responses' has 1 response\(s\), a ranking needs at least 2"):
        to_ranked(r, tok)


def test_prompts_from_prompt_and_messages(tmp_path, tok):
    r = recs(tmp_path, [{"prompt": "ab"}])
    assert to_prompts(r, tok) == [Prompt("ab", r.where(0))]
    r = recs(tmp_path, [{"messages": MSGS}, {"messages": MSGS[1:2]}], name="m.jsonl")
    got = [p.prompt for p in to_prompts(r, tok)]
    assert got == ["<|system|>\nS\n<|user|>\nHi\n<|assistant|>\n", "<|user|>\nHi\n<|assistant|>\n"]


# ---------------------------------------------------------------- tokenization / masking


def test_sft_mask_hand_checked(tok):
    (ex,), stats = tokenize_sft([PromptResponse("ab", "c", "w")], tok, max_length=16)
    assert ex.input_ids == [BOS, A, B, C, EOS]
    assert ex.response_mask == [False, False, False, True, True]
    assert (stats.rows, stats.truncated_responses, stats.skipped_long_prompts) == (1, 0, 0)


def test_sft_truncation_counted(tok):
    examples = [PromptResponse("ab", "cde", "w1"), PromptResponse("ab", "c", "w2")]
    out, stats = tokenize_sft(examples, tok, max_length=5)
    # first: 3 prompt ids + [c, d, e, EOS] -> cut to 2 response ids, EOS dropped
    assert out[0].input_ids == [BOS, A, B, C, D]
    assert out[0].response_mask == [False, False, False, True, True]
    assert out[1].input_ids == [BOS, A, B, C, EOS]
    assert (stats.rows, stats.truncated_responses, stats.skipped_long_prompts) == (2, 1, 0)


def test_sft_prompt_at_limit_keeps_one_response_token(tok):
    (ex,), stats = tokenize_sft([PromptResponse("abc", "d", "w")], tok, max_length=5)
    assert ex.input_ids == [BOS, A, B, C, D] and ex.response_mask == [False] * 4 + [True]
    assert stats.truncated_responses == 1


def test_sft_long_prompt_error_and_skip(tok):
    examples = [PromptResponse("ab", "c", "t.jsonl:1"), PromptResponse("abcd", "e", "t.jsonl:2")]
    with pytest.raises(UserError) as e:
        tokenize_sft(examples, tok, max_length=5)
    assert str(e.value) == (
        "t.jsonl:2: prompt is 5 tokens, longer than data.max_length=5 allows; "
        "raise data.max_length or set data.long_prompts=skip"
    )
    out, stats = tokenize_sft(examples, tok, max_length=5, long_prompts="skip")
    assert [ex.input_ids for ex in out] == [[BOS, A, B, C, EOS]]
    assert (stats.rows, stats.skipped_long_prompts) == (2, 1)
    with pytest.raises(UserError, match=r"data.long_prompts"):
        tokenize_sft(examples, tok, max_length=5, long_prompts="truncate")


def test_tokenize_prompts(tok):
    ids, stats = tokenize_prompts([Prompt("ab", "w1"), Prompt("abcd", "w2")], tok, max_length=4, long_prompts="skip")
    assert ids == [[BOS, A, B]] and stats.skipped_long_prompts == 1
    with pytest.raises(UserError) as e:
        tokenize_prompts([Prompt("abcd", "p.jsonl:7")], tok, max_length=4)
    assert str(e.value) == (
        "p.jsonl:7: prompt is 5 tokens, longer than data.max_prompt_length=4 allows; "
        "raise data.max_prompt_length or set data.long_prompts=skip"
    )


def test_sft_batches_many_rows(tok):
    examples = [PromptResponse("a" * (i % 7 + 1), "b", f"w{i}") for i in range(3000)]
    out, stats = tokenize_sft(examples, tok, max_length=32)
    assert len(out) == 3000 and stats.truncated_responses == 0
    assert out[2999].input_ids == [BOS] + [A] * (2999 % 7 + 1) + [B, EOS]


# ---------------------------------------------------------------- collation


def test_pad_right():
    t = pad_right([[5, 6, 7], [8]], pad_value=-1)
    assert t.dtype == torch.long
    assert t.tolist() == [[5, 6, 7], [8, -1, -1]]


def test_collate_sft():
    batch = [
        SFTExample([1, 69, 70, 71, 2], [False, False, False, True, True]),
        SFTExample([1, 69, 2], [False, True, True]),
    ]
    # pad id == EOS on purpose: the masks must come from lengths, not from the ids
    out = collate_sft(batch, pad_id=EOS)
    assert out["input_ids"].tolist() == [[1, 69, 70, 71, 2], [1, 69, 2, 2, 2]]
    assert out["attention_mask"].dtype == torch.long
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["response_mask"].dtype == torch.bool
    assert out["response_mask"].tolist() == [
        [False, False, False, True, True],
        [False, True, True, False, False],
    ]


def test_left_pad_prompts():
    out = left_pad_prompts([[5, 6, 7], [8], [9, 10]], pad_id=PAD)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert all(v.dtype == torch.long for v in out.values())
