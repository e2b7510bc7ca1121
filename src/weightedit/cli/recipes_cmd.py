"""``weightedit recipes`` and ``weightedit fetch``: known models and getting them onto this machine."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from weightedit._progress import console

from ._options import JsonOpt, QuietOpt, emit_json, epilog, handle_errors, quiet_libraries


def register(app: typer.Typer) -> None:
    app.command("recipes", epilog=epilog("weightedit recipes", "weightedit recipes --json"))(recipes)
    app.command(
        "fetch",
        epilog=epilog(
            "weightedit fetch qwen2.5-coder-1.5b-instruct", "weightedit fetch smollm2-135m-instruct --source hub"
        ),
    )(fetch)


@handle_errors
def recipes(json_out: JsonOpt = False) -> None:
    """List the known models (the recipe files) and where their weights come from."""
    from weightedit.sources.recipes import list_recipes

    items = list_recipes()
    if json_out:
        emit_json(
            [
                {
                    "name": r.name,
                    "hub_id": r.hub_id,
                    "revision": r.revision,
                    "source": r.source,
                    "mirror": r.mirror.file if r.mirror else None,
                    "demo": r.demo,
                    "description": r.description,
                }
                for r in items
            ]
        )
        return
    table = Table(title="recipes")
    for col in ("name", "Hub id", "source", "offline mirror", "notes"):
        table.add_column(col)
    for r in items:
        table.add_row(
            r.name + (" (demo)" if r.demo else ""),
            r.hub_id,
            r.source,
            r.mirror.file if r.mirror else "—",
            r.description,
        )
    console.print(table)
    console.print("use one as --model recipe:NAME, or fetch it with `weightedit fetch NAME`")


@handle_errors
def fetch(
    name: Annotated[str, typer.Argument(help="Recipe name (see `weightedit recipes`).")],
    source: Annotated[str | None, typer.Option("--source", help="mirror or hub (default: the recipe's own).")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download (and verify, and convert) a recipe's model into the cache; print its local folder."""
    from weightedit.sources.recipes import fetch_recipe

    if source not in (None, "mirror", "hub"):
        raise typer.BadParameter("must be mirror or hub", param_hint="--source")
    quiet_libraries(quiet or json_out)
    result = fetch_recipe(name, source=source, progress=not (quiet or json_out))
    if json_out:
        emit_json({"folder": str(result.folder), **result.provenance()})
        return
    # The folder goes to stdout alone, so that `$(weightedit fetch NAME)` is the path.
    if not quiet:
        console.print(f"{name} is ready in:", highlight=False)
    typer.echo(str(result.folder))
