"""``weightedit optimize``: search the edit's shape for the best refusal/KL trade-off, and write the chosen point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from weightedit._progress import console
from weightedit.optimize.options import Sampler
from weightedit.runtime.options import ModelLoadOptions

from ._messages import cli_message
from ._options import (
    EXIT_NEGATIVE,
    MAX_NEW_TOKENS,
    BatchOpt,
    DirectionLangOpt,
    GgufFileOpt,
    JudgeOpt,
    LangsOpt,
    MaxNewTokensOpt,
    ModelOpt,
    NTrainOpt,
    OutOpt,
    OverwriteOpt,
    PromptsOpt,
    QuietOpt,
    RevisionOpt,
    TokenOpt,
    epilog,
    handle_errors,
    quiet_libraries,
    with_load_options,
)

# Options that shape the search: with --point no search runs, so giving one is an error rather than ignored.
SEARCH_OPTIONS = (
    "direction_lang", "trials", "n_train", "n_score", "sampler", "seed", "search_space", "layer_window",
    "direction_scope", "preserve_norm", "orthogonal_to_harmless", "search_harmless_share", "target_refusal",
    "choice_rule", "kl_budget", "lang_kl_budget", "n_kl", "verify", "max_new_tokens", "trial_tokens", "enqueue",
)  # fmt: skip


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (on the command line or in the environment), not its default. The
    source is compared by name: typer ships its own copy of click, whose enum is not click's."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def register(app: typer.Typer) -> None:
    app.command(
        "optimize",
        epilog=epilog(
            "weightedit optimize --model recipe:qwen2.5-coder-1.5b-instruct --langs en,zh,ar --trials 32 --out edited",
            "weightedit optimize --model ./model --langs all --trials 64 --preserve-norm --out edited --no-evaluate",
            "weightedit optimize --model ./model --langs all --trial-tokens 24 --n-kl 16 --lang-kl-budget 0.1 --out edited",
            "weightedit optimize --model ./model --langs all --trials 24 --enqueue near-trial-0.json --out edited",
            "weightedit optimize --model ./model --point edited-optimize/optimize.json --point-trial 7 --out edited-7",
        ),
    )(optimize)


def render(job) -> None:
    study = job.study
    table = Table(title=f"judged refusal on the select split ({study.trials[0].number if study.trials else 0}…)")
    table.add_column("language")
    table.add_column("unedited", justify="right")
    for v in study.verified:
        table.add_column(f"trial {v.trial.number} (KL {v.trial.kl:.3f})", justify="right")

    def cell(x):
        if not x or x["rate"] is None:
            return "—"
        lo, hi = x["ci"]
        return f"{x['k']}/{x['n']} [{100 * lo:.0f}–{100 * hi:.0f}%]"

    for t in study.setup.targets:
        table.add_row(t.lang, cell(study.baseline_judged[t.lang]), *(cell(v.judged[t.lang]) for v in study.verified))
    from weightedit.optimize.study import pooled_refusal

    table.add_row(
        "pooled (refusing at baseline)",
        cell(pooled_refusal(study.baseline_judged, study.baseline_judged)),
        *(cell(v.pooled) for v in study.verified),
    )
    console.print(table)


@handle_errors
@with_load_options
def optimize(
    ctx: typer.Context,
    model: ModelOpt,
    out: OutOpt,
    load: ModelLoadOptions,
    langs: LangsOpt = "en",
    direction_lang: DirectionLangOpt = "en",
    trials: Annotated[int, typer.Option("--trials", help="Trials in the study (a resumed study runs the rest).")] = 32,
    n_train: NTrainOpt = 64,
    n_score: Annotated[
        int,
        typer.Option(
            "--n-score", help="Select prompts per language (harmful and harmless, each) every trial is scored on."
        ),
    ] = 8,
    n_kl: Annotated[
        int | None,
        typer.Option(
            "--n-kl",
            help="Harmless select prompts per language every trial's KL is measured on (default: --n-score); more "
            "cost a forward pass each and steady a per-language KL bound.",
            show_default=False,
        ),
    ] = None,
    prompts: PromptsOpt = None,
    sampler: Annotated[Sampler, typer.Option("--sampler", help="Optuna sampler: tpe or nsga2.")] = Sampler.TPE,
    seed: Annotated[int, typer.Option("--seed", help="The sampler's seed.")] = 0,
    search_space: Annotated[
        str,
        typer.Option(
            "--search-space",
            metavar="[anchored|free]",
            help="anchored: read the direction at the first-order screen's best candidate (its position, its layer "
            "within --layer-window) and search the writers' weights; free: any layer and position.",
        ),
    ] = "anchored",
    layer_window: Annotated[
        float,
        typer.Option(
            "--layer-window",
            help="Anchored search, global scope: how far (in layers) the direction layer may move from the anchor's.",
        ),
    ] = 1.5,
    direction_scope: Annotated[
        str,
        typer.Option(
            "--direction-scope",
            metavar="[per-layer|global]",
            help="per-layer: each decoder layer's writers lose the mean difference at that layer's output (the "
            "direction layer is then not searched); global: every writer loses one direction.",
        ),
    ] = "per-layer",
    preserve_norm: Annotated[
        bool | None,
        typer.Option(
            "--preserve-norm/--no-preserve-norm",
            help="Keep edited vectors' norms (default: searched).",
            show_default=False,
        ),
    ] = None,
    orthogonal_to_harmless: Annotated[
        bool,
        typer.Option(
            "--orthogonal-to-harmless", help="Remove the harmless mean's direction from the direction (all of it)."
        ),
    ] = False,
    search_harmless_share: Annotated[
        bool,
        typer.Option(
            "--search-harmless-share",
            help="Let the trials choose the share of the harmless mean's direction removed (0 to 1; trial 0 keeps "
            "the plain direction).",
        ),
    ] = False,
    target_refusal: Annotated[
        float,
        typer.Option("--target-refusal", help="Judged refusal a chosen point may keep (read by --choice-rule)."),
    ] = 0.03,
    choice_rule: Annotated[
        str,
        typer.Option(
            "--choice-rule",
            metavar="[interval|strict]",
            help="interval: pooled judged refusal over the refusing languages at most the target, none of them "
            "significantly above it (Wilson 95%); strict: every refusing language at most the target.",
        ),
    ] = "interval",
    kl_budget: Annotated[
        float | None,
        typer.Option("--kl-budget", help="A chosen point's KL must not exceed this (nats).", show_default=False),
    ] = None,
    lang_kl_budget: Annotated[
        float | None,
        typer.Option(
            "--lang-kl-budget",
            help="No language's KL may exceed this (nats): trials over it are infeasible to the search (an Optuna "
            "constraint), left off the front, and never chosen.",
            show_default=False,
        ),
    ] = None,
    verify: Annotated[
        int,
        typer.Option(
            "--verify",
            help="Points re-measured with judged generations: the trials whose estimate is near the target in "
            "every refusing language, lowest KL first.",
        ),
    ] = 3,
    max_new_tokens: MaxNewTokensOpt = MAX_NEW_TOKENS,
    judge: JudgeOpt = "substring",
    trial_tokens: Annotated[
        int,
        typer.Option(
            "--trial-tokens",
            help="Judge N-token completions in every trial instead of the first-token estimate (0: first token; "
            "slower, sees refusals whose first token says nothing; 24 is a good start).",
        ),
    ] = 0,
    batch_size: BatchOpt = 16,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            help="Study, report and evaluation folder (default: <out>-optimize); kept, resumable.",
            show_default=False,
        ),
    ] = None,
    evaluate: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Evaluate the written model on the held-out test split.")
    ] = True,
    eval_limit: Annotated[int, typer.Option("--eval-limit", help="Test prompts per language for the evaluation.")] = 32,
    enqueue: Annotated[
        Path | None,
        typer.Option(
            "--enqueue",
            help="A JSON list of trial records (as a study report's trials hold them) to run as the next trials, "
            "before the sampler draws any; counted in --trials, each run once.",
            show_default=False,
        ),
    ] = None,
    point_report: Annotated[
        Path | None,
        typer.Option(
            "--point",
            help="Write a point a study recorded instead of searching: its optimize.json (the chosen point unless "
            "--point-trial). The direction is computed again with the study's prompts and checked against the "
            "report; search options are refused; the evaluation goes to <out>-point unless --work-dir.",
            show_default=False,
        ),
    ] = None,
    point_trial: Annotated[
        int | None,
        typer.Option("--point-trial", help="With --point: the trial to write.", show_default=False),
    ] = None,
    revision: RevisionOpt = None,
    gguf_file: GgufFileOpt = None,
    token: TokenOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Search per-layer edit weights and the direction's layer for the lowest KL that removes refusal in every
    language; write the chosen point exactly, with its study report (or, with --point, a point a study recorded)."""
    from weightedit.errors import OptimizeTargetError, OptionsError, WeighteditError
    from weightedit.evaluation.runner import EvalOptions
    from weightedit.optimize.options import ChoiceRule, OptimizeOptions
    from weightedit.optimize.report import rate_text
    from weightedit.prompts import parse_languages
    from weightedit.workflows import default_work_dir, optimize_model, read_points

    quiet_libraries(quiet)
    if point_report is not None or point_trial is not None:
        given = {name for name in ctx.params if _given(ctx, name)}
        searched = [name for name in SEARCH_OPTIONS if name in given]
        if searched:
            raise WeighteditError(
                f"<<{searched[0]}>> is a search option, and <<point>> writes a point a study recorded without "
                "searching: drop it",
                option=searched[0],
            )
        write_point(
            model,
            out,
            point_report,
            point_trial,
            langs=langs if "langs" in given else None,
            prompts=prompts if "prompts" in given else None,
            judge=judge if "judge" in given else None,
            batch_size=batch_size if "batch_size" in given else None,
            work_dir=work_dir,
            evaluate=evaluate,
            eval_limit=eval_limit,
            load=load,
            revision=revision,
            gguf_file=gguf_file,
            token=token,
            overwrite=overwrite,
            quiet=quiet,
        )
        return
    if search_harmless_share and orthogonal_to_harmless:
        raise OptionsError(
            "search_harmless_share",
            True,
            "asks the trials for the share that <<orthogonal_to_harmless>> fixes at all of it: pass one of them",
        )
    points = read_points(enqueue) if enqueue is not None else []
    codes = tuple(parse_languages(langs))
    options = OptimizeOptions(
        langs=codes,
        direction_lang=parse_languages(direction_lang)[0],
        trials=trials,
        n_train=n_train,
        n_score=n_score,
        batch_size=batch_size,
        prompts=prompts,
        sampler=sampler,
        seed=seed,
        search_space=search_space,
        layer_window=layer_window,
        direction_scope=direction_scope,
        preserve_norm=preserve_norm,
        orthogonal_to_harmless=None if search_harmless_share else orthogonal_to_harmless,
        target_refusal=target_refusal,
        choice_rule=choice_rule,
        kl_budget=kl_budget,
        lang_kl_budget=lang_kl_budget,
        n_kl=n_kl,
        verify=verify,
        max_new_tokens=max_new_tokens,
        judge=judge,
        trial_tokens=trial_tokens,
    )
    evaluation = EvalOptions(langs=codes, limit=eval_limit, prompts=prompts, judge=judge) if evaluate else None
    work = work_dir or default_work_dir(out)
    try:
        job = optimize_model(
            model,
            out,
            options,
            work_dir=work,
            evaluation=evaluation,
            overwrite=overwrite,
            load=load,
            revision=revision,
            gguf_file=gguf_file,
            token=token,
            enqueue=points,
            progress=not quiet,
        )
    except OptimizeTargetError as e:
        console.print(f"[bold red]error:[/] {cli_message(e)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_NEGATIVE) from None
    except KeyboardInterrupt:
        console.print(f"the study so far is kept in {work}: run the same command again to continue it", highlight=False)
        raise
    if not quiet:
        render(job)
    chosen = job.study.chosen
    assert chosen is not None and job.edit is not None  # optimize_model raises when nothing was chosen
    point = chosen.trial.point
    where = (
        f"per-layer directions, position {point.position}"
        if point.per_layer
        else f"direction layer {point.layer:.2f}, position {point.position}"
    )
    console.print(
        f"wrote {job.edit.out} (trial {chosen.trial.number}, {ChoiceRule(options.choice_rule).value} rule, "
        f"pooled judged refusal {rate_text(chosen.pooled, 1)} on the select split: "
        f"{point.profile.describe()}; {where}); study report {job.files['md']}"
        + (f"; evaluation {work / 'evaluation'}" if job.evaluation is not None else ""),
        highlight=False,
    )


def write_point(
    model: str,
    out: Path,
    point: Path | None,
    point_trial: int | None,
    *,
    langs: str | None,
    prompts: str | None,
    judge: str | None,
    batch_size: int | None,
    work_dir: Path | None,
    evaluate: bool,
    eval_limit: int,
    load: ModelLoadOptions,
    revision: str | None,
    gguf_file: str | None,
    token: str | None,
    overwrite: bool,
    quiet: bool,
) -> None:
    """``optimize --point``: write a recorded point (and evaluate it) without a study. The evaluation's languages,
    prompts and judge are the study's unless given."""
    from weightedit.errors import OptionsError
    from weightedit.evaluation.runner import EvalOptions
    from weightedit.prompts import parse_languages
    from weightedit.workflows import point_work_dir, study_point, write_study_point

    if point is None:
        raise OptionsError(
            "point_trial", point_trial, "picks a trial of the study report that <<point>> names: pass both"
        )
    recorded = study_point(point, point_trial)[0]["options"]
    codes = tuple(parse_languages(langs)) if langs else tuple(recorded.get("langs") or ("en",))
    prompts = prompts if prompts is not None else recorded.get("prompts")
    evaluation = (
        EvalOptions(langs=codes, limit=eval_limit, prompts=prompts, judge=judge or recorded.get("judge") or "substring")
        if evaluate
        else None
    )
    job = write_study_point(
        model,
        out,
        point,
        trial=point_trial,
        prompts=prompts,
        batch_size=batch_size,
        work_dir=work_dir,
        evaluation=evaluation,
        overwrite=overwrite,
        load=load,
        revision=revision,
        gguf_file=gguf_file,
        token=token,
        progress=not quiet,
    )
    which = "its chosen point" if job.chosen else "not its chosen point: no choice rule was applied to it"
    work = work_dir or point_work_dir(out)
    console.print(
        f"wrote {job.edit.out} (trial {job.trial} of {point}, {which}: {job.point.profile.describe()})"
        + (f"; evaluation {work / 'evaluation'}" if job.evaluation is not None else ""),
        highlight=False,
    )
    if not job.checked:
        console.print(
            f"[yellow]warning:[/] {point} records no check of its directions (a report made before 2026-12-06): the "
            "direction computed again is unchecked against the study's",
            highlight=False,
        )
