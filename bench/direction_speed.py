"""Activation capture throughput (prompts per second) at batch sizes 1, 8 and 32, relative to batch 1.

    python bench/direction_speed.py                                   # the demo model
    python bench/direction_speed.py --model recipe:smollm2-135m-instruct --prompts 32

Each batch size captures the same built-in English prompts (harmful + harmless, formatted with the chat
template) after one warm-up batch; the baseline is batch size 1 measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="recipe:qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--prompts", type=int, default=32, help="prompts captured per batch size")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    import torch

    import weightedit
    from weightedit.prompts import builtin_prompts
    from weightedit.runtime.activations import capture_means
    from weightedit.runtime.modeling import load_model
    from weightedit.runtime.options import ModelLoadOptions

    loaded = load_model(args.model, ModelLoadOptions(dtype=args.dtype), progress=False)
    half = args.prompts // 2
    texts = loaded.format(
        [p.text for p in builtin_prompts("harmful", "en", "train")[:half]]
        + [p.text for p in builtin_prompts("harmless", "en", "train")[: args.prompts - half]]
    )
    tokens = sum(len(loaded.tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    capture_means(loaded, texts[:2], batch_size=2)  # warm-up
    rows = []
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        t = time.perf_counter()
        capture_means(loaded, texts, batch_size=bs)
        rows.append((bs, time.perf_counter() - t))
    base = rows[0][1]
    print()
    print(
        f"weightedit {weightedit.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )
    print(
        f"model {args.model} ({loaded.n_layers} layers, d_model {loaded.d_model}, {loaded.dtype}); "
        f"{len(texts)} prompts, {tokens} tokens ({tokens / len(texts):.1f} per prompt), {loaded.n_post} post-instruction positions"
    )
    print()
    print("| batch size | seconds | prompts/s | tokens/s | speed-up vs batch 1 |")
    print("|---:|---:|---:|---:|---:|")
    for bs, s in rows:
        print(f"| {bs} | {s:.1f} | {len(texts) / s:.2f} | {tokens / s:.1f} | {base / s:.2f}× |")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
