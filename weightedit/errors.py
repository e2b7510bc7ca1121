"""Every error weightedit raises on purpose.

Each class also inherits the builtin exception a caller would expect, so ``except ValueError`` keeps
working. Messages are one line: what failed, the offending value, and what to do about it.
"""

from __future__ import annotations


class WeighteditError(Exception):
    """Base class of the errors weightedit raises for bad input or a failed precondition."""


class ModelNotFoundError(WeighteditError, FileNotFoundError):
    """The model path, Hub id or recipe could not be resolved to a checkpoint."""


class UnsupportedArchitectureError(WeighteditError, ValueError):
    """The checkpoint's ``model_type`` has no entry in the architecture registry."""


class InvalidCheckpointError(WeighteditError, ValueError):
    """A checkpoint file is corrupt, truncated, inconsistent with its index, or of an unsupported kind."""


class QuantizedCheckpointError(InvalidCheckpointError):
    """The checkpoint stores quantized weights (GPTQ, AWQ, bitsandbytes, ...) that cannot be edited exactly."""


class InvalidDirectionError(WeighteditError, ValueError):
    """The direction has the wrong size, a zero norm, non-finite values, or belongs to another model."""


class OutputExistsError(WeighteditError, FileExistsError):
    """The output folder exists and ``overwrite`` was not given."""


class UnsafeOutputError(WeighteditError, ValueError):
    """The output would be written into (or over) the input model."""


class WriteFailedError(WeighteditError, OSError):
    """Writing the output failed (for example the disk is full); nothing was left behind."""


class PromptsError(WeighteditError, ValueError):
    """A prompt source is missing, empty, malformed, or too small for what was asked."""


class ChatTemplateError(WeighteditError, ValueError):
    """The tokenizer has no usable chat template."""


class EvaluationError(WeighteditError, ValueError):
    """An evaluation cannot run as asked (unknown language, mismatched baseline, ...)."""


class RecipeError(WeighteditError, ValueError):
    """A recipe is unknown, malformed, or its offline mirror failed verification."""


class HubError(WeighteditError, RuntimeError):
    """A Hub operation failed (authentication, permissions, conflicts, network)."""
