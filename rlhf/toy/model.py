"""A tiny random-init Llama-style causal LM for the embedded default (~430k parameters).

Built from a `LlamaConfig`, so every code path that handles a real Llama checkpoint (save_pretrained,
AutoModelForCausalLM, ZeRO partitioning, KV-cache generation) runs unchanged on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load only when a model is built: configs import fast
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

# Bump when the architecture built from a ToyModelConfig changes, so old checkpoints stop matching.
_ARCH_VERSION = 1


@dataclass
class ToyModelConfig:
    """Shape of the toy Llama; the defaults give ~430k parameters with the 100-token vocabulary."""

    hidden_size: int = 128
    """Width of the residual stream (embedding size)."""
    num_layers: int = 2
    """Number of transformer decoder blocks."""
    num_heads: int = 4
    """Attention heads per block; must divide hidden_size."""
    intermediate_size: int = 352
    """Width of the SwiGLU MLP inside each block."""
    max_position_embeddings: int = 64
    """Longest sequence (prompt + response + specials) the model is meant to see, in tokens."""

    def validate(self) -> None:
        """Raise ValueError on a shape Llama cannot build."""
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"toy model: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"toy model: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )


def llama_config(cfg: ToyModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The LlamaConfig the toy model is built from; vocab and special ids come from the tokenizer."""
    from transformers import LlamaConfig

    cfg.validate()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Untied: the embedding is only 100 x hidden, and separate matrices keep ZeRO-3 gathering
        # and safetensors saving free of shared-tensor special cases.
        tie_word_embeddings=False,
        # Dropout off: PPO needs the same log-probs from the same weights on every forward.
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
    )


def build_model(
    cfg: ToyModelConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int, head: str = "lm"
) -> PreTrainedModel:
    """Build the toy model with random weights that depend only on (cfg, tokenizer, seed, head).

    head="lm" gives a LlamaForCausalLM; head="scalar" a LlamaForSequenceClassification with one
    label (a reward model or critic). The global torch RNG is forked, so building a model neither
    depends on nor disturbs the caller's random state; the same seed gives bitwise identical weights.
    """
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    config = llama_config(cfg, tokenizer)
    if head == "scalar":
        config.num_labels = 1
    model_class = {"lm": LlamaForCausalLM, "scalar": LlamaForSequenceClassification}[head]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def model_identity(cfg: ToyModelConfig) -> str:
    """A stable name for the architecture, e.g. "toy-llama-h128-l2-1a2b3c4d".

    The registry compares it between stages; the hash covers every field, so two configs that
    differ anywhere get different identities.
    """
    payload = json.dumps({"arch_version": _ARCH_VERSION, **asdict(cfg)}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:8]
    return f"toy-llama-h{cfg.hidden_size}-l{cfg.num_layers}-{digest}"
