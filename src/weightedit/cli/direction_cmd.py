"""``weightedit direction``: compute and select the refusal direction from prompts in any language."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from weightedit._progress import console

from ._options import (
    DeviceMapOpt,
    DtypeOpt,
    GgufFileOpt,
    JsonOpt,
    ModelOpt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    TokenOpt,
    TrustRemoteCodeOpt,
    emit_json,
    epilog,
    handle_errors,
    local_inputs,
    resolve_source,
)

LangOpt = Annotated[
    str, typer.Option("--lang", "-l", help="Prompt language(s): en, or en,zh,ar (unit directions are averaged).")
]
NTrainOpt = Annotated[
    int, typer.Option("--n-train", help="Harmful and harmless prompts (each) for the mean difference.")
]
NValOpt = Annotated[int, typer.Option("--n-val", help="Held-out harmful and harmless prompts (each) for selection.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass.")]
PromptsOpt = Annotated[
    str | None,
    typer.Option(
        "--prompts", help="Prompt source: JSONL/CSV file, folder (PolyRefuse layout), or hf://datasets/ORG/NAME."
    ),
]
SearchOpt = Annotated[
    str,
    typer.Option(
        "--search",
        help="fast: screen all candidates, score the best --top-k exactly; thorough: score all exactly (GPU).",
    ),
]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Candidates scored exactly in the fast search.")]
LayerOpt = Annotated[int | None, typer.Option("--layer", help="Use this layer instead of selecting one.")]
PositionOpt = Annotated[
    int | None, typer.Option("--position", help="Use this post-instruction position (-1 = last token).")
]
ChatTemplateOpt = Annotated[
    Path | None, typer.Option("--chat-template", help="Jinja chat template for a tokenizer without one.")
]


def register(app: typer.Typer) -> None:
    app.command(
        "direction",
        epilog=epilog(
            "weightedit direction --model recipe:qwen2.5-coder-1.5b-instruct --lang en --out refusal.safetensors",
            "weightedit direction --model ./model --lang de --n-train 128 --search thorough --out de.safetensors",
            "weightedit direction --model ./model --lang en --prompts ../shared/data/polyrefuse --out r.safetensors",
        ),
    )(direction)


MaxKlOpt = Annotated[
    float, typer.Option("--max-kl", help="KL filter (nats on harmless prompts): candidates above it are never chosen.")
]
AllowFailingOpt = Annotated[
    bool,
    typer.Option(
        "--allow-failing-filters",
        help="When no candidate passes the KL filter, keep the lowest bypass anyway (recorded; the model may degrade).",
    ),
]
AllowNonRefusingOpt = Annotated[
    bool,
    typer.Option("--allow-non-refusing", help="Use a language the model does not refuse in (its scores mean little)."),
]
CheckGenerationsOpt = Annotated[
    int,
    typer.Option(
        "--check-generations",
        help="Harmful training prompts completed and judged to confirm each language refuses (0 skips the check).",
    ),
]


def selection_options(
    n_train: int,
    n_val: int,
    batch_size: int,
    search: str,
    top_k: int,
    layer: int | None,
    position: int | None,
    prompts: str | None,
    *,
    max_kl: float = 0.1,
    allow_failing_filters: bool = False,
    allow_non_refusing: bool = False,
    check_generations: int = 8,
):
    """The library's :class:`SelectionOptions` (which checks every value) from the CLI's flags."""
    from weightedit.direction.selection import SelectionOptions

    return SelectionOptions(
        n_train=n_train,
        n_val=n_val,
        batch_size=batch_size,
        search=search,
        top_k=top_k,
        layer=layer,
        position=position,
        prompts=prompts,
        kl_threshold=max_kl,
        allow_failing_filters=allow_failing_filters,
        allow_non_refusing=allow_non_refusing,
        check_generations=check_generations,
    )


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
def direction(
    model: ModelOpt,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Direction file to write (.safetensors); scores go to <name>.scores.json."),
    ],
    lang: LangOpt = "en",
    n_train: NTrainOpt = 64,
    n_val: NValOpt = 16,
    batch_size: BatchOpt = 16,
    prompts: PromptsOpt = None,
    search: SearchOpt = "fast",
    top_k: TopKOpt = 8,
    layer: LayerOpt = None,
    position: PositionOpt = None,
    max_kl: MaxKlOpt = 0.1,
    allow_failing_filters: AllowFailingOpt = False,
    allow_non_refusing: AllowNonRefusingOpt = False,
    check_generations: CheckGenerationsOpt = 8,
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    chat_template: ChatTemplateOpt = None,
    revision: RevisionOpt = None,
    gguf_file: GgufFileOpt = None,
    token: TokenOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compute the refusal direction (difference of means) and select the best layer and position."""
    from weightedit.prompts import parse_languages
    from weightedit.workflows import check_direction_output, direction_for_model, save_direction_result, scores_payload

    parse_languages(lang)
    check_direction_output(out, inputs=local_inputs(model), overwrite=overwrite)
    options = selection_options(
        n_train,
        n_val,
        batch_size,
        search,
        top_k,
        layer,
        position,
        prompts,
        max_kl=max_kl,
        allow_failing_filters=allow_failing_filters,
        allow_non_refusing=allow_non_refusing,
        check_generations=check_generations,
    )
    source = resolve_source(model, gguf_file=gguf_file, revision=revision, token=token, quiet=quiet or json_out)
    check_direction_output(out, inputs=(source.folder, *source.inputs), overwrite=overwrite)
    result = direction_for_model(
        source,
        lang,
        options,
        dtype=dtype,
        device_map=device_map,
        revision=revision,
        token=token,
        trust_remote_code=trust_remote_code,
        chat_template=chat_template,
        progress=not (quiet or json_out),
    )
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
