"""optimize.json, optimize.md and front.png: the study's trials, its Pareto front, the judged points and the choice."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .. import __version__  # noqa: E402
from ..evaluation.stats import wilson_interval  # noqa: E402
from ..io.atomic import atomic_file, write_text_atomic  # noqa: E402
from ..render.plots import language_label  # noqa: E402
from .options import ChoiceRule, DirectionScope, Sampler, SearchSpace  # noqa: E402
from .space import layer_bounds  # noqa: E402
from .study import StudyResult, pooled_refusal  # noqa: E402

__all__ = ["SCHEMA", "payload", "write_study_report", "choice_statement", "rate_text"]

# 2: options.trial_tokens and baseline first_token_estimate; with trial_tokens a trial's languages that are no
# objective have no "refusal", and refusal_estimate is a judged share.
# 3: options.search_space, layer_window and choice_rule; "search" (the anchor and the searched layers and
# position); "choice" (the rule, stated); "baseline_pooled"; each verified point's and the chosen one's "pooled"
# (k, n, rate, Wilson interval over the languages that refuse at baseline), the chosen one's "rule".
# options.lang_kl_budget and n_kl, choice.lang_kl_budget (added keys, same schema).
SCHEMA = "weightedit-optimize/3"


def choice_statement(
    rule: ChoiceRule | str, target: float, kl_budget: float | None, lang_kl_budget: float | None = None
) -> str:
    """The choice rule in words, with its numbers (what the report says chose, or failed to choose)."""
    t = f"{100 * target:g}%"
    if ChoiceRule(rule) is ChoiceRule.STRICT:
        text = f"a point meets the target when each language that refuses at baseline (judged) keeps at most {t}"
    else:
        text = (
            f"a point meets the target when (a) the judged refusal pooled over the languages that refuse at "
            f"baseline (judged) is at most {t} (point estimate: their refusals over their prompts), and (b) no one "
            f"of those languages is significantly above {t}: the lower end of its Wilson 95% interval is at most {t}. "
            f"A point estimate at most {t} is not a bound: the pooled interval's upper end is shown beside it, and a "
            "language can keep a refusal or two of its prompts and pass (b)"
        )
    if kl_budget is not None:
        text += f"; and its mean KL is at most {kl_budget} nats"
    if lang_kl_budget is not None:
        text += (
            f"; and no language's KL is over {lang_kl_budget:g} nats (a trial over it is infeasible to the search and "
            "is never judged)"
        )
    return text + "; the first judged point (lowest KL first) that meets it is chosen"


def _search_section(result: StudyResult) -> dict[str, Any]:
    o = result.options
    anchor = result.anchor
    n_layers = int(result.setup.diffs.shape[0])
    anchored = SearchSpace(o.search_space) is SearchSpace.ANCHORED
    low, high = layer_bounds(n_layers, o, anchor)
    if anchor is None:
        where = "not stored (a free study made before the anchor was stored: see first_trial)"
    elif anchor.screened:
        where = "the candidate the first-order screen ranks best (direction language, select split)"
    else:
        where = (
            "the default point, 75% of the way to the layer limit at the last position: the first-order screen had "
            "no refusal tokens that qualify"
        )
    per_layer = DirectionScope(o.direction_scope) is DirectionScope.PER_LAYER
    return {
        "space": SearchSpace(o.search_space).value,
        "anchor": None if anchor is None else {**anchor.to_json(), "what": where},
        "layer_window": o.layer_window if anchored and not per_layer else None,
        # None with per-layer directions: each decoder layer reads its own, no direction layer is searched.
        "direction_layers": None if per_layer else [low, high],
        "position": anchor.position if anchored and anchor is not None else None,  # None: searched
        "direction_scope": DirectionScope(o.direction_scope).value,
    }


# A direction-sensitive summary of the mean differences: each vector's coordinates along this many fixed random
# unit vectors (seeded, so a rebuild draws the same ones). Norms alone barely see a rotation.
SKETCH_DIM = 16
SKETCH_SEED = 0


def sketch(vectors: Any) -> Any:
    """``vectors`` (``[..., d]``) projected on :data:`SKETCH_DIM` seeded random unit vectors, in float64."""
    import torch

    d = vectors.shape[-1]
    basis = torch.randn(d, SKETCH_DIM, generator=torch.Generator().manual_seed(SKETCH_SEED), dtype=torch.float64)
    return vectors.double() @ (basis / basis.norm(dim=0))


def rebuild_record(diffs: Any, harmless_means: Any, *, fingerprint: str, dtype: Any, batch_size: int) -> dict[str, Any]:
    """What a point's direction was computed from and a check of it: the model's content fingerprint, the dtype it
    ran in, the batch size, and a sketch (:func:`sketch`) of the mean difference and the harmless mean at every
    layer and post-instruction position (every point's direction is built from these)."""

    def rounded(t: Any) -> list[Any]:
        return [[[float(f"{x:.7g}") for x in v] for v in row] for row in t.tolist()]

    return {
        "model_fingerprint": fingerprint,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "sketch": {"dim": SKETCH_DIM, "seed": SKETCH_SEED},
        "mean_difference_sketch": rounded(sketch(diffs)),
        "harmless_mean_sketch": rounded(sketch(harmless_means)),
    }


def payload(
    result: StudyResult, *, model: str, written: str | None, rebuild: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The study report (``optimize.json``); ``rebuild`` (:func:`rebuild_record`) is what ``optimize --point``
    checks a point's direction against when it writes it again."""
    o = result.options
    chosen = result.chosen
    return {
        "schema": SCHEMA,
        "weightedit_version": __version__,
        "model": model,
        "written": written,
        **({"rebuild": rebuild} if rebuild is not None else {}),
        "options": {
            **o.setup_key(),
            "trials": o.trials,
            "sampler": Sampler(o.sampler).value,
            "seed": o.seed,
            "search_space": SearchSpace(o.search_space).value,
            "layer_window": o.layer_window,
            "direction_scope": DirectionScope(o.direction_scope).value,
            "target_refusal": o.target_refusal,
            "choice_rule": ChoiceRule(o.choice_rule).value,
            "kl_budget": o.kl_budget,
            "lang_kl_budget": o.lang_kl_budget,
            "n_kl": o.kl_prompts,
            "verify": o.verify,
            "max_new_tokens": o.max_new_tokens,
            "judge": o.judge,
            "trial_tokens": o.trial_tokens,
        },
        "split": {t.lang: t.split for t in result.setup.targets},
        "n_per_language": {
            t.lang: {"harmful": len(t.harmful), "harmless": len(t.harmless)} for t in result.setup.targets
        },
        "refusing_languages": [t.lang for t in result.setup.refusing],
        "search": _search_section(result),
        "first_trial": {
            "what": "the full edit along the study's anchor (see search.anchor)",
            # None with per-layer directions: each decoder layer's writers read their own.
            "layer": result.trials[0].point.layer if result.trials and not result.trials[0].point.per_layer else None,
            "position": result.trials[0].point.position if result.trials else None,
        },
        "baseline": {
            t.lang: {
                "refusal_estimate": t.base_refusal,
                "first_token_estimate": t.first_token_refusal,
                "tokens": list(t.tokens.tokens),
                "judged": result.baseline_judged.get(t.lang),
            }
            for t in result.setup.targets
        },
        "baseline_pooled": pooled_refusal(result.baseline_judged, result.baseline_judged),
        "choice": {
            "rule": ChoiceRule(o.choice_rule).value,
            "target_refusal": o.target_refusal,
            "kl_budget": o.kl_budget,
            "lang_kl_budget": o.lang_kl_budget,
            "statement": choice_statement(o.choice_rule, o.target_refusal, o.kl_budget, o.lang_kl_budget),
        },
        "trials": [t.to_json() for t in result.trials],
        "front": [t.number for t in result.front],
        "verified": [v.to_json() for v in result.verified],
        "chosen": None
        if chosen is None
        else {
            **chosen.trial.to_json(),
            "judged": chosen.judged,
            "pooled": chosen.pooled,
            "rule": ChoiceRule(o.choice_rule).value,
        },
        "resumed_trials": result.resumed_trials,
        "seconds": round(result.seconds, 1),
        "timings_s": {k: round(v, 1) for k, v in result.timings.items()},
        "method": {
            "search": (
                f"judged refusal share of {o.trial_tokens}-token greedy completions ({o.judge} judge) and mean "
                "first-token KL on the select split"
                if o.trial_tokens
                else "first-token refusal share (score > 0) and mean first-token KL on the select split"
            ),
            "verification": "greedy generations of the harmful select prompts, judged; Wilson 95% intervals",
        },
    }


def rate_text(v: dict[str, Any] | None, digits: int = 0) -> str:
    """``k/n = rate% [Wilson 95% interval]`` of a judged count (``—`` when there is none)."""
    if not v or v.get("rate") is None:
        return "—"
    lo, hi = v["ci"]
    return f"{v['k']}/{v['n']} = {100 * v['rate']:.{digits}f}% [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"


def _search_text(data: dict[str, Any]) -> str:
    return _space_text(data) + _harmless_text(data["options"].get("orthogonal_to_harmless", False))


def _harmless_text(setting: bool | None) -> str:
    if setting is None:
        return " The share of the harmless mean's direction removed from the direction is searched (0 to 1)."
    return " The direction is made orthogonal to the harmless mean." if setting else ""


def _space_text(data: dict[str, Any]) -> str:
    search = data["search"]
    if search.get("direction_scope") == DirectionScope.PER_LAYER.value:
        position = "every post-instruction position" if search["position"] is None else f"position {search['position']}"
        return (
            "Search space: per-layer directions (each decoder layer's writers lose the mean difference at that "
            f"layer's output; the embeddings layer 0's), {position}, the trials spent on the writers' weights."
        )
    low, high = search["direction_layers"]
    if search["space"] == SearchSpace.FREE.value:
        return f"Search space: free (direction layer {low:.2f}–{high:.2f}, every post-instruction position)."
    anchor = search["anchor"]
    source = (
        "the first-order screen's best candidate"
        if anchor["screened"]
        else "**the default point**: the first-order screen had no refusal tokens that qualify"
    )
    return (
        f"Search space: anchored at direction layer {anchor['layer']:.2f}, position {anchor['position']} ({source}); "
        f"the direction layer searched within {search['layer_window']:g} layers of it ({low:.2f}–{high:.2f}), the "
        "position fixed, the trials spent on the writers' weights."
    )


def _estimate(data: dict[str, Any]) -> str:
    """What the trials' refusal is, in a few words (a report of before the judged estimate has no trial_tokens)."""
    n = data["options"].get("trial_tokens") or 0
    return f"judged, {n} tokens" if n else "first token"


def markdown(data: dict[str, Any]) -> str:
    langs = list(data["baseline"])
    lines = [
        f"# weightedit optimize: {data['model']}",
        "",
        f"{len(data['trials'])} trials ({data['options']['sampler']}), objectives over {', '.join(langs)}: "
        f"refusal share ({_estimate(data)}) and first-token KL on each language's select prompts "
        f"({next(iter(data['n_per_language'].values()))['harmful']} harmful + "
        f"{next(iter(data['n_per_language'].values()))['harmless']} harmless per language; "
        f"split: {next(iter(data['split'].values()))}; refusing at baseline, the objectives: "
        f"{', '.join(data['refusing_languages'])}). The trials whose estimate is near the target "
        "in every refusing language are re-measured, lowest KL first, with judged greedy "
        f"generations ({data['options']['max_new_tokens']} tokens, {data['options']['judge']} judge; Wilson 95%).",
        "",
        _search_text(data),
        "",
        *_enqueued_note(data),
        f"Choice rule ({data['choice']['rule']}): {data['choice']['statement']}.",
        "",
        "## Pareto front (search estimates)",
        "",
        *_front_note(data),
        f"| trial | direction layer | position | refusal ({_estimate(data)}) | KL (mean) | KL (highest language) "
        "| profile |",
        "|---|---|---|---|---|---|---|",
    ]
    trials = {t["trial"]: t for t in data["trials"]}
    for number in data["front"]:
        t = trials[number]
        lines.append(
            f"| {number} | {_direction_layer(t)} | {t['position']} | {100 * t['refusal_estimate']:.0f}% | "
            f"{t['kl']:.3f} | {_highest_kl(t)} | {_profile_text(t['profile'])}{_share_text(t)} |"
        )
    lines += _costs(data)[0]
    lines += [
        "",
        "## Judged (select split)",
        "",
        "| "
        + " | ".join(
            ["language", "unedited", *(_judged_header(v["trial"], trials, data["front"]) for v in data["verified"])]
        )
        + " |",
        "|---|---|" + "---|" * len(data["verified"]),
    ]
    for lang in langs:
        row = [language_label(lang), rate_text(data["baseline"][lang]["judged"])]
        row += [rate_text(v["judged"].get(lang)) for v in data["verified"]]
        lines.append("| " + " | ".join(row) + " |")
    pooled = data["baseline_pooled"]
    row = [f"**pooled** ({len(pooled['languages'])} refusing at baseline)", rate_text(pooled, 1)]
    lines.append("| " + " | ".join(row + [rate_text(v["pooled"], 1) for v in data["verified"]]) + " |")
    rule = data["choice"]["rule"]
    verdicts = [
        f"✓ passes the {rule} rule" if v["meets_target"] else "misses: " + "; ".join(v["misses"])
        for v in data["verified"]
    ]
    lines.append("| " + " | ".join(["**verdict**", ""] + verdicts) + " |")
    lines.append("")
    chosen = data["chosen"]
    target = f"{100 * data['choice']['target_refusal']:g}%"
    if chosen is None:
        misses = "; ".join(f"trial {v['trial']}: {', '.join(v['misses'])}" for v in data["verified"])
        lines.append(
            f"**No point chosen** by the {data['choice']['rule']} rule (target {target}): {misses or _unjudged(data)}."
        )
    else:
        lines.append(
            f"**Chosen: trial {chosen['trial']}** by the {chosen['rule']} rule (target {target}; pooled "
            f"{rate_text(chosen['pooled'], 1)}; KL {chosen['kl']:.3f}; {_where(chosen)}, "
            f"position {chosen['position']}; {_profile_text(chosen['profile'])}{_share_text(chosen)}); written to "
            f"{data['written'] or '(not written)'}."
        )
    return "\n".join(lines) + "\n"


def _enqueued_note(data: dict[str, Any]) -> list[str]:
    """The trials that ran points given to the study (``--enqueue``), where there are any."""
    numbers = [str(t["trial"]) for t in data["trials"] if t.get("enqueued")]
    if not numbers:
        return []
    which = f"{', '.join(numbers[:-1])} and {numbers[-1]}" if len(numbers) > 1 else numbers[0]
    verb = "ran points" if len(numbers) > 1 else "ran a point"
    return [
        f"Trial{'s' if len(numbers) > 1 else ''} {which} {verb} given to the study (enqueued), not drawn by the sampler.",
        "",
    ]


def _front_note(data: dict[str, Any]) -> list[str]:
    """With a per-language KL bound the front holds only the trials within it: say so, and say when none is."""
    bound = data["choice"].get("lang_kl_budget")
    if bound is None:
        return []
    feasible = len(_within_bound(data, bound))
    text = f"Only trials with every language's KL at most {bound:g} (the per-language bound): {feasible} of {len(data['trials'])}."
    return [text if feasible else text + " **No trial is within the bound.**", ""]


def _within_bound(data: dict[str, Any], bound: float) -> list[dict[str, Any]]:
    """The trials of the report whose every language's KL is at most ``bound``."""
    return [t for t in data["trials"] if all(v["kl"] <= bound for v in t["languages"].values())]


def _scored_in(t: dict[str, Any], lang: str) -> bool:
    """Whether trial record ``t`` has a refusal estimate in ``lang`` (languages that are no objective have none)."""
    return (t["languages"].get(lang) or {}).get("refusal") is not None


def _costs(data: dict[str, Any]) -> tuple[list[str], str | None]:
    """The report's section on what each language's refusal cost, and the language it cost most in.

    Per language refusing at baseline, over every trial (search estimates): the lowest KL in that language at which
    a trial's estimate passed the choice rule's test of one language, what the other languages paid there, and (with
    a per-language bound) the lowest estimate any trial within the bound reached. The language whose refusal costs
    most (or never passed) is the one that limits the trade-off."""
    target = data["choice"]["target_refusal"]
    bound = data["choice"].get("lang_kl_budget")
    strict = data["choice"]["rule"] == ChoiceRule.STRICT.value

    def passes(t: dict[str, Any], lang: str) -> bool:
        """The choice rule's test of one language, on the estimate (a share of its harmful select prompts)."""
        if strict:
            return estimate(t, lang) <= target
        n = data["n_per_language"][lang]["harmful"]
        interval = wilson_interval(round(estimate(t, lang) * n), n)
        return interval is not None and interval[0] <= target

    def estimate(t: dict[str, Any], lang: str) -> float:
        return float(t["languages"][lang]["refusal"])

    def other(t: dict[str, Any], lang: str) -> str:
        kls = {k: v["kl"] for k, v in t["languages"].items() if k != lang}
        if not kls:  # the study's only language
            return "—"
        worst = max(kls, key=lambda k: kls[k])
        return f"{kls[worst]:.3f} ({worst})"

    within = _within_bound(data, bound) if bound is not None else []
    rows, costs = [], {}
    for lang in data["refusing_languages"]:
        scored = [t for t in data["trials"] if _scored_in(t, lang)]
        if not scored:
            continue
        cleared = [t for t in scored if passes(t, lang)]
        if cleared:
            best = min(cleared, key=lambda t: t["languages"][lang]["kl"])
            costs[lang] = best["languages"][lang]["kl"]
            cell = f"{costs[lang]:.3f} (trial {best['trial']}) | {other(best, lang)}"
        else:
            costs[lang] = math.inf
            low = min(scored, key=lambda t: estimate(t, lang))
            cell = f"never (lowest estimate {100 * estimate(low, lang):.0f}%, trial {low['trial']}) | —"
        row = f"| {language_label(lang)} | {cell} |"
        if bound is not None:
            mine = [t for t in within if _scored_in(t, lang)]
            if mine:
                low = min(mine, key=lambda t: (estimate(t, lang), t["languages"][lang]["kl"]))
                row += f" {100 * estimate(low, lang):.0f}% (trial {low['trial']}) |"
            else:
                row += " no trial within it |"
        rows.append(row)
    if not rows:
        return [], None
    hardest = max(costs, key=lambda k: costs[k])
    head = "| language | its lowest KL where it passes (trial) | highest other language's KL there |"
    head += f" lowest estimate within the bound {bound:g} (trial) |" if bound is not None else ""
    what = (
        "passed in no trial" if math.isinf(costs[hardest]) else f"passed only at KL {costs[hardest]:.3f} or more in it"
    )
    test = (
        f"its estimate at most {100 * target:g}%"
        if strict
        else f"the lower end of the Wilson 95% interval of its estimate at most {100 * target:g}%"
    )
    return [
        "",
        "## What removing each language's refusal cost (search estimates)",
        "",
        f"Over all {len(data['trials'])} trials, each language refusing at baseline against the "
        f"{data['choice']['rule']} rule's test of one language ({test}). Hardest: {language_label(hardest)}, which "
        f"{what}.",
        "",
        head,
        "|---|---|---|" + ("---|" if bound is not None else ""),
        *rows,
    ], hardest


def _plot_language(ax: Any, data: dict[str, Any], lang: str) -> None:
    """Every trial's refusal estimate in ``lang`` against its KL in ``lang``, the bound marked."""
    scored = [t for t in data["trials"] if _scored_in(t, lang)]
    ax.scatter(
        [t["languages"][lang]["kl"] for t in scored],
        [100 * t["languages"][lang]["refusal"] for t in scored],
        s=14,
        color="#55A868",
        label="trial",
    )
    bound = data["choice"].get("lang_kl_budget")
    if bound is not None:
        ax.axvline(bound, color="#C44E52", ls="--", lw=1, label=f"per-language bound {bound:g}")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"KL in {lang} (nats)")
    ax.set_ylabel(f"refusal estimate in {lang} ({_estimate(data)}, %)")
    ax.set_title(f"the hardest language: {language_label(lang)}")
    ax.legend(fontsize=7)


def _unjudged(data: dict[str, Any]) -> str:
    bound = data["choice"].get("lang_kl_budget")
    if bound is not None and data["trials"]:
        return f"no point judged: no trial keeps every language's KL within the per-language bound {bound:g}"
    return "no point judged"


def _direction_layer(point: dict[str, Any]) -> str:
    """Where a trial read its direction: its layer, or ``per layer`` (each decoder layer its own)."""
    if point.get("direction_scope") == DirectionScope.PER_LAYER.value:
        return "per layer"
    return f"{point['direction_layer']:.2f}"


def _where(point: dict[str, Any]) -> str:
    if point.get("direction_scope") == DirectionScope.PER_LAYER.value:
        return "per-layer directions"
    return f"direction layer {point['direction_layer']:.2f}"


def _judged_header(number: int, trials: dict[int, dict[str, Any]], front: list[int]) -> str:
    """A judged point's column: its trial, mean and highest-language KL, and whether the front holds it (points
    off the front are judged too, and appear in no other table)."""
    t = trials[number]
    where = "" if number in front else ", off the front"
    return f"trial {number} (KL {t['kl']:.3f}, highest {_highest_kl(t)}{where})"


def _highest_kl(trial: dict[str, Any]) -> str:
    """The language whose KL is highest, with it: the objective is the mean, a per-language bar reads the highest."""
    kls = {lang: v["kl"] for lang, v in (trial.get("languages") or {}).items() if v.get("kl") is not None}
    if not kls:
        return "—"
    lang = max(kls, key=lambda k: kls[k])
    return f"{kls[lang]:.3f} ({lang})"


def _share_text(point: dict[str, Any]) -> str:
    """The share of the harmless mean's direction removed from the point's direction, when it has one."""
    share = point.get("harmless_share")
    return "" if share is None else f"; harmless share {share:.2f}"


def _profile_text(p: dict[str, Any]) -> str:
    def k(x: dict[str, Any] | None) -> str:
        if x is None:
            return "1"
        width = "∞" if x["width"] is None else f"{x['width']:.1f}"
        return f"{x['peak']:.2f}@{x['center']:.1f}±{width}→{x['floor']:.2f}"

    text = f"attn {k(p['attention'])}, mlp {k(p['mlp'])}, emb {p['embedding']:.2f}"
    return text + (", norms kept" if p["preserve_norm"] else "")


def plot(data: dict[str, Any], path: Path) -> None:
    trials = {t["trial"]: t for t in data["trials"]}
    front = [trials[n] for n in data["front"]]
    hardest = _costs(data)[1]  # the language whose refusal cost most to remove, given its own panel
    fig, axes = plt.subplots(1, 3 if hardest else 2, figsize=(18 if hardest else 12, 4.8), dpi=120)
    left, right = axes[0], axes[1]
    left.scatter(
        [t["kl"] for t in data["trials"]],
        [100 * t["refusal_estimate"] for t in data["trials"]],
        s=12,
        color="#bbbbbb",
        label=f"trial ({_estimate(data)} estimate)",
    )
    left.plot(
        [t["kl"] for t in front],
        [100 * t["refusal_estimate"] for t in front],
        "-o",
        color="#4C72B0",
        ms=4,
        label="Pareto front (estimate)",
    )
    for v in data["verified"]:
        t = trials[v["trial"]]
        ks, ns = v["pooled"]["k"], v["pooled"]["n"]
        marker = "*" if data["chosen"] and data["chosen"]["trial"] == v["trial"] else "D"
        left.scatter(
            [t["kl"]], [100 * ks / max(ns, 1)], marker=marker, s=90 if marker == "*" else 36, color="#C44E52", zorder=3
        )
    left.scatter([], [], marker="D", color="#C44E52", label="judged (pooled: languages refusing at baseline)")
    left.set_xscale("symlog", linthresh=1e-3)
    left.set_xlabel("mean KL on harmless select prompts (nats)")
    left.set_ylabel("refusal (%)")
    left.set_title("trials and front")
    left.legend(fontsize=7)
    xs = [t["kl"] for t in front]
    tab20 = plt.get_cmap("tab20")  # 14 languages: the default cycle of 10 would repeat colours
    colours = [tab20(i / 19) for i in range(20)]
    for i, lang in enumerate(data["baseline"]):
        shares = [t["languages"][lang].get("refusal") for t in front]
        if any(x is None for x in shares):  # a language that is no objective has no estimate in judged trials
            continue
        right.plot(xs, [100 * x for x in shares], "-o", ms=3, label=lang, color=colours[i % len(colours)])
    right.set_xscale("symlog", linthresh=1e-3)
    right.set_xlabel("mean KL of the front point (nats)")
    right.set_ylabel(f"refusal estimate ({_estimate(data)}, %)")
    right.set_title("per language along the front")
    right.legend(fontsize=6, ncol=2)
    if hardest:
        _plot_language(axes[2], data, hardest)
    n = next(iter(data["n_per_language"].values()))["harmful"]
    fig.text(
        0.01, 0.01, f"select split, n={n} harmful prompts per language; judged points: greedy generations", fontsize=7
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_study_report(data: dict[str, Any], work_dir: Path) -> dict[str, Path]:
    files = {"json": work_dir / "optimize.json", "md": work_dir / "optimize.md", "png": work_dir / "front.png"}
    write_text_atomic(files["json"], json.dumps(data, indent=2, default=list) + "\n")
    write_text_atomic(files["md"], markdown(data))
    plot(data, files["png"])
    return files
