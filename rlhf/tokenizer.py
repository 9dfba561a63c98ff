"""The tokenizer of a model, and its identity: token ids mean nothing to a model trained on other
ids, so a tokenizer is checked against the one each registry parent was trained with.

(Named `tokenizer`, not `tokenizers`: run as a script from this folder, a `tokenizers.py` here would
shadow the Hugging Face package of that name.)
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from rlhf.errors import UserError, first_line, remote_code_hint

if TYPE_CHECKING:
    from rlhf.model_sources import ModelSource
    from rlhf.registry import Entry


def load_tokenizer(
    source: ModelSource, *, trust_remote_code: bool, name_or_path: str | None = None, key: str = "model.tokenizer"
) -> Any:
    """The tokenizer of a model (or `name_or_path` instead), with a pad token that is not EOS where
    one can be found. When the model comes from a registry entry, the tokenizer must be the one
    that entry was trained with: token ids mean nothing to a model trained on other ids."""
    if source.kind == "toy" and name_or_path is None:
        from rlhf.toy import build_tokenizer

        tokenizer = build_tokenizer()
    else:
        tokenizer = _pretrained_tokenizer(name_or_path or source.location, trust_remote_code=trust_remote_code, key=key)
    if source.entry is not None and source.entry.tokenizer:
        _check_same_tokenizer(tokenizer, source.entry, where=f"{key}={name_or_path}" if name_or_path else source.location)
    return tokenizer


def _pretrained_tokenizer(location: str, *, trust_remote_code: bool, key: str) -> Any:
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


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
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


def check_same_tokenizer(tokenizer: Any, source: ModelSource, *, key: str, trust_remote_code: bool = False) -> None:
    """Stop when the model at `source` was trained with another tokenizer than `tokenizer`: PPO feeds
    the actor's token ids to the reference, critic and reward model alike."""
    if source.entry is not None and source.entry.tokenizer:
        theirs = source.entry.tokenizer
    else:
        theirs = tokenizer_fingerprint(load_tokenizer(source, trust_remote_code=trust_remote_code, key=key))
    detail = _tokenizer_differences(theirs, tokenizer_fingerprint(tokenizer))
    if detail:
        raise UserError(
            f"{key}: {source.entry.id if source.entry else source.location} uses another tokenizer than the actor "
            f"({detail}); it would read the actor's token ids as other words, so use a model of the same lineage"
        )


def _check_same_tokenizer(tokenizer: Any, entry: Entry, *, where: str) -> None:
    detail = _tokenizer_differences(tokenizer_fingerprint(tokenizer), entry.tokenizer)
    if detail:
        raise UserError(
            f"the tokenizer of {where} differs from the one {entry.stage} entry {entry.id} was trained with "
            f"({detail}); use that entry's own tokenizer (drop model.tokenizer)"
        )


def _tokenizer_differences(first: dict[str, Any], second: dict[str, Any]) -> str:
    """What differs between two tokenizer fingerprints ("vocab_size 101 vs 100, ..."); "" if nothing."""
    compared = ("vocab_size", "fingerprint", "eos_token_id", "pad_token_id")
    keys = [k for k in compared if k in first and k in second and first[k] != second[k]]
    return ", ".join(f"{k} {first[k]} vs {second[k]}" for k in keys)
