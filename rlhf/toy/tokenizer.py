"""A character-level tokenizer built locally, so the embedded default needs no model hub.

One token per character of printable ASCII plus newline, so any English text or chat template
round-trips exactly; anything else maps to `<unk>`. The vocabulary is a fixed list, so ids are the
same on every machine and every run.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)

# Printable ASCII (space .. '~') in code-point order, then newline. `string.printable` also holds
# \t \r \x0b \x0c, which we leave out: they would map to <unk>, a chat template never needs them.
CHARACTERS: tuple[str, ...] = tuple(chr(c) for c in range(0x20, 0x7F)) + ("\n",)
assert len(set(CHARACTERS)) == len(CHARACTERS) and set(string.digits) <= set(CHARACTERS)


def build_vocab() -> dict[str, int]:
    """Token -> id: the special tokens first (pad=0, bos=1, eos=2, unk=3), then the characters."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the toy tokenizer (100 tokens); deterministic, no files or network needed.

    `encode(text)` prepends `<s>` only when `add_special_tokens=True`; the data layer appends
    `</s>` itself. Padding uses `<pad>`, which is not `</s>`, so a pad never reads as an end.
    """
    vocab = build_vocab()
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own "word" ([\s\S] rather than "." so newline matches too); spaces
    # are kept as tokens.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins tokens with no separator, so decode() never inserts spaces between characters.
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    # Register the specials so they are matched whole in text and skipped by skip_special_tokens.
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        # The default clean-up rewrites " ." to "." and the like, which would break round-trips.
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
