"""``weightedit direction``: compute and select the refusal direction from prompts in any language."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from weightedit._progress import console
from weightedit.direction.options import Search
from weightedit.runtime.options import Dtype, ModelLoadOptions

from ._options import (
    BATCH_SIZE,
    CHECK_GENERATIONS,
    MAX_KL,
    N_TRAIN,
    N_VAL,
    TOP_K,
    AllowFailingOpt,
    AllowNonRefusingOpt,
    BatchOpt,
    ChatTemplateOpt,
    CheckGenerationsOpt,
    DeviceMapOpt,
    DtypeOpt,
    GgufFileOpt,
    JsonOpt,
    LangsOpt,
    LayerOpt,
    MaxKlOpt,
    ModelOpt,
    NTrainOpt,
    NValOpt,
    OldLangOpt,
    OverwriteOpt,
    PositionOpt,
    PromptsOpt,
    QuietOpt,
    RevisionOpt,
    SearchOpt,
    TokenOpt,
    TopKOpt,
    TrustRemoteCodeOpt,
    emit_json,
    epilog,
    handle_errors,
    local_inputs,
    one_spelling,
    resolve_source,
    selection_options,
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
def direction(
    model: ModelOpt,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Direction file to write (.safetensors); scores go to <name>.scores.json."),
    ],
    langs: LangsOpt = "en",
    n_train: NTrainOpt = N_TRAIN,
    n_val: NValOpt = N_VAL,
    batch_size: BatchOpt = BATCH_SIZE,
    prompts: PromptsOpt = None,
    search: SearchOpt = Search.FAST,
    top_k: TopKOpt = TOP_K,
    layer: LayerOpt = None,
    position: PositionOpt = None,
    max_kl: MaxKlOpt = MAX_KL,
    allow_failing_filters: AllowFailingOpt = False,
    allow_non_refusing: AllowNonRefusingOpt = False,
    check_generations: CheckGenerationsOpt = CHECK_GENERATIONS,
    dtype: DtypeOpt = Dtype.AUTO,
    device_map: DeviceMapOpt = None,
    chat_template: ChatTemplateOpt = None,
    revision: RevisionOpt = None,
    gguf_file: GgufFileOpt = None,
    token: TokenOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
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
    options = selection_options(
        n_train=n_train,
        n_val=n_val,
        batch_size=batch_size,
        search=search,
        top_k=top_k,
        layer=layer,
        position=position,
        prompts=prompts,
        max_kl=max_kl,
        allow_failing_filters=allow_failing_filters,
        allow_non_refusing=allow_non_refusing,
        check_generations=check_generations,
    )
    source = resolve_source(model, gguf_file=gguf_file, revision=revision, token=token, quiet=quiet or json_out)
    check_direction_output(out, inputs=(source.folder, *source.inputs), overwrite=overwrite)
    load = ModelLoadOptions(
        dtype=dtype, device_map=device_map, chat_template=chat_template, trust_remote_code=trust_remote_code
    )
    result = direction_for_model(source, langs, options, load=load, progress=not (quiet or json_out))
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
