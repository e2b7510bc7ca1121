"""``weightedit direction``: compute and select the refusal direction from prompts in any language."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from weightedit._progress import console
from weightedit.direction.options import SelectionOptions
from weightedit.runtime.options import ModelLoadOptions

from ._options import (
    GgufFileOpt,
    JsonOpt,
    LangsOpt,
    ModelOpt,
    OldLangOpt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    TokenOpt,
    emit_json,
    epilog,
    handle_errors,
    local_inputs,
    one_spelling,
    resolve_source,
    with_load_options,
    with_selection,
)


def register(app: typer.Typer) -> None:
    app.command(
        "direction",
        epilog=epilog(
            "weightedit direction --model recipe:qwen2.5-coder-1.5b-instruct --langs en --out refusal.safetensors",
            "weightedit direction --model ./model --langs de --n-train 128 --search thorough --out de.safetensors",
            "weightedit direction --model ./model --langs en --prompts ../shared/data/polyrefuse --out r.safetensors",
        ),
    )(direction)


def render_candidates(result) -> None:
    table = Table(title=f"refusal direction candidates ({', '.join(result.direction.languages)})")
    for col in ("layer", "position", "bypass ↓", "induce", "KL", "pre-screen bypass", "passes"):
        table.add_column(col, justify="right")
    chosen_mark = {
        "passed": "[bold green]✔ chosen[/]",
        "kl-only": "[bold yellow]chosen (induce filter failed)[/]",
        "failed-filters": "[bold red]chosen (KL filter failed)[/]",
    }[result.status]
    for s in result.top(10):
        mark = (
            chosen_mark
            if s is result.chosen
            else ("yes" if s.passes_filters else ("no" if s.passes_filters is False else "—"))
        )

        def f(x):
            return "—" if x is None else f"{x:.3f}"

        table.add_row(str(s.layer), str(s.position), f(s.bypass), f(s.induce), f(s.kl), f(s.prescreen_bypass), mark)
    console.print(table)
    b = result.baseline
    tokens = ", ".join(f"{lang}: {' '.join(t.tokens)}" for lang, t in result.refusal_tokens.items())
    checks = ", ".join(
        f"{lang}: {t.judged}/{t.generated} judged refusals" for lang, t in result.refusal_tokens.items() if t.generated
    )
    console.print(
        f"baseline refusal score: harmful {b['harmful_refusal_score']:.2f}, harmless {b['harmless_refusal_score']:.2f}; "
        f"refusal tokens {tokens}" + (f"; {checks}" if checks else "")
    )
    search = result.search
    if search.get("strategy") == "fast":
        rho = search.get("spearman_prescreen_vs_exact")
        console.print(
            f"fast search: {search['prescreened']} candidates pre-screened, {search['scored']} scored exactly"
            + (f" (pre-screen vs exact bypass: Spearman {rho:.2f})" if rho is not None else "")
        )
    if result.status != "passed":
        console.print(f"[bold yellow]warning:[/] {result.note}")


@handle_errors
@with_selection()
@with_load_options
def direction(
    model: ModelOpt,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Direction file to write (.safetensors); scores go to <name>.scores.json."),
    ],
    selection: SelectionOptions,
    load: ModelLoadOptions,
    langs: LangsOpt = "en",
    revision: RevisionOpt = None,
    gguf_file: GgufFileOpt = None,
    token: TokenOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    lang: OldLangOpt = None,
) -> None:
    """Compute the refusal direction (difference of means) and select the best layer and position."""
    from weightedit.prompts import parse_languages
    from weightedit.workflows import check_direction_output, direction_for_model, save_direction_result, scores_payload

    langs = one_spelling(langs, lang)
    parse_languages(langs)
    check_direction_output(out, inputs=local_inputs(model), overwrite=overwrite)
    source = resolve_source(model, gguf_file=gguf_file, revision=revision, token=token, quiet=quiet or json_out)
    check_direction_output(out, inputs=(source.folder, *source.inputs), overwrite=overwrite)
    result = direction_for_model(source, langs, selection, load=load, progress=not (quiet or json_out))
    path, scores = save_direction_result(result, out)
    if json_out:
        emit_json(
            {
                "direction": str(path),
                "scores": str(scores),
                **{k: v for k, v in scores_payload(result).items() if k != "candidates"},
            }
        )
        return
    render_candidates(result)
    console.print(f"wrote {path} (layer {result.direction.layer}, position {result.direction.position}) and {scores}")
