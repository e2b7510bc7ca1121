"""``weightedit judge``: refusal verdicts for the responses of a JSONL file, with a per-language summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from weightedit._progress import console
from weightedit.render.format import percent

from ._options import JsonOpt, OverwriteOpt, PromptsOpt, QuietOpt, emit_json, epilog, handle_errors


def register(app: typer.Typer) -> None:
    app.command(
        "judge",
        epilog=epilog(
            "weightedit judge --input generations.jsonl --out judged.jsonl",
            "weightedit judge --input generations.jsonl --judge model:./refusal-classifier --out judged.jsonl",
            "weightedit judge --input rows.jsonl --judge score --model recipe:smollm2-135m-instruct --out judged.jsonl",
        ),
    )(judge)


def render(result) -> None:
    table = Table(title=f"{result.judge} judge: {len(result.rows)} responses")
    hedged = all("hedged" in v for v in result.per_language.values())
    cols = ["language", "n", "refused", "rate [95% CI]"] + (["of which hedged"] if hedged else [])
    if result.labelled:
        cols += ["accuracy", "precision", "recall"]
    for col in cols:
        table.add_column(col, justify="right")
    from weightedit.prompts import LANGUAGE_NAMES

    for lang, v in result.per_language.items():
        lo, hi = v["ci"]
        row = [f"{LANGUAGE_NAMES.get(lang, lang)} ({lang})", str(v["n"]), str(v["refused"])]
        row.append(f"{percent(v['rate'])} [{percent(lo)}, {percent(hi)}]")
        if hedged:
            row.append(str(v["hedged"]))
        if result.labelled:
            a = v["agreement"]
            row += ["—" if a[k] is None else f"{a[k]:.2f}" for k in ("accuracy", "precision", "recall")]
        table.add_row(*row)
    console.print(table)
    note = "rate = share judged refused; interval: Wilson 95%"
    if hedged:
        note += "; hedged = refusals that decline something specific and offer help (rows' 'hedge'), counted as refused"
    if result.labelled:
        note += "; accuracy/precision/recall against the input's own 'refused' labels (kept as refused_input)"
    console.print(note)


@handle_errors
def judge(
    input: Annotated[
        Path,
        typer.Option("--input", "-i", help="JSONL file: one object per line with lang and response (prompt optional)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help='Output JSONL: the input rows plus "refused": true|false.')],
    judge: Annotated[
        str,
        typer.Option(
            "--judge",
            help="substring (rules per language), score (asks --model about each row's prompt), or model:PATH (a local classifier).",
        ),
    ] = "substring",
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model for --judge score (Hub id, folder, .gguf, recipe:NAME).")
    ] = None,
    prompts: PromptsOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Judge each response (after any <think>…</think> block): refusal or not, with a per-language summary."""
    from weightedit.evaluation.judge_file import judge_file

    result = judge_file(
        input,
        out,
        judge,
        model=model,
        prompts=str(prompts) if prompts else None,
        overwrite=overwrite,
        progress=not (quiet or json_out),
    )
    if json_out:
        emit_json(result.summary())
        return
    render(result)
    console.print(f"wrote {result.out}")
