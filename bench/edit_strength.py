"""Does a language's remaining refusal go at a stronger edit? The per-layer full edit at λ = 1 and above, in memory.

    python bench/edit_strength.py --lang ar --strengths 1,1.25,1.5

Every edit measured on the demo model leaves two of Arabic's eight judged test prompts counted as refusals. If
they were refusals the edit only weakens, a stronger edit would remove them; if they are the judge's reading of
an answer that opens with a decline, the verdicts stay whatever the strength. This applies the per-layer full
edit (each decoder layer's writers lose that layer's unit mean difference of the direction language's fit
prompts at the last position, the embeddings the first row; no harmless share) with every attention and MLP
writer at λ (the embeddings at min(λ, 1)), in memory (``temporarily_edited``: restored exactly afterwards), and
for each λ judges greedy completions of ``--lang``'s first ``--n`` harmful test prompts (``--max-new-tokens``,
substring judge, hedge marks) and measures first-token KL on the first ``--n`` harmless test prompts of
``--kl-langs``. It is a diagnostic on the held-out split (no point is chosen from it). The table gives, per λ,
the refused prompts by index, those marked as hedged declines, and each language's KL. JSON (indices and
numbers, no text) goes to ``bench/results/edit-strength/``.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from weightedit.edit.in_memory import temporarily_edited
from weightedit.edit.profile import EditProfile, LayerKernel
from weightedit.evaluation.judges import SubstringJudge, make_judge
from weightedit.evaluation.metrics import generate_ids
from weightedit.optimize.objective import mean_differences
from weightedit.optimize.options import OptimizeOptions
from weightedit.optimize.space import EditPoint, direction_vector
from weightedit.prompts import role_prompts
from weightedit.runtime.activations import last_logprobs
from weightedit.runtime.modeling import load_model
from weightedit.runtime.options import ModelLoadOptions
from weightedit.runtime.scoring import kl_divergence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="recipe:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--lang", default="ar", help="the language whose harmful test prompts are judged")
    parser.add_argument("--kl-langs", default="en,ar,yo")
    parser.add_argument("--strengths", default="1,1.25,1.5", help="λ of every attention and MLP writer")
    parser.add_argument("--direction-lang", default="en")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n", type=int, default=8, help="test prompts a language (harmful judged, harmless KL)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "edit-strength")
    args = parser.parse_args()
    console = Console(stderr=True, width=160)
    strengths = [float(x) for x in args.strengths.split(",")]
    kl_langs = args.kl_langs.split(",")

    loaded = load_model(args.model, ModelLoadOptions(dtype="float32"), progress=True)
    options = OptimizeOptions(langs=(args.direction_lang,), direction_lang=args.direction_lang, n_train=args.n_train)
    diffs, harmless = mean_differences(loaded, options, progress=True)
    judge = make_judge("substring")
    assert isinstance(judge, SubstringJudge)
    harmful = role_prompts(None, "harmful", args.lang, "judge").texts[: args.n]
    kl_prompts = {lang: role_prompts(None, "harmless", lang, "judge").texts[: args.n] for lang in kl_langs}
    base = {lang: last_logprobs(loaded, loaded.format(texts)) for lang, texts in kl_prompts.items()}

    rows = []
    for lam in strengths:
        kernel = LayerKernel(center=0.0, peak=lam, width=float("inf"))
        profile = EditProfile(attention=kernel, mlp=kernel, embedding=min(lam, 1.0))
        point = EditPoint(layer=0.0, position=-1, profile=profile, per_layer=True, harmless_share=0.0)
        direction = direction_vector(point, diffs, harmless)
        t = time.perf_counter()
        with temporarily_edited(loaded.model, direction, profile):
            ids = generate_ids(loaded, loaded.format(harmful), max_new_tokens=args.max_new_tokens, batch_size=8)
            edited = {lang: last_logprobs(loaded, loaded.format(texts)) for lang, texts in kl_prompts.items()}
        texts = [loaded.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
        verdicts, hedges = judge.judge_marked(texts, [args.lang] * len(texts))
        kl = {lang: float(kl_divergence(base[lang], edited[lang]).mean()) for lang in kl_langs}
        rows.append(
            {
                "strength": lam,
                "refused": [i for i, v in enumerate(verdicts) if v],
                "hedged": [i for i, v in enumerate(hedges) if v],
                "n": len(texts),
                "kl": kl,
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        console.print(f"λ = {lam}: refused {rows[-1]['refused']} of {len(texts)}, KL {kl}")

    table = Table(
        title=f"per-layer full edit at λ: {args.lang} judged on {args.n} harmful test prompts "
        f"({args.max_new_tokens} tokens), first-token KL on {args.n} harmless test prompts a language"
    )
    for col in ("λ", "refused (prompt indices)", "of which hedged", *(f"KL {lang}" for lang in kl_langs), "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["strength"]),
            f"{len(r['refused'])}/{r['n']} {r['refused']}",
            str(r["hedged"]),
            *(f"{r['kl'][lang]:.3f}" for lang in kl_langs),
            str(r["seconds"]),
        )
    Console(width=160).print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(
        json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}, indent=1) + "\n"
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
