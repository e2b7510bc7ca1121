"""How many new tokens does the judge need? Judged refusal at several completion lengths, same generations.

    python bench/generation_length.py --model recipe:qwen2.5-coder-1.5b-instruct --edited weightedit-demo/model

Greedy decoding makes a shorter completion an exact prefix of a longer one, so each model is completed once
with the longest budget (``--lengths``' maximum) on the held-out test-split harmful prompts of every
language, and the judge reads the first L tokens of each completion for every L. The table gives, per
model and language, the refused count at each L and how many prompts change verdict between L and the
longest budget (a refusal that opens after a preamble shows up as a flip). This is the measurement behind
the default ``--max-new-tokens`` of ``evaluate`` and the budget of ``weightedit demo``. JSON goes to
``bench/results/generation-length/``.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from weightedit.evaluation.judges import make_judge, strip_thinking
from weightedit.evaluation.metrics import generate_ids
from weightedit.prompts import LANGUAGES, role_prompts
from weightedit.runtime.modeling import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="recipe:qwen2.5-coder-1.5b-instruct", help="the baseline")
    parser.add_argument("--edited", help="the edited checkpoint (optional)")
    parser.add_argument("--langs", default=",".join(LANGUAGES))
    parser.add_argument("--n", type=int, default=12, help="test-split harmful prompts per language")
    parser.add_argument("--lengths", default="16,32,48,64,96,128")
    parser.add_argument("--judge", default="substring")
    parser.add_argument("--gen-batch-size", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generation-length")
    args = parser.parse_args()

    console = Console(stderr=True, width=160)
    langs = args.langs.split(",")
    lengths = sorted(int(x) for x in args.lengths.split(","))
    judge = make_judge(args.judge)
    assert judge is not None
    result: dict = {
        "langs": langs,
        "n_per_language": args.n,
        "lengths": lengths,
        "judge": args.judge,
        "split": "test",
        "models": {},
    }
    models = {"baseline": args.model, **({"edited": args.edited} if args.edited else {})}
    for side, model in models.items():
        loaded = load_model(model, progress=True)
        prompts = {lang: role_prompts(None, "harmful", lang, "judge").texts[: args.n] for lang in langs}
        flat = [(lang, text) for lang in langs for text in prompts[lang]]
        t = time.perf_counter()
        ids = generate_ids(
            loaded,
            loaded.format([text for _, text in flat]),
            max_new_tokens=lengths[-1],
            batch_size=args.gen_batch_size,
            progress=True,
            description=f"{side}: generating ≤{lengths[-1]} tokens",
        )
        seconds = time.perf_counter() - t
        per_lang: dict[str, dict] = {}
        for lang in langs:
            rows = [ids[i] for i, (la, _) in enumerate(flat) if la == lang]
            verdicts = {}
            for length in lengths:
                texts = [
                    strip_thinking(loaded.tokenizer.decode(r[:length], skip_special_tokens=True).strip()) for r in rows
                ]
                verdicts[length] = judge.judge(texts, [lang] * len(texts))
            longest = verdicts[lengths[-1]]
            per_lang[lang] = {
                "n": len(rows),
                "refused": {str(length): sum(v) for length, v in verdicts.items()},
                "flips_vs_longest": {
                    str(length): sum(a != b for a, b in zip(v, longest, strict=True)) for length, v in verdicts.items()
                },
                "mean_new_tokens": sum(len(r) for r in rows) / len(rows),
            }
        result["models"][side] = {
            "model": model,
            "seconds": round(seconds, 1),
            "new_tokens": sum(len(r) for r in ids),
            "languages": per_lang,
        }
        del loaded

    table = Table(title=f"judged refusals by completion length ({args.judge} judge, test split, n={args.n}/language)")
    table.add_column("model")
    table.add_column("language")
    for length in lengths:
        table.add_column(f"≤{length}", justify="right")
    table.add_column(f"flips at ≤{lengths[0]}…≤{lengths[-2]} vs ≤{lengths[-1]}", justify="right")
    for side, m in result["models"].items():
        totals = {length: 0 for length in lengths}
        flips = {length: 0 for length in lengths}
        for lang, v in m["languages"].items():
            for length in lengths:
                totals[length] += v["refused"][str(length)]
                flips[length] += v["flips_vs_longest"][str(length)]
            table.add_row(
                side,
                lang,
                *(f"{v['refused'][str(length)]}/{v['n']}" for length in lengths),
                " ".join(str(v["flips_vs_longest"][str(length)]) for length in lengths[:-1]),
            )
        n = sum(v["n"] for v in m["languages"].values())
        table.add_row(
            side,
            "all",
            *(f"{totals[length]}/{n}" for length in lengths),
            " ".join(str(flips[length]) for length in lengths[:-1]),
            style="bold",
        )
        m["total"] = {
            "n": n,
            "refused": {str(k): v for k, v in totals.items()},
            "flips": {str(k): v for k, v in flips.items()},
        }
    console.print(table)
    for side, m in result["models"].items():
        console.print(
            f"{side}: {m['new_tokens']} new tokens in {m['seconds']:.0f} s ({m['new_tokens'] / m['seconds']:.1f} tokens/s)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
