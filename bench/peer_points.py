"""Every point ``optimize_vs_peer.py`` measured on the held-out split, both tools, as one table and one plot.

    python bench/peer_points.py bench/results/optimize-vs-peer/20261206T084003Z.json ... --out points

Each results JSON holds one evaluated point of heretic, of weightedit or of both (a run that reused heretic's
evaluation with ``--peer-result`` repeats it, and a weightedit point may be written again by a later run): a point
is listed once, the first time it appears, keyed by what was evaluated (heretic's saved model; the study and trial
of weightedit's). Only runs
made with the same evaluation settings are comparable, so the settings that shape the numbers (languages, judged
and KL prompts a language, completion length, perplexity sentences) must agree across the files, or it stops.
The table gives, per point, the pooled judged refusal with its Wilson 95% interval, the mean and highest
language's first-token KL, and the highest perplexity ratio; the plot draws pooled refusal against mean KL
(interval bars on the refusal) and, beside it, against the highest language's KL, the quantity the project's
bar (≤ 0.1 in every language) bounds. Written: ``<out>.json``, ``<out>.md``, ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from weightedit.evaluation.stats import wilson_interval  # noqa: E402

SHAPING = ("model", "eval_langs", "eval_limit", "eval_kl_limit", "max_new_tokens", "ppl_limit")


def label(data: dict, tool: str, path: Path) -> str:
    """What the point is: heretic's trial budget, or the weightedit study trial written (and whether chosen)."""
    if tool == "heretic":
        return f"heretic, {data['heretic']['settings']['trials']} trials"
    ours = data["weightedit"] or {}
    rewritten = ours.get("rewritten")
    if rewritten:
        study = Path(ours["optimize_report"]).name.split("-weightedit")[0]
        which = "chosen" if rewritten.get("chosen", True) else "not chosen"
        return f"weightedit {study} trial {rewritten['trial']} ({which})"
    chosen = data.get("weightedit_chosen") or {}
    return f"weightedit {path.stem} trial {chosen.get('trial')} (chosen)"


def identity(data: dict, tool: str, path: Path) -> tuple:
    """What was evaluated: heretic's saved model (its folder and write time), or weightedit's study and trial."""
    if tool == "heretic":
        written = data["evaluations"]["heretic"].get("settings", {})
        return (tool, written.get("model"), written.get("model_written"), data["heretic"].get("wall_s"))
    ours = data["weightedit"] or {}
    rewritten = ours.get("rewritten")
    if rewritten:
        return (tool, Path(ours["optimize_report"]).name.split("-weightedit")[0], rewritten["trial"])
    return (tool, path.stem, (data.get("weightedit_chosen") or {}).get("trial"))


def points(files: list[Path]) -> tuple[list[dict], dict]:
    out: list[dict] = []
    seen: set[tuple] = set()
    shaping = None
    for path in files:
        data = json.loads(path.read_text())
        settings = {k: data["settings"].get(k) for k in SHAPING}
        if shaping is None:
            shaping = settings
        elif settings != shaping:
            sys.exit(f"error: {path} was evaluated with other settings ({settings} against {shaping}): drop it")
        for tool, summary in data["summary"].items():
            pooled = summary["refusal_edited_pooled"]
            rows = data["per_language"][tool]
            worst = max(rows, key=lambda lang: rows[lang]["kl"])
            key = identity(data, tool, path)
            if key in seen:
                continue
            seen.add(key)
            lo, hi = wilson_interval(pooled["k"], pooled["n"]) or (0.0, 0.0)
            out.append(
                {
                    "point": label(data, tool, path),
                    "tool": tool,
                    "results": path.name,
                    "refusal_k": pooled["k"],
                    "refusal_n": pooled["n"],
                    "refusal": pooled["k"] / pooled["n"],
                    "refusal_ci": [lo, hi],
                    "kl_mean": summary["kl_mean"],
                    "kl_max": rows[worst]["kl"],
                    "kl_max_lang": worst,
                    "perplexity_ratio_max": summary["perplexity_ratio_max"],
                }
            )
    out.sort(key=lambda p: (p["tool"], p["kl_mean"]))
    for tool in ("heretic", "weightedit"):  # short tags for the plot: H1, H2, … and W1, W2, … by mean KL
        for i, p in enumerate(q for q in out if q["tool"] == tool):
            p["tag"] = f"{tool[0].upper()}{i + 1}"
    return out, shaping or {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSONs of optimize_vs_peer.py")
    parser.add_argument("--out", type=Path, required=True, help="path stem of the table, JSON and plot")
    args = parser.parse_args()
    pts, shaping = points(args.results)

    cols = ("tag", "point", "pooled judged refusal [Wilson 95%]", "mean KL", "highest KL", "highest perplexity ratio")
    table = Table(title="held-out test split, both tools")
    for col in cols:
        table.add_column(col)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for p in pts:
        lo, hi = p["refusal_ci"]
        cells = [
            p["tag"],
            p["point"],
            f"{p['refusal_k']}/{p['refusal_n']} = {100 * p['refusal']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]",
            f"{p['kl_mean']:.3f}",
            f"{p['kl_max']:.3f} ({p['kl_max_lang']})",
            f"{p['perplexity_ratio_max']:.3f}",
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console(width=160).print(table)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, name in ((axes[0], "kl_mean", "mean KL over languages"), (axes[1], "kl_max", "highest language's KL")):
        for i, p in enumerate(pts):
            lo, hi = p["refusal_ci"]
            color = "tab:red" if p["tool"] == "heretic" else "tab:blue"
            ax.errorbar(
                p[key],
                100 * p["refusal"],
                yerr=[[100 * (p["refusal"] - lo)], [100 * (hi - p["refusal"])]],
                fmt="o",
                color=color,
                capsize=3,
            )
            # Points may coincide (the same refusal, close KL): the tags step up so that each stays readable.
            ax.annotate(p["tag"], (p[key], 100 * p["refusal"]), fontsize=8, xytext=(5, 3 + 9 * (i % 3)),
                        textcoords="offset points")  # fmt: skip
        if key == "kl_max":
            ax.axvline(0.1, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(f"{name} (nats, first-token KL)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("pooled judged refusal, % (Wilson 95%)")
    fig.suptitle("heretic (red, H) and weightedit (blue, W) on the held-out test split; tags as in the table")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=130)
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"settings": shaping, "files": [p.name for p in args.results], "points": pts}, indent=1) + "\n"
    )
    print(f"wrote {args.out}.{{json,md,png}}")


if __name__ == "__main__":
    main()
