"""Does the default fast search choose what the thorough search chooses, and at what cost?

Loads the model once, runs direction selection with ``--search thorough`` (every candidate scored exactly:
the baseline) and ``--search fast`` (the default) on the same prompts, and prints one table: the chosen
layer/position, its bypass and KL under each strategy, candidates scored, wall time and the time ratio, plus
the screen-vs-exact rank correlations the fast search records.

    python bench/selection_search.py --model recipe:qwen2.5-coder-1.5b-instruct --lang en
    python bench/selection_search.py --model recipe:smollm2-135m-instruct --allow-non-refusing

Writes ``bench/results/selection/<model>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from weightedit.direction.selection import SelectionOptions, compute_direction
from weightedit.runtime.modeling import load_model


def rule_order(score: dict, max_kl: float) -> tuple[bool, bool, float]:
    """Selection's preference: both filters passed, then the KL filter passed, then the lowest bypass."""
    kl_ok = score["kl"] is not None and score["kl"] <= max_kl
    bypass = score["bypass"] if score["bypass"] is not None else float("inf")
    return (not score["passes_filters"], not kl_ok, bypass)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lang", default="en")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--allow-non-refusing", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "selection")
    parser.add_argument(
        "--fast-scores",
        type=Path,
        help="Take the fast run from this <direction>.scores.json of `weightedit direction` (same model, prompts and "
        "options) instead of running it again.",
    )
    args = parser.parse_args()

    console = Console(stderr=True)
    loaded = load_model(args.model)
    base = SelectionOptions(
        n_train=args.n_train,
        n_val=args.n_val,
        allow_non_refusing=args.allow_non_refusing,
        allow_failing_filters=True,  # report what each strategy would choose, whatever it is
    )
    runs = {}
    if args.fast_scores:
        saved = json.loads(args.fast_scores.read_text(encoding="utf-8"))
        c = saved["chosen"]
        runs["fast"] = {
            "layer": c["layer"],
            "position": c["position"],
            "bypass": c["bypass"],
            "kl": c["kl"],
            "induce": c["induce"],
            "status": saved["status"],
            "scored_exactly": sum(s["bypass"] is not None for s in saved["candidates"]),
            "candidates": len(saved["candidates"]),
            "seconds": round(saved["timings_s"]["total"], 1),
            "search": saved["search"],
            "refusal_tokens": saved["refusal_tokens"][args.lang],
            "scores": saved["candidates"],
            "from": args.fast_scores.name,
        }
    for search in ("thorough", "fast"):
        if search in runs:
            continue
        options = dataclasses.replace(base, search=search)
        t = time.perf_counter()
        result = compute_direction(loaded, [args.lang], options, progress=True)
        seconds = time.perf_counter() - t
        c = result.chosen
        runs[search] = {
            "layer": c.layer,
            "position": c.position,
            "bypass": c.bypass,
            "kl": c.kl,
            "induce": c.induce,
            "status": result.status,
            "scored_exactly": sum(s.bypass is not None for s in result.scores),
            "candidates": len(result.scores),
            "seconds": round(seconds, 1),
            "search": result.search,
            "refusal_tokens": result.refusal_tokens[args.lang].to_dict(),
            "scores": [s.to_dict() for s in result.scores],
        }

    thorough, fast = runs["thorough"], runs["fast"]
    order = sorted(thorough["scores"], key=lambda s: rule_order(s, base.kl_threshold))
    rank = next(i for i, s in enumerate(order, 1) if (s["layer"], s["position"]) == (fast["layer"], fast["position"]))
    exact = {(s["layer"], s["position"]): s for s in thorough["scores"]}
    first = [(s["predicted_bypass"], exact[(s["layer"], s["position"])]["bypass"]) for s in fast["scores"]]
    pre = [(s["prescreen_bypass"], exact[(s["layer"], s["position"])]["bypass"]) for s in fast["scores"]]
    from weightedit.direction.selection import rank_correlation

    over_all = {
        "spearman_first_order_vs_exact_all": rank_correlation([a for a, _ in first], [b for _, b in first]),
        "spearman_prescreen_vs_exact_all": rank_correlation([a for a, _ in pre], [b for _, b in pre]),
    }

    table = Table(title=f"direction selection on {args.model} ({args.lang}): fast vs thorough")
    for col in (
        "search",
        "layer",
        "pos",
        "bypass",
        "KL",
        "induce",
        "status",
        "scored exactly",
        "seconds",
        "time ratio",
    ):
        table.add_column(col, justify="right")
    for name, r in sorted(runs.items(), key=lambda kv: kv[0] != "thorough"):
        table.add_row(
            name,
            str(r["layer"]),
            str(r["position"]),
            f"{r['bypass']:.2f}",
            f"{r['kl']:.3f}",
            "—" if r["induce"] is None else f"{r['induce']:.2f}",
            r["status"],
            f"{r['scored_exactly']}/{r['candidates']}",
            f"{r['seconds']:.0f}",
            f"{r['seconds'] / thorough['seconds']:.2f}×",
        )
    out = Console()
    out.print(table)
    same = (fast["layer"], fast["position"]) == (thorough["layer"], thorough["position"])
    out.print(
        f"same choice: {'yes' if same else 'no'}; fast's pick ranks {rank} of {len(order)} in the thorough ordering; "
        f"Spearman over all candidates: first-order screen {over_all['spearman_first_order_vs_exact_all']:.2f}, "
        f"exact pre-screen {over_all['spearman_prescreen_vs_exact_all']:.2f}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", args.model)
    payload = {
        "model": args.model,
        "lang": args.lang,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "same_choice": same,
        "fast_pick_rank_in_thorough": rank,
        **over_all,
        "runs": runs,
    }
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {args.out / f'{name}.json'}")


if __name__ == "__main__":
    main()
