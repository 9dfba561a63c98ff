"""What rlhf expects of the objects it gets from transformers, peft and DeepSpeed, as Protocols: the
attributes and methods the code calls on them, nothing more. A transformers tokenizer or model, a
peft model around one and a DeepSpeed engine satisfy them as they are (structural typing); the
classes themselves would tie every importer to those packages, and mypy does not follow them
(pyproject.toml), so a Protocol is what lets it check the calls.

Nothing from the training stack is imported here, at run time or for type checking, and nothing
from rlhf: any module may import this one without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, overload

import torch

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; typing_extensions comes with torch

ModuleT_co = TypeVar("ModuleT_co", covariant=True)

# A message of a chat: {"role": ..., "content": ...} (tool calls may add keys).
Message = dict[str, Any]


class Encoded(Protocol):
    """A tokenizer's encoding of one text (a transformers BatchEncoding): the ids by attribute or key."""

    @property
    def input_ids(self) -> list[int]: ...

    def __getitem__(self, key: str) -> list[int]: ...


class BatchEncoded(Protocol):
    """A tokenizer's encoding of a list of texts: one list of ids per text."""

    @property
    def input_ids(self) -> list[list[int]]: ...

    def __getitem__(self, key: str) -> list[list[int]]: ...


class Tokenizer(Protocol):
    """A Hugging Face tokenizer as rlhf uses it. rlhf.models.sources.load_tokenizer returns one with an
    EOS id and a pad id (a distinct pad where the vocabulary has one, else EOS)."""

    @property
    def pad_token_id(self) -> int: ...

    @property
    def eos_token_id(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token(self) -> str | None: ...

    @overload
    def __call__(self, text: str, *, add_special_tokens: bool = ..., return_attention_mask: bool = ...,
                 return_token_type_ids: bool = ...) -> Encoded: ...

    @overload
    def __call__(self, text: list[str], *, add_special_tokens: bool = ..., return_attention_mask: bool = ...,
                 return_token_type_ids: bool = ...) -> BatchEncoded: ...

    def decode(self, token_ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = ...) -> str: ...

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, *, skip_special_tokens: bool = ...) -> list[str]: ...

    @overload
    def apply_chat_template(self, conversation: list[Message], *, tokenize: Literal[False], add_generation_prompt: bool = ...,
                            chat_template: str | None = ...) -> str: ...

    @overload
    def apply_chat_template(self, conversation: list[Message], *, tokenize: Literal[True], add_generation_prompt: bool = ...,
                            chat_template: str | None = ...) -> list[int] | Encoded: ...

    def get_vocab(self) -> dict[str, int]: ...

    def __len__(self) -> int: ...

    def save_pretrained(self, save_directory: str | Path) -> object: ...


class HFConfig(Protocol):
    """A transformers model config (PretrainedConfig): the fields rlhf reads. Others are read with getattr."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    num_labels: int
    pad_token_id: int | None
    use_cache: bool

    def to_dict(self) -> dict[str, Any]: ...


class LMOutput(Protocol):
    """A causal LM's forward output (transformers' CausalLMOutput): the logits, (B, T, V)."""

    @property
    def logits(self) -> torch.Tensor: ...


class GenerateOutput(Protocol):
    """What generate returns with return_dict_in_generate=True: the ids, prompt included, and with
    output_logits=True the raw logits of each new token, (B, V) each."""

    @property
    def sequences(self) -> torch.Tensor: ...

    @property
    def logits(self) -> tuple[torch.Tensor, ...] | None: ...


class Module(Protocol):
    """The torch.nn.Module methods rlhf calls on a model it did not define (a transformers or peft model)."""

    @property
    def training(self) -> bool: ...

    def parameters(self, recurse: bool = ...) -> Iterator[torch.nn.Parameter]: ...

    def modules(self) -> Iterator[torch.nn.Module]: ...

    def requires_grad_(self, requires_grad: bool = ...) -> Self: ...

    def train(self, mode: bool = ...) -> Self: ...

    def eval(self) -> Self: ...

    def to(self, *args: Any, **kwargs: Any) -> Self: ...

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def named_buffers(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...


class CausalLM(Module, Protocol):
    """A transformers causal LM, or a peft model around one: called with input_ids, attention_mask,
    position_ids and the like (passed through, as transformers takes them), and generate."""

    @property
    def config(self) -> HFConfig: ...

    def __call__(self, *args: Any, **kwargs: Any) -> LMOutput: ...

    def generate(self, *args: Any, **kwargs: Any) -> GenerateOutput: ...  # rlhf asks for return_dict_in_generate

    def save_pretrained(self, save_directory: str | Path, *, state_dict: dict[str, torch.Tensor] | None = ...) -> object: ...


class Scorer(Module, Protocol):
    """A backbone with a scalar head (rlhf.models.loading.ScalarModel: a reward model or a critic):
    (B, T) ids and mask in, (B, T) scores out."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None = ...) -> torch.Tensor: ...


class TrainEngine(Protocol[ModuleT_co]):
    """A DeepSpeed engine as the stages drive it, around a module of type ModuleT_co: its forward
    is the module's, then backward and step, the learning rate and gradient norm, and checkpoints."""

    @property
    def module(self) -> ModuleT_co: ...

    @property
    def training(self) -> bool: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> object: ...

    def step(self) -> object: ...

    def train(self, mode: bool = ...) -> object: ...

    def eval(self) -> object: ...

    def parameters(self, recurse: bool = ...) -> Iterator[torch.nn.Parameter]: ...

    def get_lr(self) -> list[float]: ...

    def get_global_grad_norm(self) -> float | None: ...

    def zero_optimization_stage(self) -> int: ...

    def save_checkpoint(self, save_dir: str | Path, tag: str | None = ..., client_state: dict[str, Any] | None = ...,
                        save_latest: bool = ...) -> object: ...

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = ...) -> tuple[str | None, dict[str, Any]]: ...


class AdapterLM(CausalLM, Protocol):
    """A causal LM inside peft's LoRA wrapper: its adapters can be switched off for a call, and the
    transformers model inside it reached."""

    def disable_adapter(self) -> AbstractContextManager[object]: ...

    def get_base_model(self) -> CausalLM: ...



class Environment(Protocol):
    """A multi-turn environment (rollout.env, e.g. rlhf.tasks.envs.ToolEnv): the user's code, so what it
    returns is checked where it is called (rlhf.rollouts.multiturn's checked_reset and checked_step)."""

    def reset(self, prompt: str) -> object: ...

    def step(self, text: str) -> object: ...


class StoppingCriterion(Protocol):
    """What `generate(stopping_criteria=[...])` calls after each new token: (B,) bool, True where a row is done."""

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor: ...


StoppingCriteria = list[StoppingCriterion]
"""transformers' StoppingCriteriaList (a list subclass): a row ends when any criterion says so."""


PolicyModel = CausalLM | TrainEngine[CausalLM]
"""A causal LM, or the DeepSpeed engine around one: both are called the same way for logits."""

ScoringModel = Scorer | TrainEngine[Scorer]
"""A reward model or critic, or the DeepSpeed engine around one: both are called the same way for scores."""


def inner_model(model: PolicyModel) -> CausalLM:
    """The causal LM itself: an engine's module, or `model` when it is not wrapped."""
    return model.module if hasattr(model, "module") else model
