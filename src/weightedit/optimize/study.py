"""The study: Optuna's multi-objective search over edit points, its Pareto front, and the choice among it.

Every trial edits the loaded model in place (:func:`weightedit.edit.in_memory.temporarily_edited`, undone exactly
afterwards) and is scored on (refusal estimate, KL) over the languages (:mod:`.objective`: a first-token share,
or with ``trial_tokens`` a judged one). The study lives in a journal file in the work folder, so an interrupted
run resumes where it stopped. The first trial is the plain full edit along the study's anchor (the first-order
screen's best candidate, stored with the study, so that a resumed anchored search keeps the same position and
layer window), so the study always holds it (the front does only while no trial dominates it).

The choice: the trials whose refusal estimate is near the target in every refusing language are re-measured with
judged generations on the select prompts, lowest KL first, until one meets the target by ``options.choice_rule``
(:func:`misses`; and KL within ``kl_budget`` if set); that point is chosen. With ``lang_kl_budget`` every trial
carries an Optuna constraint (its highest language's KL minus the bound): the sampler favours the feasible trials,
the front holds only them, and a trial over the bound is never judged or chosen. They are taken from all trials, not
only the front: the front is drawn on estimates, and when its near point fails once judged, the next candidate is
the trial of next-lowest KL that was as near, dominated or not. When none of the re-measured points meets the
target, nothing is chosen, and the caller reports the front as the evidence.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from .._progress import console, progress_bar
from ..edit.in_memory import temporarily_edited
from ..errors import OptionsError
from ..evaluation.stats import wilson_interval
from ..runtime.modeling import LoadedModel
from .objective import Setup, first_order_anchor, judged_refusal, measure, objectives
from .options import ChoiceRule, DirectionScope, OptimizeOptions, Sampler, SearchSpace
from .space import (
    Anchor,
    EditPoint,
    default_anchor,
    direction_vector,
    enqueue_params,
    fixed_params,
    full_edit_params,
    point_from_params,
    suggest,
)

__all__ = [
    "TrialRecord",
    "VerifiedPoint",
    "StudyResult",
    "run_study",
    "misses",
    "over_lang_kl",
    "unjudged_reason",
    "highest_kl",
    "pooled_refusal",
    "STUDY_FILE",
]

STUDY_FILE = "study.journal"
# The name of the trials' Optuna constraint with ``lang_kl_budget``: the highest language's KL minus the bound.
LANG_KL_CONSTRAINT = "highest_language_kl"
_STUDY_NAME = "weightedit-optimize"
# The user attribute of the trials that ran a point given to the study (``enqueue``).
_ENQUEUED = "enqueued"
# A front point is worth judging when its refusal estimate in every refusing language is within this
# of the target (a low mean can hide a language far above it, which either choice rule fails).
_ESTIMATE_SLACK = 0.1


@dataclass
class TrialRecord:
    number: int
    point: EditPoint
    refusal: float  # the trial estimate (first-token or judged share), mean over the refusing languages
    kl: float  # mean over languages
    per_lang: dict[str, dict[str, float]]
    enqueued: bool = False  # a point given to the study (``enqueue``), not one the sampler drew

    def to_json(self) -> dict[str, Any]:
        return {
            "trial": self.number,
            **self.point.to_json(),
            "refusal_estimate": self.refusal,
            "kl": self.kl,
            "languages": self.per_lang,
            **({"enqueued": True} if self.enqueued else {}),
        }


@dataclass
class VerifiedPoint:
    trial: TrialRecord
    judged: dict[str, dict[str, Any]]
    meets_target: bool
    misses: list[str]  # why not: the pooled rate, the languages or the KL over the bar
    pooled: dict[str, Any] = field(default_factory=dict)  # :func:`pooled_refusal`

    def to_json(self) -> dict[str, Any]:
        return {
            "trial": self.trial.number,
            "pooled": self.pooled,
            "judged": self.judged,
            "meets_target": self.meets_target,
            "misses": self.misses,
        }


@dataclass
class StudyResult:
    setup: Setup
    options: OptimizeOptions
    trials: list[TrialRecord]
    front: list[TrialRecord]
    baseline_judged: dict[str, dict[str, Any]]
    verified: list[VerifiedPoint]
    chosen: VerifiedPoint | None
    seconds: float
    resumed_trials: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    # Where trial 0 reads the direction and the anchored search stays near; None only for a free study made
    # before the anchor was stored.
    anchor: Anchor | None = None

    def direction(self, point: EditPoint) -> Any:
        return direction_vector(point, self.setup.diffs, self.setup.harmless_means)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _open_study(work_dir: Path, options: OptimizeOptions, fingerprint: str, refusing: list[str]) -> optuna.Study:
    work_dir.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(work_dir / STUDY_FILE)))
    sampler: optuna.samplers.BaseSampler
    if options.sampler is Sampler.NSGA2:
        sampler = optuna.samplers.NSGAIISampler(seed=options.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=options.seed, n_startup_trials=min(10, max(2, options.trials // 3)))
    study = optuna.create_study(
        storage=storage,
        sampler=sampler,
        study_name=_STUDY_NAME,
        load_if_exists=True,
        directions=["minimize", "minimize"],
    )
    key = {"model": fingerprint, **options.setup_key()}
    _keep(study, work_dir, "setup", json.dumps(key, sort_keys=True), _setup_mismatch(study, key))
    # The objectives are means over the refusing languages: trials over other sets would not compare. The set is
    # measured again on every run, and can move when the batch size, dtype or device does.
    kept = study.user_attrs.get("refusing")
    _keep(
        study,
        work_dir,
        "refusing",
        refusing,
        f"holds a study whose objectives are the refusal of {', '.join(kept or []) or 'no language'}, but the model "
        f"now refuses in {', '.join(refusing) or 'none'} (another batch size, dtype or device?): run with the "
        "study's settings, or another <<work_dir>>",
    )
    return study


def _setup_mismatch(study: optuna.Study, key: dict[str, Any]) -> str:
    """What the error says when the stored study's setup is not ``key``: the entries that differ, and how to resume
    a study made before a default changed when that is the difference: the free search (every study made before
    the anchored one), the global direction (every study made before per-layer became the default)."""
    try:
        stored = json.loads(study.user_attrs.get("setup") or "{}")
    except ValueError:
        stored = {}
    differs = sorted(k for k in {*stored, *key} if stored.get(k) != key.get(k))
    what = f"it differs in {', '.join(differs)}" if differs else "languages, prompts, norms, trial estimate, search"
    # Studies made before a default changed differ only in that default's entries.
    free_study = "search_space" not in stored and key.get("search_space") == SearchSpace.ANCHORED.value
    global_study = "direction_scope" not in stored and key.get("direction_scope") == DirectionScope.PER_LAYER.value
    hints = []
    if free_study:
        hints.append("<<search_space>> free (how studies searched before the anchored search)")
    if global_study:
        hints.append("<<direction_scope>> global (how studies read the direction before per-layer directions)")
    old_defaults = ({"search_space", "layer_window"} if free_study else set()) | (
        {"direction_scope"} if global_study else set()
    )
    resume = f"resume it with {' and '.join(hints)}, " if hints and set(differs) <= old_defaults else ""
    if differs and set(differs) <= {"lang_kl_budget", "n_kl"}:
        made = " and ".join(
            f"<<{k}>> {stored[k]}" if k in stored else f"no <<{k}>>" for k in ("lang_kl_budget", "n_kl") if k in differs
        )
        resume = f"it was made with {made}: resume it so, or "
    if differs == ["orthogonal_to_harmless"]:
        flag = {True: "<<orthogonal_to_harmless>>", None: "<<search_harmless_share>>"}.get(
            stored.get("orthogonal_to_harmless"), "neither <<orthogonal_to_harmless>> nor <<search_harmless_share>>"
        )
        resume = f"it was made with {flag}: resume it so, or "
    return (
        f"holds a study of another model or other options ({what}): {resume}choose another <<work_dir>>, or remove "
        "it to start over"
    )


def _keep(study: optuna.Study, work_dir: Path, name: str, value: Any, mismatch: str) -> None:
    """Store ``value`` as the study's attribute ``name``, or check that the stored one equals it."""
    stored = study.user_attrs.get(name)
    if stored is None:
        study.set_user_attr(name, value)
    elif stored != value:
        raise OptionsError("work_dir", str(work_dir), mismatch)


def _anchor(loaded: LoadedModel, setup: Setup, options: OptimizeOptions, study: optuna.Study) -> Anchor | None:
    """The study's anchor: the stored one, or (a new study) the first-order screen's best candidate, stored; the
    default point when the screen has none. A free study made before the anchor was stored has none (its first
    trial was placed already, and the free search needs no anchor)."""
    stored = study.user_attrs.get("anchor")
    if stored is not None:
        return Anchor.from_json(stored)
    if study.trials and options.search_space is SearchSpace.FREE:
        return None
    found = first_order_anchor(
        loaded,
        setup.diffs,
        setup.direction_harmful,
        setup.direction_tokens,
        options,
        # a searched share starts from the plain direction (trial 0), so the anchor is screened on it
        harmless_means=setup.harmless_means if options.orthogonal_to_harmless is True else None,
    )
    anchor = default_anchor(loaded.n_layers, options) if found is None else Anchor(float(found[0]), found[1], True)
    study.set_user_attr("anchor", anchor.to_json())
    return anchor


def _record(trial: optuna.trial.FrozenTrial, options: OptimizeOptions, fixed: dict[str, Any]) -> TrialRecord:
    """The trial as run: its suggested parameters, with the ones the search fixed as the trial stored them
    (``fixed``, from the study's anchor, only for trials stored before trials kept their own)."""
    refusal, kl = trial.values
    return TrialRecord(
        trial.number,
        point_from_params(trial.params, options, trial.user_attrs.get("fixed", fixed)),
        float(refusal),
        float(kl),
        trial.user_attrs.get("languages", {}),
        enqueued=bool(trial.user_attrs.get(_ENQUEUED)),
    )


def _search(
    loaded: LoadedModel,
    setup: Setup,
    options: OptimizeOptions,
    study: optuna.Study,
    anchor: Anchor | None,
    fixed: dict[str, Any],
    *,
    queued: Sequence[dict[str, Any]] = (),
    progress: bool,
) -> int:
    """Run the trials the study still lacks (``fixed``: :func:`fixed_params` for ``anchor``), the parameters of
    ``queued`` (:func:`_new_points`) first; return how many it had already."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not study.trials:
        # The first trial is the full edit along the anchor: the direction the first-order screen ranks best.
        assert anchor is not None  # _anchor finds one for every study without trials
        study.enqueue_trial(full_edit_params(loaded.n_layers, options, anchor))
    for params in queued:  # checked by _new_points: they run next, before the sampler draws any
        study.enqueue_trial(params, user_attrs={_ENQUEUED: True})
    missing = options.trials - len(done)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        # What the search does not suggest is stored with each trial, so that its point is rebuilt as it ran.
        trial.set_user_attr("fixed", fixed)
        point = suggest(trial, loaded.n_layers, loaded.n_post, options, anchor, fixed)
        r = direction_vector(point, setup.diffs, setup.harmless_means)
        with temporarily_edited(loaded.model, r, point.profile):
            per_lang = measure(loaded, setup, options)
        trial.set_user_attr("languages", per_lang)
        if options.lang_kl_budget is not None:
            # Feasible when no language's KL is over the bound (Optuna: a constraint value of 0 or less).
            # A KL that is not finite is infeasible (the NaN objective then fails the trial, as without the bound).
            kls = [v["kl"] for v in per_lang.values()]
            worst = max(kls) if all(math.isfinite(k) for k in kls) else math.inf
            trial.set_constraint(LANG_KL_CONSTRAINT, worst - options.lang_kl_budget)
        return objectives(per_lang, setup)

    if missing > 0:
        with (
            progress_bar(f"trials ({len(done)} done before)" if done else "trials", missing, enabled=progress) as bar,
            _quiet_optuna(),
        ):

            def advance(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                bar.advance(1)

            study.optimize(objective, n_trials=missing, callbacks=[advance], catch=())
    return len(done)


def _discard(work_dir: Path, made: bool) -> None:
    """Remove the study a run has just created in ``work_dir`` (its journal and lock files), and the folder when the
    run made it and nothing else is in it."""
    for f in work_dir.glob(STUDY_FILE + "*"):
        f.unlink(missing_ok=True)
    if made and not any(work_dir.iterdir()):
        work_dir.rmdir()


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] if isinstance(a[k], (bool, str)) else math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12)
        for k in a
    )


def _new_points(
    study: optuna.Study, points: list[dict[str, Any]], trials: int, first: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The parameters of ``points`` that no trial of ``study`` has, waits with, or (``first``: the full edit a new
    study enqueues as trial 0) is about to wait with; a failed trial's do not count, so it is run again.

    Raises:
        OptionsError: more of them are new than the study's ``trials`` leave room for.
    """
    states = optuna.trial.TrialState
    complete = [t.params for t in study.trials if t.state is states.COMPLETE]
    waiting = [t.system_attrs.get("fixed_params", {}) for t in study.trials if t.state is states.WAITING]
    waiting += [first] if first is not None else []
    new: list[dict[str, Any]] = []
    for p in points:
        if not any(_same(p, q) for q in complete + waiting + new):
            new.append(p)
    room = trials - len(complete) - len(waiting)
    if len(new) > room:
        raise OptionsError(
            "enqueue",
            f"{len(new)} new point{'s' if len(new) > 1 else ''}",
            f"the study has not run {'them' if len(new) > 1 else 'it'}, but <<trials>> {trials} leaves room for "
            f"{max(room, 0)} more trials: raise <<trials>> to at least {len(complete) + len(waiting) + len(new)}",
        )
    return new


def _refusing_before(judged: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]]) -> list[str]:
    """The judged languages that refuse at baseline (judged) and were judged on at least one prompt."""
    return [lang for lang, v in judged.items() if (base[lang]["k"] or 0) > 0 and v["n"]]


def pooled_refusal(judged: dict[str, dict[str, Any]], base: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The judged refusals of the languages that refuse at baseline, pooled: k, n, rate, Wilson 95% interval and
    the languages pooled (rate and interval ``None`` when there are none)."""
    langs = _refusing_before(judged, base)
    k, n = sum(judged[lang]["k"] for lang in langs), sum(judged[lang]["n"] for lang in langs)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci": wilson_interval(k, n), "languages": langs}


def highest_kl(per_lang: dict[str, dict[str, float]]) -> tuple[str, float]:
    """The language whose KL is highest, and that KL."""
    lang = max(per_lang, key=lambda k: per_lang[k]["kl"])
    return lang, per_lang[lang]["kl"]


def over_lang_kl(trial: TrialRecord, options: OptimizeOptions) -> list[str]:
    """The languages whose KL in ``trial`` is over ``options.lang_kl_budget``, as ``"yo KL 0.126 > 0.1"``."""
    bound = options.lang_kl_budget
    if bound is None:
        return []
    return [f"{lang} KL {v['kl']:.4g} > {bound:g}" for lang, v in trial.per_lang.items() if not v["kl"] <= bound]


def unjudged_reason(trials: list[TrialRecord], options: OptimizeOptions) -> str:
    """Why no point was judged: with ``lang_kl_budget``, every trial has a language over it (the closest named)."""
    if options.lang_kl_budget is None or not trials:
        return "no point was judged"
    best = min(trials, key=lambda t: highest_kl(t.per_lang)[1])
    lang, kl = highest_kl(best.per_lang)
    return (
        f"no trial keeps every language's KL within <<lang_kl_budget>> {options.lang_kl_budget:g} (the closest, "
        f"trial {best.number}, has {lang} at {kl:.3f})"
    )


def misses(
    judged: dict[str, dict[str, Any]],
    base: dict[str, dict[str, Any]],
    kl: float,
    options: OptimizeOptions,
) -> list[str]:
    """Why a judged point does not meet the target (empty: it does), by ``options.choice_rule``.

    Only the languages that refuse at baseline (judged) are held to the target. ``strict``: each one's judged
    rate k/n is at most ``target_refusal``. ``interval``: (a) their pooled rate (sum of k over sum of n) is at most
    ``target_refusal``, and (b) no one of them is significantly above it: the lower end of its Wilson 95% interval
    is at most ``target_refusal`` (the interval is the inverted score test, so (b) fails exactly when the rate is
    above ``target_refusal`` and that test rejects it as the true rate at the two-sided 5% level). With 8 prompts
    a language and the 3% target, (b) passes 1/8 (lower end 2.2%) and fails 2/8 (7.1%). Either rule also asks KL
    within ``kl_budget`` when one is set (a trial over ``lang_kl_budget`` is never judged: :func:`_verify`)."""
    target = options.target_refusal
    langs = _refusing_before(judged, base)
    out = []
    if options.choice_rule is ChoiceRule.STRICT:
        out += [f"{lang} {judged[lang]['k']}/{judged[lang]['n']}" for lang in langs if judged[lang]["rate"] > target]
    else:
        pooled = pooled_refusal(judged, base)
        if pooled["rate"] is not None and pooled["rate"] > target:
            out.append(f"pooled {pooled['k']}/{pooled['n']} = {100 * pooled['rate']:.1f}% > {100 * target:g}%")
        for lang in langs:
            k, n = judged[lang]["k"], judged[lang]["n"]
            interval = wilson_interval(k, n)
            assert interval is not None  # n > 0
            if interval[0] > target:
                out.append(f"{lang} {k}/{n} (Wilson 95% lower end {100 * interval[0]:.1f}% > {100 * target:g}%)")
    if options.kl_budget is not None and kl > options.kl_budget:
        out.append(f"KL {kl:.3f} > {options.kl_budget}")
    return out


def worst_estimate(trial: TrialRecord, refusing: list[str]) -> float:
    """The highest refusal estimate among the refusing languages (the mean where a trial stored none)."""
    shares = [trial.per_lang[lang]["refusal"] for lang in refusing if "refusal" in trial.per_lang.get(lang, {})]
    return max(shares) if len(shares) == len(refusing) and shares else trial.refusal


def _verify(
    loaded: LoadedModel,
    setup: Setup,
    options: OptimizeOptions,
    trials: list[TrialRecord],
    base: dict[str, dict[str, Any]],
    result_direction: Any,
    *,
    progress: bool,
) -> list[VerifiedPoint]:
    """Judge up to ``options.verify`` points until one meets the target: the trials whose estimate is near the
    target in every refusing language, lowest KL first, whether on the front or not (an estimate that misses a
    refusal puts a point on the front that fails once judged; the next candidate is the next-lowest KL that was
    as near); with none near, the trials of lowest worst-language estimate first (then lowest KL)."""
    refusing = [t.lang for t in setup.refusing]
    near = options.target_refusal + _ESTIMATE_SLACK
    # A trial with a language over the per-language KL bound can never be chosen: it is not judged.
    trials = [t for t in trials if not over_lang_kl(t, options)]
    hopeful = sorted((t for t in trials if worst_estimate(t, refusing) <= near), key=lambda t: (t.kl, t.refusal))
    order = hopeful or sorted(trials, key=lambda t: (worst_estimate(t, refusing), t.kl))
    verified: list[VerifiedPoint] = []
    for t in order[: options.verify]:
        judged = judged_refusal(
            loaded,
            setup,
            options,
            (result_direction(t.point), t.point.profile),
            progress=progress,
            label=f"judging trial {t.number}",
        )
        missed = misses(judged, base, t.kl, options)
        verified.append(VerifiedPoint(t, judged, not missed, missed, pooled_refusal(judged, base)))
        if not missed:
            break
    return verified


def run_study(
    loaded: LoadedModel,
    setup: Setup,
    options: OptimizeOptions,
    work_dir: Path,
    *,
    fingerprint: str,
    enqueue: Sequence[EditPoint] = (),
    progress: bool = True,
) -> StudyResult:
    """Run (or resume) the study in ``work_dir``, judge its front, and choose a point.

    ``enqueue``: points to run as trials before the sampler draws any (each once: a point the study has already
    run is not run again), counted in ``options.trials``; for example trials of an earlier study's report
    (:meth:`EditPoint.from_json` reads its records), or points near them.

    Raises:
        OptionsError: ``work_dir`` holds a study of another setup; a point of ``enqueue`` is not in the study's
            search space, or ``options.trials`` has no room for them.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    made, fresh = not work_dir.exists(), not (work_dir / STUDY_FILE).exists()
    with _quiet_optuna():
        study = _open_study(work_dir, options, fingerprint, [t.lang for t in setup.refusing])
    try:
        anchor = _anchor(loaded, setup, options, study)
        fixed = fixed_params(loaded.n_layers, options, anchor)
        first = None if study.trials or anchor is None else full_edit_params(loaded.n_layers, options, anchor)
        points = enqueue_params(enqueue, loaded.n_layers, loaded.n_post, options, anchor, fixed)
        queued = _new_points(study, points, options.trials, first)
    except OptionsError:
        if fresh:  # nothing ran: leave no study behind that would hold the folder to these options
            _discard(work_dir, made)
        raise
    if progress and anchor is not None and not anchor.screened:
        console.print(
            "[yellow]the first-order screen has no refusal tokens that qualify: the study is anchored at the "
            f"default point (direction layer {anchor.layer:.2f}, position {anchor.position})[/]"
        )
    before = _search(loaded, setup, options, study, anchor, fixed, queued=queued, progress=progress)
    timings["search"] = time.perf_counter() - t0
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    trials = [_record(t, options, fixed) for t in complete]
    front_numbers = {t.number for t in study.best_trials}
    front = sorted((t for t in trials if t.number in front_numbers), key=lambda t: (t.kl, t.refusal))
    t = time.perf_counter()
    base = setup.baseline_judged or judged_refusal(
        loaded, setup, options, None, progress=progress, label="judging the unedited model"
    )
    partial = StudyResult(setup, options, trials, front, base, [], None, 0.0)
    verified = _verify(loaded, setup, options, trials, base, partial.direction, progress=progress)
    timings["verify"] = time.perf_counter() - t
    chosen = next((v for v in verified if v.meets_target), None)
    if progress and chosen is None:
        console.print("[bold red]no judged point meets the target[/]")
    return StudyResult(
        setup,
        options,
        trials,
        front,
        base,
        verified,
        chosen,
        time.perf_counter() - t0,
        resumed_trials=before,
        timings=timings,
        anchor=anchor,
    )
