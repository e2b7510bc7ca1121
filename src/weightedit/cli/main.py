"""Entry point: ``weightedit <command>``.

Every command module imports the library inside its command function, not at the top: the library brings
torch, transformers and matplotlib, and with them `weightedit --help` takes 2.4 s instead of 0.3 s (measured on
the 2-core development machine).
"""

from __future__ import annotations

import typer

from weightedit import __version__

from . import (
    compare_cmd,
    defence_cmd,
    demo_cmd,
    direction_cmd,
    evaluate_cmd,
    hub_cmd,
    inspect_cmd,
    judge_cmd,
    optimize_cmd,
    orthogonalize_cmd,
    recipes_cmd,
)

app = typer.Typer(
    name="weightedit",
    help="Find the refusal direction of a chat LLM in any language and project it out of the weights.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"weightedit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """weightedit: refusal directions, weight orthogonalization and multilingual evaluation."""


for module in (
    demo_cmd,
    direction_cmd,
    orthogonalize_cmd,
    optimize_cmd,
    evaluate_cmd,
    judge_cmd,
    compare_cmd,
    hub_cmd,
    defence_cmd,
    inspect_cmd,
    recipes_cmd,
):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
