"""Error messages in the command line's terms: one table from each kind of error to its wording.

Library errors name the options they concern by their library names (``<<out>>``, ``<<kl_threshold>>``) and carry
their facts as fields; this module is the only place that knows which flag sets which option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from weightedit.errors import (
    FilterFailedDirectionError,
    NotRefusingError,
    OptionsError,
    SelectionError,
    WeighteditError,
    render_options,
)

# Library option names whose flag is not simply ``--`` + the name with dashes (``n_train`` -> ``--n-train``).
FLAGS = {
    "kl_threshold": "--max-kl",
    "max_layer_fraction": "the layer limit (0.8 of the depth)",
    "layer/position": "--layer/--position",
}


def flag(option: str) -> str:
    """The command-line flag that sets the library option ``option``."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def _selection(error: SelectionError) -> str:
    return (
        f"no candidate direction passes the KL filter (KL ≤ {error.max_kl}; {error.scored} scored exactly); best "
        f"by bypass: {'; '.join(error.candidates)}: relax it with --max-kl, keep the best anyway with "
        "--allow-failing-filters, or search further with --search thorough or more prompts (--n-train, --n-val)"
    )


def _not_refusing(error: NotRefusingError) -> str:
    return (
        f"the model does not refuse in {error.lang}: {error.reason}; there is no refusal direction to find there: "
        "choose a language it refuses in, or pass --allow-non-refusing"
    )


def _filter_failed(error: FilterFailedDirectionError) -> str:
    return (
        f"{error.source} failed its KL filter at selection (KL {error.kl} > {error.max_kl}): an edit with it "
        "damages ordinary answers; choose another direction, or pass --allow-failing-filters to write it anyway"
    )


def _option(error: OptionsError) -> str:
    return f"{flag(error.option)} {error.value}: {render_options(error.problem, flag)}"


# The wording of each kind of error that the command line words its own way; every other error is its own
# message with its options named by their flags.
MESSAGES: dict[type[WeighteditError], Callable[[Any], str]] = {
    SelectionError: _selection,
    NotRefusingError: _not_refusing,
    FilterFailedDirectionError: _filter_failed,
    OptionsError: _option,
}


def cli_message(error: WeighteditError) -> str:
    """The one line the command line prints for ``error``."""
    for kind in type(error).__mro__:
        render = MESSAGES.get(kind)
        if render is not None:
            return render(error)
    return render_options(error.template, flag)
