"""``weightedit demo``: the whole mission on the demo model, from nothing, on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from weightedit._progress import console

from ._options import (
    AllowNonRefusingOpt,
    BatchOpt,
    CheckGenerationsOpt,
    GenerateOpt,
    MaxNewTokensOpt,
    PromptsOpt,
    QuietOpt,
    epilog,
    handle_errors,
    quiet_libraries,
)
from .evaluate_cmd import render_summary


def register(app: typer.Typer) -> None:
    app.command(
        "demo",
        epilog=epilog("weightedit demo", "weightedit demo --out ./demo --langs en,de,zh --generate 4"),
    )(demo)


@handle_errors
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the direction, the edited model and the report.")
    ] = Path("weightedit-demo"),
    recipe: Annotated[str | None, typer.Option("--recipe", help="Recipe to run (default: the demo model).")] = None,
    langs: Annotated[str, typer.Option("--langs", help="Languages to evaluate: all, or a comma list.")] = "all",
    direction_lang: Annotated[
        str, typer.Option("--direction-lang", help="Language of the prompts the direction is computed from.")
    ] = "en",
    n_train: Annotated[int, typer.Option("--n-train", help="Prompts per kind for the direction.")] = 32,
    n_val: Annotated[int, typer.Option("--n-val", help="Prompts per kind for selection.")] = 12,
    limit: Annotated[
        int, typer.Option("--limit", help="Held-out harmful and harmless prompts per language in the evaluation.")
    ] = 8,
    generate: GenerateOpt = None,
    generate_harmless: Annotated[
        int,
        typer.Option(
            "--generate-harmless",
            help="Harmless prompts per language to complete and judge (over-refusal; 0 = not measured, the demo's "
            "budget: use `weightedit evaluate` for it).",
        ),
    ] = 0,
    max_new_tokens: MaxNewTokensOpt = 64,
    prompts: PromptsOpt = None,
    batch_size: BatchOpt = 16,
    allow_non_refusing: AllowNonRefusingOpt = False,
    check_generations: CheckGenerationsOpt = 8,
    quiet: QuietOpt = False,
) -> None:
    """Fetch the demo model, compute its English refusal direction, edit it, and evaluate it in 14 languages."""
    from weightedit.demo import DemoOptions, run_demo
    from weightedit.prompts import parse_languages

    quiet_libraries(quiet)
    options = DemoOptions(
        recipe=recipe,
        out=out,
        langs=tuple(parse_languages(langs)),
        direction_lang=parse_languages(direction_lang, option="direction_lang")[0],
        n_train=n_train,
        n_val=n_val,
        limit=limit,
        generate=generate,
        generate_harmless=generate_harmless,
        max_new_tokens=max_new_tokens,
        prompts=prompts,
        batch_size=batch_size,
        allow_non_refusing=allow_non_refusing,
        check_generations=check_generations,
        progress=not quiet,
    )
    result = run_demo(options)
    render_summary(result.report)
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items())
    console.print(f"stages: {stages}" + (f" (reused: {', '.join(result.reused)})" if result.reused else ""))
    console.print(f"edited model: {result.out / 'model'}")
    console.print(f"report: {result.files['md']}  ·  {result.files['json']}")
    console.print("plots: " + ", ".join(str(p) for k, p in result.files.items() if k.endswith("png")))
