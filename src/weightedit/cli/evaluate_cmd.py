"""``weightedit evaluate``: refusal and capability, per language, before and after an edit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from weightedit._progress import console
from weightedit.runtime.options import Dtype

if TYPE_CHECKING:
    from weightedit.evaluation.report import EvaluationReport
    from weightedit.evaluation.runner import EvalOptions
    from weightedit.sources import ModelSource

from ._options import (
    MAX_NEW_TOKENS,
    BatchOpt,
    ChatTemplateOpt,
    DeviceMapOpt,
    DtypeOpt,
    GenerateOpt,
    GgufFileOpt,
    JsonOpt,
    JudgeOpt,
    LimitOpt,
    MaxNewTokensOpt,
    ModelOpt,
    OverwriteOpt,
    PromptsOpt,
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


def register(app: typer.Typer) -> None:
    app.command(
        "evaluate",
        epilog=epilog(
            "weightedit evaluate --model ./qwen-ortho --baseline recipe:qwen2.5-coder-1.5b-instruct --langs all --out report/",
            "weightedit evaluate --model ./edited --baseline ./base --langs en,zh --generate 12 --xstest ../shared/data/xstest.jsonl --out r/",
            "weightedit evaluate --model ./edited --baseline ./base --prompts ../shared/data/polyrefuse --ppl-data ../shared/data/flores-or-sib --out r/",
        ),
    )(evaluate)


def render_summary(report: dict) -> None:
    from weightedit.evaluation.report import bars_line, display_name, fmt_ci, fmt_rate

    has_base = report["models"]["baseline"] is not None
    table = Table(title=f"evaluation of {display_name(report['models']['edited']['id'])} (split {report.get('split')})")
    cols = (
        ["language", "n", "refusal before", "refusal after", "McNemar p", "KL", "ppl ratio"]
        if has_base
        else ["language", "n", "refusal", "ppl"]
    )
    for col in cols:
        table.add_column(col, justify="right")

    for lang, v in report["languages"].items():
        e = v["edited"]
        name = f"{v['name']} ({lang})"
        if has_base:
            test = v.get("refusal_mcnemar")
            table.add_row(
                name,
                str(e["refusal_n"]),
                fmt_rate(v["baseline"]),
                fmt_rate(e),
                "—" if not test else f"{test['p_value']:.2g}",
                fmt_ci(e["kl_mean"], e.get("kl_ci")),
                fmt_ci(v.get("perplexity_ratio"), v.get("perplexity_ratio_ci")),
            )
        else:
            table.add_row(name, str(e["refusal_n"]), fmt_rate(e), fmt_ci(e["perplexity"], None))
    console.print(table)
    judge = report.get("judge") or {}
    method = next(iter(report["languages"].values()))["edited"]["refusal_method"]
    how = f"{judge.get('name')} judge on greedy generations" if method == "judge" else "first-token score > 0"
    if method == "judge" and judge.get("accuracy") is not None:
        how += f" (held-out accuracy {judge['accuracy']:.2f}, n={judge['n']})"
    console.print(f"refusal: {how}; brackets: Wilson 95% (rates) and bootstrap 95% (KL, perplexity ratio)")
    missed = bars_line(report)
    if missed:
        # The measurement itself succeeded (exit 0); what it found against the project's bars is said loudly.
        console.print(f"[bold yellow]{missed}[/]", highlight=False)
    elif has_base:
        console.print("design bars met (refusal reduction, KL, perplexity ratio)")


@handle_errors
def evaluate(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (report.json, report.md, PNGs).")],
    baseline: Annotated[
        str | None,
        typer.Option("--baseline", "-b", help="The model before the edit (Hub id, folder, .gguf, recipe:NAME)."),
    ] = None,
    langs: Annotated[str, typer.Option("--langs", help="Languages: all, or a comma list.")] = "all",
    prompts: PromptsOpt = None,
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="Prompts to judge on: auto (the source's held-out part: built-in test split; never a prompt used to "
            "choose a direction), or train/val/test to force one.",
        ),
    ] = "auto",
    limit: LimitOpt = 32,
    generate: GenerateOpt = None,
    generate_harmless: Annotated[
        int | None,
        typer.Option(
            "--generate-harmless",
            help="Harmless prompts per language to complete and judge (over-refusal; default: = --limit).",
            show_default=False,
        ),
    ] = None,
    max_new_tokens: MaxNewTokensOpt = MAX_NEW_TOKENS,
    judge: JudgeOpt = "substring",
    ppl_data: Annotated[
        Path | None,
        typer.Option(
            "--ppl-data",
            help="Folder of <lang>.jsonl with a 'text' field (FLORES/SIB) for perplexity; default: built-in parallel sentences.",
        ),
    ] = None,
    ppl_limit: Annotated[
        int, typer.Option("--ppl-limit", help="Sentences per language for perplexity (the built-in set has 32).")
    ] = 100,
    xstest: Annotated[
        Path | None, typer.Option("--xstest", help="XSTest JSONL; its safe prompts measure over-refusal (English).")
    ] = None,
    tasks: Annotated[str, typer.Option("--tasks", help="Extra tasks: mgsm (needs --mgsm).")] = "",
    mgsm: Annotated[Path | None, typer.Option("--mgsm", help="Folder of MGSM <lang>.jsonl files.")] = None,
    mgsm_limit: Annotated[int, typer.Option("--mgsm-limit", help="MGSM questions per language.")] = 16,
    comparison: Annotated[
        Path | None, typer.Option("--comparison", help="compare-directions output folder, to include its heatmaps.")
    ] = None,
    batch_size: BatchOpt = 16,
    dtype: DtypeOpt = Dtype.AUTO,
    device_map: DeviceMapOpt = None,
    chat_template: ChatTemplateOpt = None,
    revision: RevisionOpt = None,
    gguf_file: GgufFileOpt = None,
    baseline_revision: Annotated[
        str | None, typer.Option("--baseline-revision", help="Hub branch, tag or commit of --baseline.")
    ] = None,
    baseline_gguf_file: Annotated[
        str | None, typer.Option("--baseline-gguf-file", help="GGUF file inside the --baseline folder or Hub repo.")
    ] = None,
    token: TokenOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the baseline even if cached.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure refusal (harmful), over-refusal (harmless, XSTest) and capability (KL, perplexity, MGSM) per language."""
    from weightedit.io.atomic import check_output_path
    from weightedit.sources import public_name

    # Before anything is created or loaded: --out must be a new folder (or --overwrite) outside every input.
    inputs = local_inputs(model, baseline, comparison)
    check_output_path(out, inputs=inputs, overwrite=overwrite)
    options = _eval_options(
        langs=langs,
        prompts=prompts,
        split=split,
        limit=limit,
        generate=generate,
        generate_harmless=generate_harmless,
        max_new_tokens=max_new_tokens,
        judge=judge,
        batch_size=batch_size,
        ppl_data=ppl_data,
        ppl_limit=ppl_limit,
        xstest=xstest,
        tasks=tasks,
        mgsm=mgsm,
        mgsm_limit=mgsm_limit,
        dtype=dtype,
        device_map=device_map,
        chat_template=chat_template,
        trust_remote_code=trust_remote_code,
    )
    progress = not (quiet or json_out)
    source = resolve_source(model, gguf_file=gguf_file, revision=revision, token=token, quiet=not progress)
    base_source = (
        resolve_source(
            baseline, gguf_file=baseline_gguf_file, revision=baseline_revision, token=token, quiet=not progress
        )
        if baseline
        else None
    )
    out = _check_out_against(out, inputs, source, base_source, overwrite=overwrite)
    result = _write_report(
        out,
        source,
        options,
        baseline=base_source,
        comparison=comparison,
        use_cache=not no_cache,
        progress=progress,
        names=(public_name(model), public_name(baseline)),
        overwrite=overwrite,
    )
    _print_result(result, json_out=json_out)


def _check_out_against(
    out: Path, inputs: tuple[Path, ...], source: ModelSource, baseline: ModelSource | None, *, overwrite: bool
) -> Path:
    """``out`` checked again now that the models are resolved: outside their folders and files too."""
    from weightedit.io.atomic import check_output_path

    resolved = (source, baseline) if baseline is not None else (source,)
    return check_output_path(
        out, inputs=(*inputs, *(p for s in resolved for p in (s.folder, *s.inputs))), overwrite=overwrite
    )


def _tasks(tasks: str, mgsm: Path | None) -> list[str]:
    """The extra tasks of ``--tasks`` (a comma list), checked: only mgsm exists, and it needs ``--mgsm``."""
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in task_list if t != "mgsm"]
    if unknown:
        raise typer.BadParameter(f"unknown task {unknown[0]!r}; available: mgsm", param_hint="--tasks")
    if "mgsm" in task_list and mgsm is None:
        raise typer.BadParameter("--tasks mgsm needs --mgsm FOLDER", param_hint="--mgsm")
    return task_list


def _eval_options(
    *,
    langs: str,
    prompts: str | None,
    split: str,
    limit: int,
    generate: int | None,
    generate_harmless: int | None,
    max_new_tokens: int,
    judge: str,
    batch_size: int,
    ppl_data: Path | None,
    ppl_limit: int,
    xstest: Path | None,
    tasks: str,
    mgsm: Path | None,
    mgsm_limit: int,
    dtype: Dtype,
    device_map: str | None,
    chat_template: Path | None,
    trust_remote_code: bool,
) -> EvalOptions:
    """The library's checked :class:`EvalOptions` from the flags (languages, judge and tasks checked first)."""
    from weightedit.evaluation.judges import make_judge
    from weightedit.evaluation.runner import EvalOptions
    from weightedit.prompts import parse_languages

    codes = parse_languages(langs)
    make_judge(judge)
    task_list = _tasks(tasks, mgsm)
    return EvalOptions(
        langs=tuple(codes),
        prompts=prompts,
        split=split,
        limit=limit,
        generate=generate,
        generate_harmless=generate_harmless,
        max_new_tokens=max_new_tokens,
        judge=judge,
        batch_size=batch_size,
        ppl_source=str(ppl_data) if ppl_data else None,
        ppl_limit=ppl_limit,
        xstest=str(xstest) if xstest else None,
        mgsm=str(mgsm) if mgsm else None,
        mgsm_limit=mgsm_limit if "mgsm" in task_list else 0,
        dtype=dtype,
        device_map=device_map,
        chat_template=str(chat_template) if chat_template else None,
        trust_remote_code=trust_remote_code,
    )


def _write_report(
    out: Path,
    source: ModelSource,
    options: EvalOptions,
    *,
    baseline: ModelSource | None,
    comparison: Path | None,
    use_cache: bool,
    progress: bool,
    names: tuple[str | None, str | None],
    overwrite: bool,
) -> EvaluationReport:
    """Evaluate and write the report to ``out``: built in a temporary sibling and renamed into place once complete."""
    from weightedit.evaluation.report import evaluate as run
    from weightedit.io.atomic import atomic_output_dir

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        result = run(
            source,
            tmp,
            options,
            baseline=baseline,
            comparison=comparison,
            use_cache=use_cache,
            progress=progress,
            name=names[0],
            baseline_name=names[1],
        )
    result.files = {k: out / Path(v).relative_to(tmp) for k, v in result.files.items()}
    return result


def _print_result(result: EvaluationReport, *, json_out: bool) -> None:
    """The report's files and summary as JSON on stdout, or its summary table and where its files are."""
    if json_out:
        emit_json({"files": {k: str(v) for k, v in result.files.items()}, "summary": result.data["summary"]})
        return
    render_summary(result.data)
    console.print(
        f"report: {result.files['md']} · {result.files['json']} · plots: "
        + ", ".join(str(p) for k, p in result.files.items() if k.endswith("png"))
    )
