"""``weightedit orthogonalize``: bake a refusal direction out of the weights into a new checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from weightedit._progress import console
from weightedit.direction.options import Search
from weightedit.edit.options import TiedEmbeddings
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
    LayerOpt,
    MaxKlOpt,
    ModelOpt,
    NTrainOpt,
    NValOpt,
    OutOpt,
    OverwriteOpt,
    PositionOpt,
    PromptsOpt,
    QuietOpt,
    RevisionOpt,
    SearchOpt,
    TiedEmbeddingsOpt,
    TokenOpt,
    TopKOpt,
    TrustRemoteCodeOpt,
    emit_json,
    epilog,
    handle_errors,
    quiet_libraries,
    selection_options,
)


def register(app: typer.Typer) -> None:
    app.command(
        "orthogonalize",
        epilog=epilog(
            "weightedit orthogonalize --model Qwen/Qwen2.5-1.5B-Instruct --direction-lang en --out ./qwen-ortho",
            "weightedit orthogonalize --model ./model --direction refusal.safetensors --out ./model-ortho",
            "weightedit orthogonalize --model model.gguf --direction r.safetensors --out ./edited --tied-embeddings edit-both",
        ),
    )(orthogonalize)


@handle_errors
def orthogonalize(
    model: ModelOpt,
    out: OutOpt,
    direction: Annotated[
        Path | None, typer.Option("--direction", "-d", help="Direction file (from `weightedit direction`).")
    ] = None,
    direction_lang: Annotated[
        str | None,
        typer.Option(
            "--direction-lang", help="Compute the direction from built-in prompts in these languages (en, or en,zh,ar)."
        ),
    ] = None,
    tied_embeddings: TiedEmbeddingsOpt = TiedEmbeddings.UNTIE,
    overwrite: OverwriteOpt = False,
    allow_model_mismatch: Annotated[
        bool,
        typer.Option("--allow-model-mismatch", help="Accept a direction file computed on a different model config."),
    ] = False,
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
    trust_remote_code: TrustRemoteCodeOpt = False,
    revision: RevisionOpt = None,
    gguf_file: GgufFileOpt = None,
    token: TokenOpt = None,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="After the edit, push the output to this Hub repo (user/name).")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="With --repo-id: create the repo as private.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    push_to: Annotated[str | None, typer.Option("--push-to", hidden=True)] = None,  # the old spelling of --repo-id
) -> None:
    """Project the refusal direction out of every matrix that writes to the residual stream."""
    from weightedit.edit.direction_file import load_direction
    from weightedit.edit.rewrite import orthogonalize as run
    from weightedit.errors import InvalidDirectionError

    repo = push_to if push_to is not None else repo_id
    if repo:
        from weightedit.hub import refuse_offline, resolve_token

        refuse_offline()  # fail before the long work, not after it
        resolve_token(token)

    if (direction is None) == (direction_lang is None):
        raise InvalidDirectionError("pass exactly one of --direction FILE or --direction-lang LANGS")
    progress = not (quiet or json_out)
    quiet_libraries(not progress)
    if direction_lang is not None:
        from weightedit.prompts import parse_languages
        from weightedit.workflows import orthogonalize_by_language

        parse_languages(direction_lang)
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
        _, report = orthogonalize_by_language(
            model,
            out,
            direction_lang,
            options,
            tied_embeddings=tied_embeddings,
            overwrite=overwrite,
            load=ModelLoadOptions(
                dtype=dtype, device_map=device_map, chat_template=chat_template, trust_remote_code=trust_remote_code
            ),
            revision=revision,
            gguf_file=gguf_file,
            token=token,
            progress=progress,
        )
    else:
        assert direction is not None
        d = load_direction(direction)
        d.meta.setdefault("file", direction.name)
        report = run(
            model,
            out,
            d,
            tied_embeddings=tied_embeddings,
            overwrite=overwrite,
            revision=revision,
            gguf_file=gguf_file,
            token=token,
            allow_model_mismatch=allow_model_mismatch,
            allow_failing_filters=allow_failing_filters,
            progress=progress,
        )
    summary = {
        "out": str(report.out),
        "model_type": report.model_type,
        "writer_groups": report.groups,
        "tensors_edited": report.tensors_edited,
        "tensors_already_orthogonal": report.tensors_already_orthogonal,
        "tensors_copied": report.tensors_copied,
        "bytes_written": report.bytes_written,
        "max_relative_residual": report.max_relative_residual,
        "tied_embeddings": report.tied_embeddings,
        "seconds": round(report.seconds, 3),
    }
    if repo:
        from weightedit.hub import push_model

        pushed = push_model(report.out, repo, private=private, token=token)
        summary["pushed"] = pushed.commit_url
    if json_out:
        emit_json(summary)
        return
    table = Table(title=f"orthogonalized → {report.out}", show_header=False)
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)
