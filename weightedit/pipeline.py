"""Multi-step jobs built from the library's pieces (used by the CLI and the demo)."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .direction import save_direction
from .modeling import load_model
from .prompts import parse_languages
from .selection import DirectionResult, SelectionOptions, compute_direction
from .sources import ModelSource, cache_dir, resolve_model

__all__ = ["direction_for_model", "scores_payload", "orthogonalize_by_language", "DIRECTION_FILE_NAME"]

DIRECTION_FILE_NAME = "refusal_direction.safetensors"


def direction_for_model(
    model: str | os.PathLike[str] | ModelSource,
    langs: str | list[str],
    options: SelectionOptions | None = None,
    *,
    dtype: str = "auto",
    device_map: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    chat_template: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> DirectionResult:
    """Load ``model``, compute its refusal direction from prompts in ``langs``, and free the model."""
    codes = parse_languages(langs)
    t0 = time.perf_counter()
    loaded = load_model(
        model,
        dtype=dtype,
        device_map=device_map,
        revision=revision,
        token=token,
        trust_remote_code=trust_remote_code,
        chat_template=chat_template,
        progress=progress,
    )
    load_s = time.perf_counter() - t0
    try:
        result = compute_direction(loaded, codes, options, progress=progress)
        result.timings["load"] = load_s
        return result
    finally:
        del loaded
        gc.collect()


def scores_payload(result: DirectionResult) -> dict[str, Any]:
    """Everything the selection measured, for ``<direction>.scores.json``."""
    d = result.direction
    return {
        "model": d.model,
        "languages": list(d.languages),
        "layer": d.layer,
        "position": d.position,
        "chosen": result.chosen.to_dict(),
        "status": result.status,
        "note": result.note,
        "search": result.search,
        "baseline": result.baseline,
        "refusal_tokens": {k: v.to_dict() for k, v in result.refusal_tokens.items()},
        "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
        "candidates": [s.to_dict() for s in result.scores],
    }


def save_direction_result(result: DirectionResult, path: Path) -> tuple[Path, Path]:
    """Write the direction file and its ``.scores.json`` beside it."""
    path = save_direction(result.direction, path)
    scores = path.with_name(path.name.removesuffix(".safetensors") + ".scores.json")
    scores.write_text(json.dumps(scores_payload(result), indent=2, default=str) + "\n", encoding="utf-8")
    return path, scores


def orthogonalize_by_language(
    model: str,
    out: Path,
    langs: str | list[str],
    options: SelectionOptions | None = None,
    *,
    tied_embeddings: str = "untie",
    overwrite: bool = False,
    dtype: str = "auto",
    device_map: str | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    chat_template: str | os.PathLike[str] | None = None,
    progress: bool = True,
):
    """Compute the direction from prompts in ``langs``, then write the edited checkpoint to ``out``.

    The direction file and its scores are stored in the output folder.
    """
    from .atomic import check_output_path
    from .orthogonalize import orthogonalize_checkpoint

    local = Path(str(model)).expanduser()
    check_output_path(out, inputs=(local,) if local.exists() else (), overwrite=overwrite)
    source = resolve_model(model, revision=revision, gguf_file=gguf_file, token=token, progress=progress)
    check_output_path(out, inputs=(source.folder, *source.inputs), overwrite=overwrite)
    result = direction_for_model(
        source,
        langs,
        options,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        chat_template=chat_template,
        progress=progress,
    )
    scratch = cache_dir() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        direction_path, scores_path = save_direction_result(result, Path(tmp) / DIRECTION_FILE_NAME)
        report = orthogonalize_checkpoint(
            source,
            out,
            result.direction,
            tied_embeddings=tied_embeddings,  # type: ignore[arg-type]
            overwrite=overwrite,
            allow_failing_filters=options.allow_failing_filters if options else False,
            progress=progress,
            extra_files={direction_path.name: direction_path, scores_path.name: scores_path},
        )
    return result, report
