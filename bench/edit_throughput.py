"""Streaming edit vs plain file copy vs the naive load/edit/save path, on a multi-GB sharded checkpoint.

    python bench/edit_throughput.py                      # synthetic bf16 checkpoint of a real 1.5B config
    python bench/edit_throughput.py --model recipe:qwen2.5-coder-1.5b-instruct
    python bench/edit_throughput.py --model ./some/checkpoint --repeat 3

Every case runs in its own subprocess so that its peak RSS is its own. Times include flushing the
written files to disk (``cp -r`` is followed by ``sync``; weightedit fsyncs each shard). The input is
read once beforehand, so every case starts from a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD_EDIT = r"""
import json, resource, sys, time, torch
from weightedit.orthogonalize import orthogonalize_checkpoint
src, out, d = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = torch.randn(d, generator=torch.Generator().manual_seed(0))
t = time.perf_counter()
orthogonalize_checkpoint(src, out, r, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

_CHILD_NAIVE = r"""
import json, os, resource, sys, time, torch
from transformers import AutoModelForCausalLM
from weightedit.orthogonalize import orthogonalize_model_
src, out, d = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = torch.randn(d, generator=torch.Generator().manual_seed(0))
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
orthogonalize_model_(model, r)
model.save_pretrained(out, max_shard_size="1GB")
os.sync()
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def build_synthetic(folder: Path, config_name: str = "qwen2-1.5b") -> Path:
    """Random bf16 weights with the tensor names and shapes of Qwen2.5-1.5B (untied), in ~1 GB shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    )
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, p in meta.state_dict().items():
        nbytes = p.numel() * 2
        if size + nbytes > 1_000_000_000 and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        size += nbytes
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        shard.clear()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return folder


def run_child(code: str, *args: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def copy_tree(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t


def warm(src: Path) -> None:
    for f in src.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or recipe:NAME (default: synthetic 1.5B bf16)")
    parser.add_argument("--repeat", type=int, default=2, help="timed repetitions of copy and edit (best is kept)")
    parser.add_argument("--skip-naive", action="store_true", help="skip the from_pretrained/save_pretrained baseline")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()

    import torch

    import weightedit
    from weightedit.checkpoint import Checkpoint
    from weightedit.sources import resolve_model

    work = Path(tempfile.mkdtemp(prefix="weightedit-bench-", dir=args.workdir))
    try:
        if args.model:
            src = resolve_model(args.model, progress=False).folder
        else:
            print("building a synthetic 1.5B bf16 checkpoint ...", file=sys.stderr)
            src = build_synthetic(work / "src")
        ckpt = Checkpoint.open(src)
        largest = max((info for _, info in ckpt.tensors()), key=lambda t: t.numel)
        d_model = ckpt.d_model
        warm(src)

        copies, edits = [], []
        for i in range(args.repeat):
            copies.append(copy_tree(src, work / f"copy{i}"))
            shutil.rmtree(work / f"copy{i}")
            edits.append(run_child(_CHILD_EDIT, str(src), str(work / f"edit{i}"), str(d_model)))
            shutil.rmtree(work / f"edit{i}")
        naive = None if args.skip_naive else run_child(_CHILD_NAIVE, str(src), str(work / "naive"), str(d_model))

        copy_s = min(copies)
        edit = min(edits, key=lambda e: e["seconds"])
        budget = 2 * largest.numel * 4 + 300e6
        gib = 1024**3
        print()
        print(f"weightedit {weightedit.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
        print(f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
        print(
            f"checkpoint: {src} — {ckpt.total_bytes / 1e9:.2f} GB in {len(ckpt.shards)} shards; largest tensor "
            f"{largest.name} {list(largest.shape)} ({largest.numel * 4 / gib:.2f} GiB in float32)"
        )
        print()
        print("| case | baseline s (cp -r + sync) | weightedit s | ratio | peak RSS |")
        print("|---|---:|---:|---:|---:|")
        print(
            f"| streaming edit | {copy_s:.2f} | {edit['seconds']:.2f} | {edit['seconds'] / copy_s:.2f}× | {edit['peak_rss'] / gib:.2f} GiB |"
        )
        if naive:
            print(
                f"| naive from_pretrained + edit + save_pretrained | {copy_s:.2f} | {naive['seconds']:.2f} | "
                f"{naive['seconds'] / copy_s:.2f}× | {naive['peak_rss'] / gib:.2f} GiB |"
            )
        print()
        ok_time = edit["seconds"] <= 1.5 * copy_s
        ok_rss = edit["peak_rss"] <= budget
        print(f"target edit ≤ 1.5× copy: {'met' if ok_time else 'NOT met'} ({edit['seconds'] / copy_s:.2f}×)")
        print(
            f"target peak RSS ≤ 2 × largest tensor in float32 + 300 MB = {budget / gib:.2f} GiB: "
            f"{'met' if ok_rss else 'NOT met'} ({edit['peak_rss'] / gib:.2f} GiB)"
        )
        copy_runs = ", ".join(f"{c:.2f}" for c in copies)
        edit_runs = ", ".join(f"{e['seconds']:.2f}" for e in edits)
        print(f"all copy runs: {copy_runs} s; edit runs: {edit_runs} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
