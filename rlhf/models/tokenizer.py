"""A tokenizer by itself: loaded from a folder or hub name, and its identity. Token ids mean nothing
to a model trained on other ids, so a tokenizer is checked against the one each registry parent was
trained with. The tokenizer of a resolved model (a ModelSource) is rlhf.models.sources' load_tokenizer.

(Named `tokenizer`, not `tokenizers`: run as a script from this folder, a `tokenizers.py` here would
shadow the Hugging Face package of that name.)
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from rlhf.errors import UserError, first_line, remote_code_hint
from rlhf.protocols import Tokenizer

if TYPE_CHECKING:
    from rlhf.store.entry import Entry


def pretrained_tokenizer(location: str, *, trust_remote_code: bool, key: str) -> Tokenizer:
    """The tokenizer saved at a folder or hub name, with a pad token that is not EOS where one can be found."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer of '{location}': {first_line(exc)}{remote_code_hint(exc, key)}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of '{location}' has no EOS token; set one in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        # A distinct pad keeps EOS learnable: padding is masked, EOS is a real target.
        candidate = tokenizer.unk_token or None
        if candidate is not None and tokenizer.convert_tokens_to_ids(candidate) != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: Tokenizer) -> dict[str, Any]:
    """A short identity that tells two tokenizers apart (vocabulary and special tokens)."""
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
    return {
        "name": getattr(tokenizer, "name_or_path", "") or "",
        "vocab_size": len(tokenizer),
        "fingerprint": digest,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def check_entry_tokenizer(tokenizer: Tokenizer, entry: Entry, *, where: str) -> None:
    """Stop when `tokenizer` is not the one registry `entry` was trained with (`where` names it)."""
    detail = tokenizer_differences(tokenizer_fingerprint(tokenizer), entry.tokenizer)
    if detail:
        raise UserError(
            f"the tokenizer of {where} differs from the one {entry.stage} entry {entry.id} was trained with "
            f"({detail}); use that entry's own tokenizer (drop model.tokenizer)"
        )


def tokenizer_differences(first: dict[str, Any], second: dict[str, Any]) -> str:
    """What differs between two tokenizer fingerprints ("vocab_size 101 vs 100, ..."); "" if nothing."""
    compared = ("vocab_size", "fingerprint", "eos_token_id", "pad_token_id")
    keys = [k for k in compared if k in first and k in second and first[k] != second[k]]
    return ", ".join(f"{k} {first[k]} vs {second[k]}" for k in keys)
