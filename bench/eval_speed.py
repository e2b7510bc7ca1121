"""Evaluation throughput: first-token scoring and judged-generation decoding, before and after batching.

    python bench/eval_speed.py                                      # demo model, 4 languages x 8 prompts
    python bench/eval_speed.py --model recipe:smollm2-135m-instruct --langs en,de,zh,ar,yo,ja --n 12

Loads the model once and times, on the same held-out (test-split) harmful prompts of every language:

- scoring (next-token log-probabilities after each harmful and harmless prompt: refusal scores and KL):
  *before* = one call per language and kind with every prompt run in full; *after* = what the evaluator
  does, one call per language with both kinds together (fuller batches) and the chat template's shared
  prefix computed once (``LoadedModel.prefix_caching``);
- generation (greedy completions of up to ``--max-new-tokens`` tokens, what the judge reads):
  *before* = ``model.generate`` once per language (a batch runs until its longest row ends);
  *after* = weightedit's loop over all languages pooled and sorted by length, shared prefix reused,
  rows that reach EOS dropped from the batch.

Both generation paths must produce the same completions (greedy decoding); the script checks it and
reports any difference. The table gives prompts/s, new tokens/s (tokens actually written, up to each
EOS) and the after/before speed-up, measured in the same run. JSON goes to ``bench/results/eval-speed/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from weightedit.evaluation.metrics import generate_ids, stop_token_ids
from weightedit.prompts import role_prompts
from weightedit.runtime.activations import last_logprobs
from weightedit.runtime.modeling import batches, load_model


def hf_generate_per_language(loaded, per_lang: dict[str, list[str]], max_new_tokens: int, batch_size: int):
    """The old path: ``model.generate`` on each language's prompts, batch by batch."""
    stops = sorted(stop_token_ids(loaded))
    out: dict[str, list[list[int]]] = {}
    with torch.inference_mode():
        for lang, texts in per_lang.items():
            rows: list[list[int]] = [[] for _ in texts]
            for batch in batches(loaded, texts, batch_size):
                generated = loaded.model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=loaded.tokenizer.pad_token_id,
                )
                for i, ids in zip(batch.index, generated[:, batch.input_ids.shape[1] :].tolist(), strict=True):
                    ends = [j for j, t in enumerate(ids) if t in stops]
                    rows[i] = ids[: ends[0] + 1] if ends else ids
            out[lang] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="recipe:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--langs", default="en,de,zh,yo")
    parser.add_argument("--n", type=int, default=8, help="held-out harmful prompts per language")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16, help="scoring batch size")
    parser.add_argument("--gen-batch-size", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval-speed")
    args = parser.parse_args()

    console = Console(stderr=True, width=160)
    langs = args.langs.split(",")
    loaded = load_model(args.model, progress=True)
    per_lang = {lang: loaded.format(role_prompts(None, "harmful", lang, "judge").texts[: args.n]) for lang in langs}
    harmless = {lang: loaded.format(role_prompts(None, "harmless", lang, "judge").texts[: args.n]) for lang in langs}
    pooled = [t for texts in per_lang.values() for t in texts]
    n_prompts = len(pooled)
    rows: list[dict] = []
    last_logprobs(loaded, pooled[:2], batch_size=2)  # warm-up (first-call allocations), not timed

    # Scoring: harmful and harmless prompts of every language.
    caching = loaded.prefix_caching
    loaded.prefix_caching = False
    t = time.perf_counter()
    before_lp = [
        last_logprobs(loaded, kind[lang], batch_size=args.batch_size) for lang in langs for kind in (per_lang, harmless)
    ]
    s_before = time.perf_counter() - t
    loaded.prefix_caching = caching
    t = time.perf_counter()
    after_lp = [last_logprobs(loaded, per_lang[lang] + harmless[lang], batch_size=args.batch_size) for lang in langs]
    s_after = time.perf_counter() - t
    max_diff = float((torch.cat(before_lp) - torch.cat(after_lp)).abs().max())
    n_scored = 2 * n_prompts
    rows.append(
        {
            "stage": "scoring",
            "path": "per language and kind, full prompts",
            "seconds": s_before,
            "tokens": None,
            "n": n_scored,
        }
    )
    rows.append(
        {
            "stage": "scoring",
            "path": "per language, kinds together, shared prefix once",
            "seconds": s_after,
            "tokens": None,
            "n": n_scored,
        }
    )

    # Generation.
    console.print(f"generating {n_prompts} completions twice (≤{args.max_new_tokens} tokens)…")
    t = time.perf_counter()
    before = hf_generate_per_language(loaded, per_lang, args.max_new_tokens, args.gen_batch_size)
    g_before = time.perf_counter() - t
    t = time.perf_counter()
    after = generate_ids(loaded, pooled, max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size)
    g_after = time.perf_counter() - t
    before_flat = [ids for rows_ in before.values() for ids in rows_]
    same = sum(a == b for a, b in zip(before_flat, after, strict=True))
    new_tokens = sum(len(ids) for ids in after)
    rows.append(
        {
            "stage": "generation",
            "path": "model.generate per language",
            "seconds": g_before,
            "tokens": new_tokens,
            "n": n_prompts,
        }
    )
    rows.append(
        {
            "stage": "generation",
            "path": "all languages pooled, prefix reused, EOS rows dropped",
            "seconds": g_after,
            "tokens": new_tokens,
            "n": n_prompts,
        }
    )

    table = Table(
        title=f"evaluation throughput on {args.model}: {len(langs)} languages × {args.n} test prompts per kind"
    )
    for col in ("stage", "path", "seconds", "prompts/s", "new tokens/s", "speed-up"):
        table.add_column(col, justify="right" if col not in ("stage", "path") else "left")
    for i, r in enumerate(rows):
        r["prompts_per_s"] = r["n"] / r["seconds"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"] if r["tokens"] else None
        r["speedup"] = rows[i - 1]["seconds"] / r["seconds"] if i % 2 else 1.0
        table.add_row(
            r["stage"],
            r["path"],
            f"{r['seconds']:.1f}",
            f"{r['prompts_per_s']:.2f}",
            "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}×",
        )
    console.print(table)
    console.print(
        f"scoring max |Δ log p| between the paths: {max_diff:.2e}; generation: {same}/{n_prompts} completions "
        f"identical; {new_tokens} new tokens (mean {new_tokens / n_prompts:.1f} per prompt, limit "
        f"{args.max_new_tokens})"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "model": args.model,
        "langs": langs,
        "n_per_language": args.n,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "gen_batch_size": args.gen_batch_size,
        "rows": rows,
        "scoring_max_abs_diff": max_diff,
        "identical_completions": same,
        "n_prompts": n_prompts,
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform()},
        "torch": torch.__version__,
        "when": stamp,
    }
    path = args.out / f"{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
