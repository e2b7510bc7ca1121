"""``weightedit compare-directions``: per-language directions, cosine matrix and transfer matrix."""

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
    LayerOpt,
    ModelOpt,
    OverwriteOpt,
    PositionOpt,
    QuietOpt,
    RevisionOpt,
    TokenOpt,
    emit_json,
    epilog,
    handle_errors,
    local_inputs,
    resolve_source,
    with_load_options,
    with_selection,
)


def register(app: typer.Typer) -> None:
    app.command(
        "compare-directions",
        epilog=epilog(
            "weightedit compare-directions --model recipe:qwen2.5-coder-1.5b-instruct --langs all --out report/",
            "weightedit compare-directions --model ./model --langs en,de,zh --layer 15 --position -1 --out cmp/",
        ),
    )(compare_directions)


@handle_errors
@with_selection(
    "n_train", "n_val", "batch_size", "prompts", "top_k", "max_kl", "allow_failing_filters", "check_generations"
)
@with_load_options
def compare_directions(
    model: ModelOpt,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for comparison.json, directions.safetensors and the PNGs.")
    ],
    selection: SelectionOptions,
    load: ModelLoadOptions,
    langs: LangsOpt = "all",
    reference: Annotated[
        str, typer.Option("--reference", help="Language whose selection fixes the layer and position.")
    ] = "en",
    layer: LayerOpt = None,
    position: PositionOpt = None,
    revision: RevisionOpt = None,
    gguf_file: GgufFileOpt = None,
    token: TokenOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compute one refusal direction per language and test how well each transfers to the others."""
    from weightedit.direction.crosslingual import compare_directions as run
    from weightedit.direction.crosslingual import save_comparison
    from weightedit.io.atomic import check_output_path
    from weightedit.prompts import parse_languages
    from weightedit.runtime.modeling import load_model

    check_output_path(out, inputs=local_inputs(model), overwrite=overwrite)
    codes = parse_languages(langs)
    parse_languages(reference, option="reference")
    if (layer is None) != (position is None):
        raise typer.BadParameter("give both --layer and --position, or neither", param_hint="--layer/--position")
    progress = not (quiet or json_out)
    source = resolve_source(model, gguf_file=gguf_file, revision=revision, token=token, quiet=not progress)
    out = check_output_path(out, inputs=(source.folder, *source.inputs), overwrite=overwrite)
    loaded = load_model(source, load, progress=progress)
    result = run(loaded, codes, selection, reference=reference, layer=layer, position=position, progress=progress)
    paths = save_comparison(result, out, overwrite=overwrite)
    if json_out:
        emit_json({**result.to_json(), "files": {k: str(v) for k, v in paths.items()}})
        return
    table = Table(title=f"refusal directions across languages (layer {result.layer}, position {result.position})")
    for col in ("language", "cos to reference", "baseline score", f"score, {reference} ablated", "score, own ablated"):
        table.add_column(col, justify="right")
    ref_index = result.langs.index(reference) if reference in result.langs else 0

    def score(value) -> str:
        value = float(value)
        return "does not refuse" if value != value else f"{value:.2f}"

    for i, lang in enumerate(result.langs):
        table.add_row(
            lang,
            f"{float(result.cosine[ref_index, i]):.3f}",
            score(result.baseline[i]),
            score(result.transfer[ref_index, i]),
            score(result.transfer[i, i]),
        )
    console.print(table)
    s = result.summary()
    console.print(
        f"cosine off-diagonal min {s['cosine_min_offdiag']:.3f}, mean {s['cosine_mean_offdiag']:.3f}; files in {out}"
    )
