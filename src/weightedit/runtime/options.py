"""How a model is loaded to run: one set of options for every command and function that runs a model."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..errors import enum_option

__all__ = ["Dtype", "ModelLoadOptions", "dtype_option"]


class Dtype(str, Enum):
    """The compute dtype: ``auto`` is float32 on CPUs and bfloat16 on GPUs that support it (else float16)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


def dtype_option(value: Dtype | str) -> Dtype:
    """``value`` as a :class:`Dtype`.

    Raises:
        OptionsError: it is not one of them.
    """
    return enum_option("dtype", value, Dtype)


@dataclass(frozen=True)
class ModelLoadOptions:
    """How to load a model to run it; checked on construction.

    Attributes:
        dtype: :class:`Dtype` to compute in (checkpoints on disk keep their stored dtype).
        device_map: accelerate device map (``auto`` spreads a large model over the GPUs and CPU); ``None``
            puts the whole model on the GPU if there is one, else on the CPU.
        chat_template: a Jinja file used when the tokenizer has no chat template (or to override it).
        trust_remote_code: allow the model repo's own modeling code. It changes how a model loads, never what
            is measured, so it is no part of any cache key.
    """

    dtype: Dtype | str = Dtype.AUTO
    device_map: str | None = None
    chat_template: str | None = None  # a path (given as a path, it is kept as its string)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_option(self.dtype))
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", str(self.chat_template))
        if self.device_map == "":
            object.__setattr__(self, "device_map", None)
