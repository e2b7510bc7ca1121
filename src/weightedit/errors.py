"""Every error weightedit raises on purpose.

Each class also inherits the builtin exception a caller would expect, so ``except ValueError`` keeps
working. Messages are one line: what failed, the offending value, and what to do about it.

A message names the options it concerns by their names in the library, marked ``<<out>>`` or ``<<gguf_file>>``:
``str(error)`` shows the names (``out``, ``gguf_file``), and the command line shows its flags instead (``--out``,
``--gguf-file``; ``weightedit.cli._messages``), so that no library message is written in terms of the command line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from enum import Enum
from typing import TypeVar

_OPTION = re.compile(r"<<(\w+)>>")


def render_options(template: str, name: Callable[[str], str]) -> str:
    """``template`` with each ``<<option>>`` marker replaced by ``name(option)``."""
    return _OPTION.sub(lambda m: name(m.group(1)), template)


class WeighteditError(Exception):
    """Base class of the errors weightedit raises for bad input or a failed precondition.

    Attributes:
        template: the message with its options marked (``<<out>>``); ``str()`` renders them by name.
        path: the file or folder the error is about, when there is one.
        option: the library option it is about, when there is one.
        value: the value given for it.
    """

    def __init__(
        self,
        message: str = "",
        *,
        path: str | os.PathLike[str] | None = None,
        option: str | None = None,
        value: object = None,
    ) -> None:
        super().__init__(render_options(message, lambda name: name))
        self.template = message
        self.path = path
        self.option = option
        self.value = value

    def __str__(self) -> str:
        return render_options(self.template, lambda name: name)


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


_E = TypeVar("_E", bound=Enum)


def enum_option(option: str, value: object, kind: type[_E]) -> _E:
    """``value`` as a member of the choice enum ``kind``.

    Raises:
        OptionsError: naming ``option``, when ``value`` is none of ``kind``'s values.
    """
    try:
        return kind(value)
    except ValueError:
        raise OptionsError(option, value, f"must be one of {', '.join(str(k.value) for k in kind)}") from None


class OptionsError(WeighteditError, ValueError):
    """An option has a value the library cannot use.

    Attributes:
        option: the option's name in the library (``kl_threshold``); the CLI maps it to its flag.
        value: the value given.
        problem: what is wrong with it and what is allowed.
    """

    option: str

    def __init__(self, option: str, value: object, problem: str) -> None:
        self.problem = problem
        super().__init__(f"{option}={value!r}: {problem}", option=option, value=value)


class SelectionError(WeighteditError, ValueError):
    """No candidate direction passed the KL filter, so none can be edited out without damaging the model.

    Attributes:
        candidates: the best candidates by bypass score, described (layer, position, bypass, KL).
        max_kl: the KL filter that all of them failed.
        scored: how many candidates were scored exactly.
    """

    def __init__(self, *, candidates: list[str], max_kl: float, scored: int) -> None:
        self.candidates, self.max_kl, self.scored = candidates, max_kl, scored
        super().__init__(
            f"no candidate direction passes the KL filter (KL ≤ {max_kl}; {scored} scored exactly); best by bypass: "
            f"{'; '.join(candidates)}: raise kl_threshold, set allow_failing_filters, search thoroughly, or use "
            "more prompts"
        )


class NotRefusingError(WeighteditError, ValueError):
    """The model does not refuse in a language, so it has no refusal direction there.

    Attributes:
        lang: the language code.
        reason: the evidence (refusal-token contrast, judged completions).
    """

    def __init__(self, *, lang: str, reason: str) -> None:
        self.lang, self.reason = lang, reason
        super().__init__(f"the model does not refuse in {lang}: {reason}; set allow_non_refusing to use it anyway")


class FilterFailedDirectionError(WeighteditError, ValueError):
    """A direction whose selection failed the KL filter was given to an edit that was not told to accept it."""

    def __init__(self, *, source: str, kl: float | None, max_kl: float | None) -> None:
        self.source, self.kl, self.max_kl = source, kl, max_kl
        super().__init__(
            f"{source} failed its KL filter at selection (KL {kl} > {max_kl}): an edit with it damages ordinary "
            "answers; choose another direction, or set allow_failing_filters to write it anyway"
        )


class OptimizeTargetError(WeighteditError, RuntimeError):
    """No judged point of an optimisation study met the refusal target, so no model was written.

    Attributes:
        target: the judged refusal rate the choice rule held the points to.
        misses: what each judged point missed.
        report: the study report that shows the front.
        rule: the choice rule (``interval`` or ``strict``, :class:`weightedit.optimize.options.ChoiceRule`).
        fix: what to do instead of the default advice (more trials, a higher target, more judged points), when
            that cannot help (every trial was over the per-language KL bound, so none was judged).
    """

    def __init__(
        self, *, target: float, misses: str, report: str, rule: str = "strict", fix: str | None = None
    ) -> None:
        self.target, self.misses, self.report, self.rule = target, misses, report, rule
        bar = (
            f"pooled refusal at or under {100 * target:g}% over the languages that refuse, none of them "
            "significantly above it"
            if rule == "interval"
            else f"refusal at or under {100 * target:g}% in every language that refuses"
        )
        super().__init__(
            f"no judged point of the study keeps {bar} ({misses}); nothing was written; the front is in {report}: "
            + (fix or "run more trials, raise <<target_refusal>>, or judge more points (<<verify>>)"),
            path=report,
        )
