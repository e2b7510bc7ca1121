"""``weightedit orthogonalize``: bake a refusal direction out of the weights into a new checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from weightedit._progress import console
from weightedit.direction.options import SelectionOptions
from weightedit.edit.options import TiedEmbeddings
from weightedit.runtime.options import ModelLoadOptions

from ._options import (
    GgufFileOpt,
    JsonOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    RevisionOpt,
    TiedEmbeddingsOpt,
    TokenOpt,
    emit_json,
    epilog,
    handle_errors,
    quiet_libraries,
    with_load_options,
    with_selection,
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
@with_selection()
@with_load_options
def orthogonalize(
    model: ModelOpt,
    out: OutOpt,
    selection: SelectionOptions,
    load: ModelLoadOptions,
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

        parse_languages(direction_lang, option="direction_lang")
        _, report = orthogonalize_by_language(
            model,
            out,
            direction_lang,
            selection,
            tied_embeddings=tied_embeddings,
            overwrite=overwrite,
            load=load,
            revision=revision,
            gguf_file=gguf_file,
            token=token,
            progress=progress,
        )
    else:
        assert direction is not None
        report = run(
            model,
            out,
            direction,  # a path: checked from its metadata, loaded while the copy runs
            tied_embeddings=tied_embeddings,
            overwrite=overwrite,
            revision=revision,
            gguf_file=gguf_file,
            token=token,
            allow_model_mismatch=allow_model_mismatch,
            allow_failing_filters=selection.allow_failing_filters,
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
