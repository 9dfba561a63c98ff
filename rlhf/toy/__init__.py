"""The embedded default: a local tokenizer, a tiny random-init Llama and a synthetic task whose
labeler is a deterministic oracle, so the whole pipeline runs offline and can be checked against
ground truth."""

from rlhf.toy.model import ToyModelConfig, build_model, model_identity
from rlhf.toy.task import ToyTask, ToyTaskConfig, oracle_score

TOY = "toy"
"""The sentinel users put in config (`model.name_or_path: toy`, `data.train: toy`)."""



def __getattr__(name: str):
    # The tokenizer needs transformers; loading it on first use keeps `import rlhf.toy` light.
    if name == "build_tokenizer":
        from rlhf.toy.tokenizer import build_tokenizer

        return build_tokenizer
    raise AttributeError(f"module 'rlhf.toy' has no attribute {name!r}")


__all__ = [
    "TOY",
    "ToyModelConfig",
    "ToyTask",
    "ToyTaskConfig",
    "build_model",
    "build_tokenizer",
    "model_identity",
    "oracle_score",
]
