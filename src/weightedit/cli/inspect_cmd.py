"""``weightedit inspect``: what the edit would touch, from the checkpoint headers alone."""

from __future__ import annotations

import typer
from rich.table import Table

from weightedit._progress import console

from ._options import (
    GgufFileOpt,
    JsonOpt,
    ModelOpt,
    RevisionOpt,
    TokenOpt,
    emit_json,
    epilog,
    handle_errors,
    quiet_libraries,
)


def register(app: typer.Typer) -> None:
    app.command(
        "inspect",
        epilog=epilog(
            "weightedit inspect --model ./Qwen2.5-1.5B-Instruct",
            "weightedit inspect --model recipe:smollm2-135m --json",
        ),
    )(inspect)


@handle_errors
def inspect(
    model: ModelOpt,
    revision: RevisionOpt = None,
    gguf_file: GgufFileOpt = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the architecture, the residual-stream writer tensors weightedit will edit, and their size."""
    from weightedit.edit.plan import plan_edit
    from weightedit.io.checkpoint import Checkpoint
    from weightedit.sources import resolve_model

    quiet_libraries(json_out)
    source = resolve_model(model, revision=revision, gguf_file=gguf_file, token=token, progress=not json_out)
    plan = plan_edit(Checkpoint.open(source.folder))
    ckpt = plan.checkpoint
    largest = plan.largest_tensor()
    info = {
        "model": model,
        "folder": str(source.folder),
        "model_type": plan.spec.model_type,
        "d_model": ckpt.d_model,
        "num_layers": ckpt.config.get("num_hidden_layers") or ckpt.config.get("n_layer"),
        "post_norm": plan.spec.post_norm,
        "tied_embeddings": plan.tied,
        "shards": len(ckpt.shards),
        "tensors": sum(len(s.tensors) for s in ckpt.shards),
        "total_bytes": ckpt.total_bytes,
        "writer_tensors": len(plan.writers),
        "writer_bytes": plan.writer_bytes,
        "writer_groups": plan.groups(),
        "largest_tensor": {"name": largest.name, "shape": list(largest.shape), "dtype": largest.dtype},
        "writers": sorted(plan.writers),
    }
    if json_out:
        emit_json(info)
        return
    table = Table(title=f"{model}  ({plan.spec.model_type}, d_model={ckpt.d_model})", show_header=True)
    table.add_column("writer group")
    table.add_column("tensors", justify="right")
    for group, count in plan.groups().items():
        table.add_row(group, str(count))
    console.print(table)
    gb = 1e9
    console.print(
        f"{len(plan.writers)} writer tensors, {plan.writer_bytes / gb:.3f} GB of {ckpt.total_bytes / gb:.3f} GB in "
        f"{len(ckpt.shards)} shard(s); tied embeddings: {'yes' if plan.tied else 'no'}; "
        f"post-norm: {'yes' if plan.spec.post_norm else 'no'}; largest tensor {largest.name} {list(largest.shape)}"
    )
