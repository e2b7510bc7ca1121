"""Multi-step jobs built from the library's pieces (used by the CLI and the demo)."""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .direction.selection import DirectionResult, SelectionOptions, compute_direction
from .edit.direction_file import Direction, config_fingerprint, save_direction
from .edit.options import TiedEmbeddings
from .edit.rewrite import EditReport, orthogonalize_checkpoint
from .errors import OptimizeTargetError, UnsafeOutputError
from .evaluation.report import evaluate
from .evaluation.runner import model_fingerprint
from .io.atomic import check_output_file, check_output_path, scratch_dir, write_text_atomic
from .io.cache import cache_dir
from .prompts import parse_languages
from .runtime.modeling import load_model
from .runtime.options import ModelLoadOptions
from .sources import resolve_model
from .sources.model import ModelSource, public_name

__all__ = [
    "direction_for_model",
    "optimize_model",
    "OptimizeJob",
    "default_work_dir",
    "scores_payload",
    "orthogonalize_by_language",
    "check_direction_output",
    "DIRECTION_FILE_NAME",
    "DIRECTION_SUBFOLDER",
]

DIRECTION_FILE_NAME = "refusal_direction.safetensors"
# Inside an output model folder the direction goes to a subfolder: a serving stack such as vLLM loads every
# top-level *.safetensors of a folder without an index as weights.
DIRECTION_SUBFOLDER = "weightedit"


def direction_for_model(
    model: str | os.PathLike[str] | ModelSource,
    langs: str | list[str],
    options: SelectionOptions | None = None,
    *,
    load: ModelLoadOptions | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
) -> DirectionResult:
    """Load ``model``, compute its refusal direction from prompts in ``langs``, and free the model."""
    codes = parse_languages(langs)
    t0 = time.perf_counter()
    loaded = load_model(model, load, revision=revision, token=token, progress=progress)
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
        "model": public_name(d.model),
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


def scores_path(path: Path) -> Path:
    """``<name>.scores.json`` beside the direction file ``<name>.safetensors``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".scores.json")


def check_direction_output(path: Path, *, inputs: tuple[Path, ...] = (), overwrite: bool = False) -> Path:
    """Validate a direction file path and its scores file before any work starts.

    Raises:
        UnsafeOutputError: the path is inside (or over) an input model, or below a file.
        OutputExistsError: either file exists and ``overwrite`` is false, or the path is a folder.
    """
    out = check_output_file(path, inputs=inputs, overwrite=overwrite)
    check_output_file(scores_path(out), inputs=inputs, overwrite=overwrite, option="scores file")
    return out


def save_direction_result(result: DirectionResult, path: Path) -> tuple[Path, Path]:
    """Write the direction file and its ``.scores.json`` beside it (each atomically)."""
    scores = write_text_atomic(scores_path(path), json.dumps(scores_payload(result), indent=2, default=str) + "\n")
    path = save_direction(result.direction, path)
    return path, scores


def orthogonalize_by_language(
    model: str,
    out: Path,
    langs: str | list[str],
    options: SelectionOptions | None = None,
    *,
    tied_embeddings: TiedEmbeddings | str = TiedEmbeddings.UNTIE,
    overwrite: bool = False,
    load: ModelLoadOptions | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
) -> tuple[DirectionResult, EditReport]:
    """Compute the direction from prompts in ``langs``, then write the edited checkpoint to ``out``.

    The direction file and its scores are stored in the output folder.
    """
    local = Path(str(model)).expanduser()
    check_output_path(out, inputs=(local,) if str(model) and local.exists() else (), overwrite=overwrite)
    source = resolve_model(model, revision=revision, gguf_file=gguf_file, token=token, progress=progress)
    check_output_path(out, inputs=(source.folder, *source.inputs), overwrite=overwrite)
    result = direction_for_model(source, langs, options, load=load, progress=progress)
    # The copy stored in the output folder may be pushed: it names its prompt source without a local path.
    if isinstance(result.direction.meta.get("prompts"), str):
        result.direction.meta["prompts"] = public_name(result.direction.meta["prompts"])
    with scratch_dir(cache_dir() / "tmp", "direction") as tmp:
        direction_path, scores_file = save_direction_result(result, Path(tmp) / DIRECTION_FILE_NAME)
        report = orthogonalize_checkpoint(
            source,
            out,
            result.direction,
            tied_embeddings=tied_embeddings,
            overwrite=overwrite,
            allow_failing_filters=options.allow_failing_filters if options else False,
            progress=progress,
            extra_files={
                f"{DIRECTION_SUBFOLDER}/{direction_path.name}": direction_path,
                f"{DIRECTION_SUBFOLDER}/{scores_file.name}": scores_file,
            },
        )
    return result, report


@dataclass
class OptimizeJob:
    """What :func:`optimize_model` produced."""

    study: Any  # weightedit.optimize.StudyResult
    files: dict[str, Path]  # the study report in the work folder
    edit: EditReport | None  # None when no point met the target
    evaluation: Any = None  # weightedit.evaluation.report.EvaluationReport when evaluated


def default_work_dir(out: Path) -> Path:
    """Where ``optimize`` keeps its study and report by default: ``<out>-optimize`` beside the output."""
    out = Path(out)
    return out.with_name(out.name + "-optimize")


def optimize_model(
    model: str,
    out: Path,
    options: Any = None,
    *,
    work_dir: Path | None = None,
    evaluation: Any = None,
    overwrite: bool = False,
    load: ModelLoadOptions | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
) -> OptimizeJob:
    """Search the edit's shape on ``model`` (:mod:`weightedit.optimize`), write the chosen point to ``out`` with the
    streaming rewriter, and (with ``evaluation``, an :class:`~weightedit.evaluation.runner.EvalOptions`) evaluate it
    against the unedited model on the held-out judge prompts, into ``<work_dir>/evaluation``.

    The study lives in ``work_dir`` (default :func:`default_work_dir`): rerunning the same command resumes it.

    Raises:
        OptimizeTargetError: no judged point meets the target; the study report is written, the model is not.
    """
    # Optuna loads only for this job, not with every command that imports the workflows.
    from .optimize.objective import prepare
    from .optimize.options import OptimizeOptions
    from .optimize.report import payload, write_study_report
    from .optimize.study import run_study

    options = options or OptimizeOptions()
    out = Path(out).expanduser()
    work = Path(work_dir).expanduser() if work_dir is not None else default_work_dir(out)
    local = Path(str(model)).expanduser()
    early = (local,) if str(model) and local.exists() else ()
    check_output_path(out, inputs=early, overwrite=overwrite)
    source = resolve_model(model, revision=revision, gguf_file=gguf_file, token=token, progress=progress)
    check_output_path(out, inputs=(source.folder, *source.inputs), overwrite=overwrite)
    _check_work_dir(work, out, source)
    loaded = load_model(source, load, progress=progress)
    try:
        setup = prepare(loaded, options, progress=progress)
        result = run_study(loaded, setup, options, work, fingerprint=model_fingerprint(source), progress=progress)
    finally:
        del loaded
        gc.collect()
    edit = None
    if result.chosen is not None:
        point = result.chosen.trial.point
        config = json.loads((Path(source.folder) / "config.json").read_text())
        vector = result.direction(point)
        rows = vector if point.per_layer else None  # per-layer rows; row 0 also serves the embeddings
        direction = Direction(
            vector=vector[0] if rows is not None else vector,
            layer_vectors=rows,
            layer=None if point.per_layer else int(round(point.layer)),  # per-layer: no one layer is read
            position=point.position,
            languages=(options.direction_lang,),
            model=source.given,
            config_hash=config_fingerprint(config),
            meta={
                "optimize": {
                    **result.chosen.trial.to_json(),
                    "judged": result.chosen.judged,
                    "trial_tokens": options.trial_tokens,  # 0: refusal_estimate is first-token; N: judged
                    "pooled": result.chosen.pooled,
                    "choice_rule": options.choice_rule.value,
                    "search_space": options.search_space.value,
                    "direction_scope": options.direction_scope.value,
                }
            },
            profile=point.profile,
        )
        with scratch_dir(cache_dir() / "tmp", "direction") as tmp:
            path = save_direction(direction, Path(tmp) / DIRECTION_FILE_NAME)
            edit = orthogonalize_checkpoint(
                source,
                out,
                direction,
                overwrite=overwrite,
                progress=progress,
                extra_files={f"{DIRECTION_SUBFOLDER}/{path.name}": path},
                extra_provenance={"optimize": {"trial": result.chosen.trial.number, "study": str(work.name)}},
            )
    files = write_study_report(
        payload(result, model=source.public_name, written=None if edit is None else str(edit.out)), work
    )
    if edit is None:
        misses = "; ".join(f"trial {v.trial.number}: {', '.join(v.misses)}" for v in result.verified)
        raise OptimizeTargetError(
            target=options.target_refusal,
            misses=misses or "no point was judged",
            report=str(files["md"]),
            rule=options.choice_rule.value,
        )
    job = OptimizeJob(study=result, files=files, edit=edit)
    if evaluation is not None:
        job.evaluation = evaluate(str(out), work / "evaluation", evaluation, baseline=source, progress=progress)
    return job


def _check_work_dir(work: Path, out: Path, source: ModelSource) -> None:
    """The work folder may exist (a study to resume) but must not be the output, an input, or inside either."""
    w = work.resolve()
    for other, what in (
        (out.resolve(), "the output"),
        *((p.resolve(), "an input") for p in (source.folder, *source.inputs)),
    ):
        if w == other or other in w.parents or w in other.parents:
            raise UnsafeOutputError(
                f"<<work_dir>> {work} overlaps {what} ({other}): choose a folder beside them",
                path=work,
                option="work_dir",
            )
