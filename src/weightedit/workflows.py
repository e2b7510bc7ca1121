"""Multi-step jobs built from the library's pieces (used by the CLI and the demo)."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from collections.abc import Sequence
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
    "write_study_point",
    "study_point",
    "read_points",
    "point_work_dir",
    "PointJob",
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
    source = _resolve_for(
        out, model, overwrite=overwrite, revision=revision, gguf_file=gguf_file, token=token, progress=progress
    )
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


def _resolve_for(
    out: Path,
    model: str,
    *inputs: Path,
    overwrite: bool,
    revision: str | None,
    gguf_file: str | None,
    token: str | bool | None,
    progress: bool,
) -> ModelSource:
    """Resolve ``model`` for a job writing ``out``: ``out`` is checked against a local model folder (and other
    ``inputs``) before anything is downloaded or converted, and against the resolved files after."""
    local = Path(str(model)).expanduser()
    check_output_path(out, inputs=(*((local,) if str(model) and local.exists() else ()), *inputs), overwrite=overwrite)
    source = resolve_model(model, revision=revision, gguf_file=gguf_file, token=token, progress=progress)
    check_output_path(out, inputs=(source.folder, *source.inputs, *inputs), overwrite=overwrite)
    return source


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
    enqueue: Sequence[Any] = (),
    progress: bool = True,
) -> OptimizeJob:
    """Search the edit's shape on ``model`` (:mod:`weightedit.optimize`), write the chosen point to ``out`` with the
    streaming rewriter, and (with ``evaluation``, an :class:`~weightedit.evaluation.runner.EvalOptions`) evaluate it
    against the unedited model on the held-out judge prompts, into ``<work_dir>/evaluation``.

    The study lives in ``work_dir`` (default :func:`default_work_dir`): rerunning the same command resumes it.
    ``enqueue``: :class:`~weightedit.optimize.space.EditPoint` objects (:func:`read_points`) the study runs as its next
    trials, before the sampler draws any (:func:`weightedit.optimize.study.run_study`); they are checked against
    the search space as soon as the model's shape is known, before the preparation.

    Raises:
        OptimizeTargetError: no judged point meets the target; the study report is written, the model is not.
    """
    # Optuna loads only for this job, not with every command that imports the workflows.
    from .optimize.objective import prepare
    from .optimize.options import OptimizeOptions
    from .optimize.report import payload, rebuild_record, write_study_report
    from .optimize.space import enqueue_params
    from .optimize.study import run_study, unjudged_reason

    options = options or OptimizeOptions()
    out = Path(out).expanduser()
    work = Path(work_dir).expanduser() if work_dir is not None else default_work_dir(out)
    source = _resolve_for(
        out, model, overwrite=overwrite, revision=revision, gguf_file=gguf_file, token=token, progress=progress
    )
    _check_work_dir(work, out, source)
    loaded = load_model(source, load, progress=progress)
    enqueue = list(enqueue)  # read twice: checked here, enqueued by the study
    enqueue_params(enqueue, loaded.n_layers, loaded.n_post, options)  # out of the search space: fail now, not later
    fingerprint = model_fingerprint(source)
    try:
        setup = prepare(loaded, options, progress=progress)
        result = run_study(loaded, setup, options, work, fingerprint=fingerprint, enqueue=enqueue, progress=progress)
        rebuild = rebuild_record(
            setup.diffs,
            setup.harmless_means,
            fingerprint=fingerprint,
            dtype=loaded.dtype,
            batch_size=options.batch_size,
        )
    finally:
        del loaded
        gc.collect()
    edit = None
    if result.chosen is not None:
        meta = {
            **result.chosen.trial.to_json(),
            "judged": result.chosen.judged,
            "trial_tokens": options.trial_tokens,  # 0: refusal_estimate is first-token; N: judged
            "pooled": result.chosen.pooled,
            "choice_rule": options.choice_rule.value,
            "search_space": options.search_space.value,
            "direction_scope": options.direction_scope.value,
            # the prompts the per-language KLs above were measured on, and the bound they were held to
            "n_kl": options.kl_prompts,
            **({"lang_kl_budget": options.lang_kl_budget} if options.lang_kl_budget is not None else {}),
        }
        edit = _write_point(
            source,
            out,
            result.chosen.trial.point,
            result.direction(result.chosen.trial.point),
            direction_lang=options.direction_lang,
            meta=meta,
            provenance={"trial": result.chosen.trial.number, "study": str(work.name)},
            overwrite=overwrite,
            progress=progress,
        )
    files = write_study_report(
        payload(result, model=source.public_name, written=None if edit is None else str(edit.out), rebuild=rebuild),
        work,
    )
    if edit is None:
        misses = "; ".join(f"trial {v.trial.number}: {', '.join(v.misses)}" for v in result.verified)
        raise OptimizeTargetError(
            target=options.target_refusal,
            misses=misses or unjudged_reason(result.trials, options),
            report=str(files["md"]),
            rule=options.choice_rule.value,
            fix=None
            if result.verified or options.lang_kl_budget is None
            else "raise <<lang_kl_budget>> (in another <<work_dir>>: the bound is part of the study's key) or run "
            "more trials",
        )
    job = OptimizeJob(study=result, files=files, edit=edit)
    if evaluation is not None:
        job.evaluation = evaluate(str(out), work / "evaluation", evaluation, baseline=source, progress=progress)
    return job


@dataclass
class PointJob:
    """What :func:`write_study_point` produced."""

    trial: int  # the study's trial number of the point written
    chosen: bool  # whether it is the point the study chose
    point: Any  # weightedit.optimize.space.EditPoint
    edit: EditReport
    checked: bool  # whether the rebuilt mean differences were checked against the report's record
    evaluation: Any = None  # weightedit.evaluation.report.EvaluationReport when evaluated


# How far (relative, per layer and position) a rebuilt mean difference's sketch may be from the study's: float
# rounding (thread counts, kernels) moves float32 means by about 1e-6 and half-precision ones by about 1e-3; one
# fit prompt in 64 changed moves them by about 1e-3 (measured on the planted test model).
REBUILD_RTOL = {"float32": 5e-4, "float64": 5e-4}
REBUILD_RTOL_HALF = 2e-2  # bfloat16, float16


def _json_file(path: Path, option: str, expected: str) -> Any:
    """The JSON that ``path`` holds.

    Raises:
        OptionsError: (of ``option``) it cannot be read as JSON; the message asks for ``expected``.
    """
    from .errors import OptionsError

    try:
        return json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OptionsError(option, str(path), f"cannot be read as JSON ({e}); pass {expected}") from None


def study_point(report: Path, trial: int | None = None) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """A study report (``optimize.json``), the record of its trial ``trial`` (default: the chosen point), and
    whether that record is the chosen point.

    Raises:
        OptionsError: the report is not readable, is not a study report, or has no such trial.
    """
    from .errors import OptionsError
    from .optimize.report import SCHEMA

    data = _json_file(report, "point", "a study's optimize.json")
    family = SCHEMA.split("/")[0]
    if (
        not isinstance(data, dict)
        or not str(data.get("schema", "")).startswith(family + "/")
        or not isinstance(data.get("options"), dict)
        or not isinstance(data.get("trials"), list)
    ):
        raise OptionsError("point", str(report), f"is not a study report ({family}); pass a study's optimize.json")

    def numbered(t: Any) -> bool:
        return isinstance(t, dict) and isinstance(t.get("trial"), int) and not isinstance(t["trial"], bool)

    trials = {t["trial"]: t for t in data["trials"] if numbered(t)}
    chosen = data.get("chosen")
    if trial is None:
        if not isinstance(chosen, dict) or not numbered(chosen):
            raise OptionsError(
                "point",
                str(report),
                f"records no chosen point (its study chose none): pick one of its trials ({_numbers(trials)}) "
                "with <<point_trial>>",
            )
        return data, chosen, True
    if trial not in trials:
        raise OptionsError("point_trial", trial, f"is not a trial of {report}: use one of {_numbers(trials)}")
    is_chosen = isinstance(chosen, dict) and chosen.get("trial") == trial
    return data, trials[trial], is_chosen


def read_points(path: Path) -> list[Any]:
    """The points of a JSON file holding a list of trial records, as a study report's ``trials`` holds them
    (``direction_layer``, ``position``, ``profile`` and, where set, ``direction_scope`` and ``harmless_share``;
    other keys are ignored): what ``optimize --enqueue`` reads. Returns
    :class:`~weightedit.optimize.space.EditPoint` objects.

    Raises:
        OptionsError: the file cannot be read, is not such a list, or a record is not a point.
    """
    from .errors import OptionsError
    from .optimize.space import EditPoint

    data = _json_file(path, "enqueue", "a file of trial records")
    if isinstance(data, dict) and isinstance(data.get("trials"), list):
        raise OptionsError(
            "enqueue",
            str(path),
            "is a study report, not a list of points: take the trials to run from it, e.g. "
            f"jq '[.trials[] | select(.trial == 0)]' {path}",
        )
    if not isinstance(data, list) or not data:
        raise OptionsError("enqueue", str(path), "must hold a non-empty JSON list of trial records")
    points = []
    for i, record in enumerate(data):
        try:
            points.append(EditPoint.from_json(record))
        except OptionsError as e:
            raise OptionsError("enqueue", str(path), f"record {i}: {e.problem}") from None
    return points


def _numbers(trials: dict[int, Any]) -> str:
    numbers = sorted(trials)
    if not numbers:
        return "it has none"
    if numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 2:
        return f"{numbers[0]}–{numbers[-1]}"
    return ", ".join(map(str, numbers))


def _report_name(report: Path) -> str:
    """The report as recorded in files that may be published: its folder's name and its own, no absolute path."""
    path = Path(report).expanduser().resolve()
    return f"{path.parent.name}/{path.name}"


def write_study_point(
    model: str,
    out: Path,
    report: Path,
    *,
    trial: int | None = None,
    prompts: str | None = None,
    batch_size: int | None = None,
    work_dir: Path | None = None,
    evaluation: Any = None,
    overwrite: bool = False,
    load: ModelLoadOptions | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
) -> PointJob:
    """Write a point a study recorded (its chosen point, or trial ``trial``) without searching again.

    The point's parameters come from the study report ``report`` (``optimize.json``); its direction is computed
    again from ``model``'s fit prompts with the study's direction language, prompt count and prompt source (read
    from the report; ``prompts`` replaces the source, for a file that moved) and batch size (the report's unless
    ``batch_size`` is given). A report that records how its directions were made (``rebuild``: the model's content
    fingerprint, dtype, batch size, and a sketch of every mean difference and harmless mean) is checked against:
    other weights or dtype, or means whose sketches are further apart than the dtype's tolerance
    (:data:`REBUILD_RTOL`), is an error; the checkpoint then is the study's for that point up to that tolerance. An
    older report has no such record: the name is checked, and the direction is not (``PointJob.checked``).
    ``evaluation`` (an :class:`~weightedit.evaluation.runner.EvalOptions`) evaluates the output on the held-out
    test split into ``<work_dir>/evaluation`` (default work folder :func:`point_work_dir`).

    Raises:
        OptionsError: the report is not a study report, has no such trial or a malformed one, was made on another
            model or dtype, or its mean differences are not the ones computed again.
    """
    from .errors import OptionsError
    from .optimize.objective import mean_differences
    from .optimize.options import OptimizeOptions
    from .optimize.space import EditPoint, direction_vector

    report = Path(report).expanduser()
    data, record, is_chosen = study_point(report, trial)
    number = int(record["trial"])
    try:
        point = EditPoint.from_json(record)
    except OptionsError as e:
        raise OptionsError("point", str(report), f"trial {number} {e.problem}") from None
    if "harmless_share" not in record and data["options"].get("orthogonal_to_harmless") is True:
        # Reports made before the share was recorded: a study orthogonal to the harmless mean removed all of it.
        point = dataclasses.replace(point, harmless_share=1.0)
    recorded, rebuild = data["options"], data.get("rebuild")
    keys = ("model_fingerprint", "dtype", "batch_size", "mean_difference_sketch", "harmless_mean_sketch")
    if rebuild is not None and (
        not isinstance(rebuild, dict)
        or not set(keys) <= set(rebuild)
        or isinstance(rebuild["batch_size"], bool)
        or not isinstance(rebuild["batch_size"], int)
        or rebuild["batch_size"] < 1
    ):
        raise OptionsError("point", str(report), "has a malformed rebuild record; pass a study's optimize.json")
    if rebuild is None and public_name(model) != data.get("model"):
        # Without a fingerprint the name is all there is to check (with one, the weights are compared instead).
        raise OptionsError(
            "point",
            str(report),
            f"is a study of {data.get('model')}, not of {public_name(model)}: pass the study's model as <<model>>",
        )
    batch = batch_size or (rebuild["batch_size"] if rebuild is not None else 16)
    try:
        options = OptimizeOptions(
            langs=(recorded["direction_lang"],),
            direction_lang=recorded["direction_lang"],
            n_train=recorded["n_train"],
            n_score=recorded["n_score"],
            prompts=prompts if prompts is not None else recorded.get("prompts"),
            batch_size=batch,
        )
    except KeyError as e:
        raise OptionsError(
            "point", str(report), f"records no {e.args[0]} in its options; pass a study's optimize.json"
        ) from None
    except (OptionsError, TypeError, ValueError) as e:
        problem = getattr(e, "problem", str(e))
        raise OptionsError(
            "point", str(report), f"records options this version cannot use ({problem}); pass a study's optimize.json"
        ) from None
    out = Path(out).expanduser()
    source = _resolve_for(
        out, model, report, overwrite=overwrite, revision=revision, gguf_file=gguf_file, token=token, progress=progress
    )
    work = Path(work_dir).expanduser() if work_dir is not None else point_work_dir(out)
    if evaluation is not None:
        _check_work_dir(work, out, source)
        if work.exists() and not work.is_dir():
            raise UnsafeOutputError(
                f"<<work_dir>> {work} is a file: choose a folder for the evaluation", path=work, option="work_dir"
            )
        study, evaluated = report.resolve().parent, (work / "evaluation").resolve()
        if work.resolve() == study or evaluated == study or evaluated in study.parents:
            raise UnsafeOutputError(
                f"<<work_dir>> {work} is the study's folder ({study}), whose evaluation this one would replace: choose "
                "another folder",
                path=work,
                option="work_dir",
            )
    if rebuild is not None and rebuild.get("model_fingerprint") != model_fingerprint(source):
        raise OptionsError(
            "point",
            str(report),
            f"is a study of other weights than {source.public_name}'s (content fingerprint): pass the model it was "
            "made on as <<model>>",
        )
    loaded = load_model(source, load, progress=progress)
    try:
        ran = str(loaded.dtype).removeprefix("torch.")
        if rebuild is not None and rebuild.get("dtype") not in (None, ran):
            raise OptionsError(
                "point", str(report), f"was made in {rebuild['dtype']}, not {ran}: pass <<dtype>> {rebuild['dtype']}"
            )
        diffs, harmless = mean_differences(loaded, options, progress=progress)
    finally:
        del loaded
        gc.collect()
    n_layers, n_post = diffs.shape[:2]
    if not -n_post <= point.position <= -1 or not 0 <= point.layer <= n_layers - 1:
        raise OptionsError(
            "point",
            str(report),
            f"has trial {number} at layer {point.layer}, position {point.position}, outside this model's layers "
            f"0–{n_layers - 1} and positions -{n_post}–-1: pass the model the study was made on as <<model>>",
        )
    if rebuild is not None:
        _check_rebuilt(diffs, harmless, rebuild, report)
    meta = {
        **record,
        **point.to_json(),  # the point as rebuilt: an old report's implied share of 1 included
        **{k: recorded[k] for k in ("trial_tokens", "search_space", "choice_rule") if k in recorded},
        "direction_scope": "per-layer" if point.per_layer else "global",
        "written_from": {
            "report": _report_name(report),
            "trial": number,
            "chosen": is_chosen,
            "checked": rebuild is not None,
        },
    }
    edit = _write_point(
        source,
        out,
        point,
        direction_vector(point, diffs, harmless),
        direction_lang=options.direction_lang,
        meta=meta,
        provenance={"trial": number, "study_report": _report_name(report), "chosen": is_chosen},
        overwrite=overwrite,
        progress=progress,
    )
    job = PointJob(trial=number, chosen=is_chosen, point=point, edit=edit, checked=rebuild is not None)
    if evaluation is not None:
        job.evaluation = evaluate(str(out), work / "evaluation", evaluation, baseline=source, progress=progress)
    return job


def _check_rebuilt(diffs: Any, harmless: Any, rebuild: dict[str, Any], report: Path) -> None:
    """The mean differences and harmless means computed again have the sketches the study recorded, each layer and
    position within its dtype's tolerance (:data:`REBUILD_RTOL`)."""
    import torch

    from .errors import OptionsError
    from .optimize.report import sketch

    tol = REBUILD_RTOL.get(str(rebuild["dtype"]), REBUILD_RTOL_HALF)
    for name, got in (("mean_difference_sketch", sketch(diffs)), ("harmless_mean_sketch", sketch(harmless))):
        try:
            want = torch.tensor(rebuild[name], dtype=torch.float64)
        except (TypeError, ValueError):
            raise OptionsError(
                "point", str(report), "has a malformed rebuild record; pass a study's optimize.json"
            ) from None
        if not torch.isfinite(want).all():
            raise OptionsError(
                "point", str(report), "has a rebuild record that is not finite; pass a study's optimize.json"
            )
        if want.shape != got.shape:
            raise OptionsError(
                "point",
                str(report),
                f"records mean differences of shape {tuple(want.shape[:2])}, not this model's {tuple(got.shape[:2])}: "
                "pass the model, chat template and prompts the study used",
            )
        rel = ((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)).max().item()
        if not rel <= tol:  # a NaN fails too
            raise OptionsError(
                "point",
                str(report),
                f"records other mean differences than those computed again ({rel:.2%} apart, more than {tol:.2%}): the "
                "prompts, chat template or model differ from the study's; pass the study's as <<prompts>>, "
                "<<chat_template>> and <<model>>",
            )


def _write_point(
    source: ModelSource,
    out: Path,
    point: Any,
    vector: Any,
    *,
    direction_lang: str,
    meta: dict[str, Any],
    provenance: dict[str, Any],
    overwrite: bool,
    progress: bool,
) -> EditReport:
    """Write ``point`` (an :class:`~weightedit.optimize.space.EditPoint`) with its direction ``vector`` (per-layer
    rows or one direction) to ``out`` with the streaming rewriter; the direction file (with ``meta`` under
    ``optimize``) goes inside the output, ``provenance`` into its weightedit.json."""
    config = json.loads((Path(source.folder) / "config.json").read_text())
    rows = vector if point.per_layer else None  # per-layer rows; row 0 also serves the embeddings
    direction = Direction(
        vector=vector[0] if rows is not None else vector,
        layer_vectors=rows,
        layer=None if point.per_layer else int(round(point.layer)),  # per-layer: no one layer is read
        position=point.position,
        languages=(direction_lang,),
        model=source.given,
        config_hash=config_fingerprint(config),
        meta={"optimize": meta},
        profile=point.profile,
    )
    with scratch_dir(cache_dir() / "tmp", "direction") as tmp:
        path = save_direction(direction, Path(tmp) / DIRECTION_FILE_NAME)
        return orthogonalize_checkpoint(
            source,
            out,
            direction,
            overwrite=overwrite,
            progress=progress,
            extra_files={f"{DIRECTION_SUBFOLDER}/{path.name}": path},
            extra_provenance={"optimize": provenance},
        )


def point_work_dir(out: Path) -> Path:
    """Where ``optimize --point`` evaluates by default: ``<out>-point`` beside the output (not ``<out>-optimize``,
    which may be the study's own folder)."""
    out = Path(out)
    return out.with_name(out.name + "-point")


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
