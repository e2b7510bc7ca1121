"""Streaming edit versus a plain file copy, measured in interleaved pairs on three checkpoint layouts.

    python bench/edit_throughput.py                                   # demo model (1 file, 8 shards) + synthetic 7B
    python bench/edit_throughput.py --layouts demo-1file,demo-8shards --runs 5
    python bench/edit_throughput.py --model ./some/checkpoint --layouts demo-8shards
    git worktree add /tmp/before HEAD~3 && python bench/edit_throughput.py --baseline-src /tmp/before

Layouts:

- ``demo-1file`` and ``demo-8shards``: the demo model's tensors (``--model``, default
  ``recipe:qwen2.5-coder-1.5b-instruct``) re-laid out into one ``model.safetensors`` or eight shards of about
  the same size. Tensor bytes are copied as they are, so the checkpoint is the real one.
- ``synth-7b``: random bf16 weights with the tensor names and shapes of a Llama-2-7B config (13.5 GB, untied),
  generated into the work folder and deleted afterwards; it shows that memory stays flat with model size.

For each layout, after one untimed warm-up of each (which also reads the input into the page cache and
lets the edit record the input's SHA-256), the edit and the copy alternate: edit, copy, edit, copy, ...
Each run is its own process and ends with ``sync``:

- edit: ``weightedit orthogonalize --model SRC --direction r.safetensors --out OUT --quiet --json`` (the
  whole command, Python start-up and imports included), then ``sync``;
- copy: ``cp -r SRC OUT``, then ``sync``.

With ``--baseline-src DIR`` (another checkout of weightedit, e.g. a ``git worktree`` of an earlier commit) each
round also runs that checkout's edit (``PYTHONPATH=DIR/src``, same direction, same flags) between the two:
edit, baseline edit, copy. Its median and the median of the pairwise ratios edit / baseline edit are reported
beside the copy's, so a change to the edit is measured against the code before it in the same run.

Reported per layout: the median of each, the median of the pairwise ratios edit/copy (pairs are adjacent
in time, so a load change on this shared machine hits both members of a pair), each command's own peak RSS
(GNU ``/usr/bin/time``; ``wait4`` where it is missing, which counts this process's RSS at fork), user/system CPU
seconds (``wait4``), the load average around the runs, and the copy speed. The table is printed; JSON and a
PNG plot go to ``bench/results/edit-throughput/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "edit-throughput"
GIB = 1024**3
TARGET_RATIO = 1.25
TARGET_RSS = 1 * GIB

# Llama-2-7B's shapes (untied embeddings): 6.74 B parameters, 13.5 GB in bf16.
SYNTH_7B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


# ----------------------------------------------------------------------------------------------------------
# Building the layouts (O(1) memory: headers are written first, tensor bytes are copied or generated in turn)
# ----------------------------------------------------------------------------------------------------------


def _write_layout(
    folder: Path,
    tensors: list[tuple[str, str, tuple[int, ...], int]],
    n_shards: int,
    fill: Any,
) -> None:
    """Write ``tensors`` (name, dtype code, shape, nbytes) into ``n_shards`` shards of about equal size.

    ``fill(fd, index)`` appends the bytes of tensor ``index`` to the open file ``fd``.
    """
    from weightedit.io.checkpoint import encode_header

    total = sum(t[3] for t in tensors)
    groups: list[list[int]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        if n_shards > 1 and size >= total * len(groups) / n_shards and groups[-1] and len(groups) < n_shards:
            groups.append([])
        groups[-1].append(i)
        size += t[3]
    weight_map: dict[str, str] = {}
    for g, members in enumerate(groups, 1):
        name = "model.safetensors" if n_shards == 1 else f"model-{g:05d}-of-{len(groups):05d}.safetensors"
        entries, offset = [], 0
        for i in members:
            tname, dtype, shape, nbytes = tensors[i]
            entries.append((tname, dtype, shape, offset, offset + nbytes))
            offset += nbytes
            weight_map[tname] = name
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, encode_header(entries, {"format": "pt"}))
            for i in members:
                fill(fd, i)
        finally:
            os.close(fd)
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def relayout(src: Path, dst: Path, n_shards: int) -> Path:
    """Copy the checkpoint ``src`` into ``dst`` as ``n_shards`` shards (tensor bytes unchanged, same order)."""
    from weightedit.io.checkpoint import WEIGHTS_INDEX_NAME, Checkpoint

    ckpt = Checkpoint.open(src)
    items = list(ckpt.tensors())
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (WEIGHTS_INDEX_NAME, "README.md"):
            shutil.copy2(f, dst / f.name)
    fds: dict[Path, int] = {}

    def fill(fd: int, i: int) -> None:
        shard, info = items[i]
        if shard.path not in fds:
            fds[shard.path] = os.open(shard.path, os.O_RDONLY)
        done = 0
        while done < info.nbytes:
            n = os.copy_file_range(fds[shard.path], fd, info.nbytes - done, shard.data_start + info.start + done)
            if n <= 0:
                raise SystemExit(f"copying {info.name} from {shard.path} failed")
            done += n

    try:
        _write_layout(dst, [(info.name, info.dtype, info.shape, info.nbytes) for _, info in items], n_shards, fill)
    finally:
        for fd in fds.values():
            os.close(fd)
    return dst


def build_synth_7b(dst: Path) -> Path:
    """Random bf16 weights (N(0, 0.02²), norms at 1) with Llama-2-7B's names and shapes, in 3 shards."""
    import torch

    c = SYNTH_7B
    d, ff, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (d, d)),
            (p + "self_attn.v_proj.weight", (d, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (ff, d)),
            (p + "mlp.up_proj.weight", (ff, d)),
            (p + "mlp.down_proj.weight", (d, ff)),
        ]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    g = torch.Generator().manual_seed(0)
    # One random pool, sliced at a different offset for each tensor: generating 6.7 B normals would take
    # minutes on two cores, and the edit does the same work whatever the values are.
    pool = (torch.randn(64 << 20, generator=g) * 0.02).to(torch.bfloat16)

    def fill(fd: int, i: int) -> None:
        name, shape = shapes[i]
        numel = 1
        for s in shape:
            numel *= s
        if name.endswith("norm.weight"):
            data = torch.ones(numel, dtype=torch.bfloat16)
        else:
            start = (i * 7919) % pool.numel()
            reps = -(-(start + numel) // pool.numel())
            data = pool.repeat(reps)[start : start + numel] if reps > 1 else pool[start : start + numel]
        view = memoryview(data.contiguous().view(torch.uint8).numpy())
        while view:
            view = view[os.write(fd, view) :]

    tensors = []
    for name, shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        tensors.append((name, "BF16", shape, numel * 2))
    _write_layout(dst, tensors, 3, fill)
    return dst


# ----------------------------------------------------------------------------------------------------------
# Timed runs
# ----------------------------------------------------------------------------------------------------------


# A child's peak RSS as wait4 reports it starts from its parent's RSS at fork time (the kernel carries the old
# address space's high-water mark across exec), so this ~0.3-0.7 GB process would count in every run. GNU time
# forks the command from its own tiny process and reports the command's peak alone.
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def _run(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``, then ``sync``: wall time of both; CPU seconds (``wait4``) and peak RSS of ``cmd`` alone."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as rss:
        launch = [GNU_TIME, "-f", "%M", "-o", rss.name, *cmd] if GNU_TIME else cmd
        t = time.perf_counter()
        proc = subprocess.Popen(launch, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        subprocess.run(["sync"], check=True)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{err.read().decode()[-3000:]}")
        stdout = out.read().decode()
        peak_kib = int(Path(rss.name).read_text().split()[-1]) if GNU_TIME else usage.ru_maxrss
    return {
        "seconds": wall,
        "user_s": usage.ru_utime,
        "system_s": usage.ru_stime,
        "peak_rss": peak_kib * 1024,
        "peak_rss_from": "GNU time (the command alone)" if GNU_TIME else "wait4 (includes this process's RSS at fork)",
        "load_1min": load,
        "stdout": stdout,
    }


def _warm(src: Path) -> None:
    for f in sorted(src.iterdir()):
        with open(f, "rb", buffering=0) as fh:
            buf = bytearray(16 << 20)
            while fh.readinto(buf):
                pass


def bench_layout(
    name: str, src: Path, work: Path, runs: int, env: dict[str, str], baseline_env: dict[str, str] | None = None
) -> dict[str, Any]:
    import torch

    from weightedit.edit.direction_file import Direction, save_direction
    from weightedit.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(src)
    d = ckpt.d_model
    direction = save_direction(
        Direction(vector=torch.randn(d, generator=torch.Generator().manual_seed(0))), work / f"r-{name}.safetensors"
    )
    edit_cmd = [sys.executable, "-m", "weightedit.cli.main", "orthogonalize", "--model", str(src)]
    edit_cmd += ["--direction", str(direction), "--quiet", "--json", "--out"]
    out = work / f"out-{name}"

    def edit(run_env: dict[str, str] = env) -> dict[str, Any]:
        r = _run([*edit_cmd, str(out)], run_env)
        r["in_process_s"] = json.loads(r.pop("stdout"))["seconds"]
        shutil.rmtree(out)
        return r

    def copy() -> dict[str, Any]:
        r = _run(["cp", "-r", str(src), str(out)], env)
        r.pop("stdout")
        shutil.rmtree(out)
        return r

    _warm(src)
    print(f"[{name}] warm-up", file=sys.stderr)
    first_edit, first_copy = edit(), copy()
    if baseline_env is not None:
        edit(baseline_env)  # its warm-up
    edits, copies, baselines = [], [], []
    for i in range(runs):
        edits.append(edit())
        if baseline_env is not None:
            baselines.append(edit(baseline_env))
        copies.append(copy())
        before = f", baseline edit {baselines[-1]['seconds']:.2f} s" if baselines else ""
        print(
            f"[{name}] round {i + 1}/{runs}: edit {edits[-1]['seconds']:.2f} s{before}, "
            f"copy {copies[-1]['seconds']:.2f} s, load {edits[-1]['load_1min']:.2f}",
            file=sys.stderr,
        )
    ratios = [e["seconds"] / c["seconds"] for e, c in zip(edits, copies, strict=True)]
    # The edit alone, without Python's start-up and imports (about 1.5 s, most of it importing PyTorch).
    in_process = [e["in_process_s"] / c["seconds"] for e, c in zip(edits, copies, strict=True)]
    med = statistics.median
    nbytes = sum(f.stat().st_size for f in src.iterdir())
    baseline: dict[str, Any] | None = None
    if baselines:
        vs = [e["seconds"] / b["seconds"] for e, b in zip(edits, baselines, strict=True)]
        baseline = {
            "source": baseline_env["PYTHONPATH"] if baseline_env else None,
            "edit_s": [b["seconds"] for b in baselines],
            "median_edit_s": med(b["seconds"] for b in baselines),
            "median_ratio_to_copy": med(b["seconds"] / c["seconds"] for b, c in zip(baselines, copies, strict=True)),
            "edit_over_baseline": vs,
            "median_edit_over_baseline": med(vs),
            "peak_rss": max(b["peak_rss"] for b in baselines),
            "user_s": med(b["user_s"] for b in baselines),
            "system_s": med(b["system_s"] for b in baselines),
        }
    return {
        "baseline": baseline,
        "layout": name,
        "source": str(src),
        "bytes": nbytes,
        "shards": len(ckpt.shards),
        "runs": runs,
        "edit_s": [e["seconds"] for e in edits],
        "copy_s": [c["seconds"] for c in copies],
        "edit_in_process_s": [e["in_process_s"] for e in edits],
        "ratios": ratios,
        "median_edit_s": med(e["seconds"] for e in edits),
        "median_copy_s": med(c["seconds"] for c in copies),
        "median_ratio": med(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "in_process_ratios": in_process,
        "median_in_process_ratio": med(in_process),
        "copy_mb_s": nbytes / 1e6 / med(c["seconds"] for c in copies),
        "edit_peak_rss": max(e["peak_rss"] for e in edits),
        "peak_rss_from": edits[0]["peak_rss_from"],
        "copy_peak_rss": max(c["peak_rss"] for c in copies),
        "edit_user_s": med(e["user_s"] for e in edits),
        "edit_system_s": med(e["system_s"] for e in edits),
        "copy_user_s": med(c["user_s"] for c in copies),
        "copy_system_s": med(c["system_s"] for c in copies),
        "load_1min": [r["load_1min"] for pair in zip(edits, copies, strict=True) for r in pair],
        "warmup": {
            "edit_s": first_edit["seconds"],
            "edit_user_s": first_edit["user_s"],
            "copy_s": first_copy["seconds"],
            "note": "first edit of this folder: it also hashes the input for provenance",
        },
    }


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def print_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| layout | size | pairs | `cp -r` + sync (s) | copy MB/s | edit (s) | ratio (median of pairs) | pair range "
        "| in-process edit / copy | edit CPU user / sys (s) | copy CPU user / sys (s) | edit peak RSS | load (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        loads = r["load_1min"]
        lines.append(
            f"| {r['layout']} ({r['shards']} shard{'s' if r['shards'] > 1 else ''}) | {r['bytes'] / 1e9:.2f} GB "
            f"| {r['runs']} | {r['median_copy_s']:.2f} | {r['copy_mb_s']:.0f} | {r['median_edit_s']:.2f} "
            f"| **{r['median_ratio']:.2f}×** | {r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f} "
            f"| {r['median_in_process_ratio']:.2f}× "
            f"| {r['edit_user_s']:.1f} / {r['edit_system_s']:.1f} | {r['copy_user_s']:.1f} / {r['copy_system_s']:.1f} "
            f"| {r['edit_peak_rss'] / GIB:.2f} GiB | {min(loads):.1f}–{max(loads):.1f} |"
        )
    with_baseline = [r for r in results if r.get("baseline")]
    if with_baseline:
        lines += [
            "",
            "| layout | edit (s) | baseline edit (s) | edit / baseline (median of rounds) | baseline / copy "
            "| baseline CPU user / sys (s) | baseline peak RSS |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in with_baseline:
            b = r["baseline"]
            lines.append(
                f"| {r['layout']} | {r['median_edit_s']:.2f} | {b['median_edit_s']:.2f} "
                f"| **{b['median_edit_over_baseline']:.2f}×** | {b['median_ratio_to_copy']:.2f}× "
                f"| {b['user_s']:.1f} / {b['system_s']:.1f} | {b['peak_rss'] / GIB:.2f} GiB |"
            )
    table = "\n".join(lines)
    print(table)
    print()
    for r in results:
        ok_t = r["median_ratio"] <= TARGET_RATIO
        ok_m = r["edit_peak_rss"] <= TARGET_RSS
        print(
            f"{r['layout']}: ratio {r['median_ratio']:.2f}× (target ≤ {TARGET_RATIO}: {'met' if ok_t else 'NOT met'}), "
            f"peak RSS {r['edit_peak_rss'] / GIB:.2f} GiB (target ≤ 1 GiB: {'met' if ok_m else 'NOT met'}); "
            f"in-process edit {statistics.median(r['edit_in_process_s']):.2f} s; warm-up edit {r['warmup']['edit_s']:.2f} s "
            "(hashes the input)"
        )
    return table


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, r in enumerate(results):
        series = [("copy_s", "#888888", "cp -r + sync", r["copy_s"]), ("edit_s", "#1f77b4", "edit", r["edit_s"])]
        if r.get("baseline"):
            series.append(("baseline", "#ff7f0e", "baseline edit (--baseline-src)", r["baseline"]["edit_s"]))
        width = 0.72 / len(series)
        for j, (_, color, label, values) in enumerate(series):
            x = i + (j - (len(series) - 1) / 2) * width
            med = statistics.median(values)
            ax.bar(x, med, width=width * 0.95, color=color, label=label if i == 0 else None)
            ax.scatter([x] * len(values), values, color="black", s=10, zorder=3)
            ax.text(x, med, f"{med:.1f}", ha="center", va="bottom", fontsize=8)
        top_i = max(max(values) for *_, values in series)
        ax.text(i, top_i * 1.08, f"{r['median_ratio']:.2f}×", ha="center", fontsize=9)
    ax.set_xticks(range(len(results)), [f"{r['layout']}\n{r['bytes'] / 1e9:.1f} GB" for r in results])
    ax.set_ylabel("seconds (median, dots: runs)")
    top = max(max(*r["edit_s"], *r["copy_s"], *(r["baseline"]["edit_s"] if r.get("baseline") else [])) for r in results)
    ax.set_ylim(0, top * 1.25)
    ax.set_title("Streaming edit vs cp -r, interleaved pairs (ratio: median of pairs)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="recipe:qwen2.5-coder-1.5b-instruct", help="the demo layouts' source")
    parser.add_argument("--layouts", default="demo-1file,demo-8shards,synth-7b", help="comma-separated layouts")
    parser.add_argument("--runs", type=int, default=3, help="timed pairs per layout, after one warm-up pair")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: the system temp folder)")
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON or plot")
    parser.add_argument(
        "--baseline-src", type=Path, default=None, help="another weightedit checkout whose edit runs in every round too"
    )
    args = parser.parse_args()
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    unknown = set(layouts) - {"demo-1file", "demo-8shards", "synth-7b"}
    if unknown or args.runs < 1:
        parser.error(f"unknown layouts {sorted(unknown)} (or --runs < 1)")
    if args.baseline_src is not None and not (args.baseline_src / "src" / "weightedit").is_dir():
        parser.error(f"--baseline-src {args.baseline_src}: no src/weightedit inside; pass a weightedit checkout")

    import torch

    import weightedit
    from weightedit.sources import resolve_model

    work = Path(tempfile.mkdtemp(prefix="weightedit-bench-", dir=args.workdir))
    # Hashes recorded by the edits of these temporary folders stay in a temporary cache.
    env = {**os.environ, "WEIGHTEDIT_CACHE": str(work / "cache")}
    baseline_env = None
    if args.baseline_src is not None:
        baseline_env = {**env, "PYTHONPATH": str((args.baseline_src / "src").resolve())}
    results = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    try:
        demo = resolve_model(args.model, progress=False).folder if any(x.startswith("demo") for x in layouts) else None
        for name in layouts:
            src = work / f"src-{name}"
            print(f"[{name}] building the input ...", file=sys.stderr)
            if name == "synth-7b":
                build_synth_7b(src)
            else:
                assert demo is not None
                relayout(demo, src, 1 if name == "demo-1file" else 8)
            results.append(bench_layout(name, src, work, args.runs, env, baseline_env))
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"weightedit {weightedit.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(
        f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print()
    table = print_table(results)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = started.replace(":", "").replace("-", "")
        payload = {
            "started": started,
            "weightedit_version": weightedit.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "targets": {"ratio": TARGET_RATIO, "peak_rss_bytes": TARGET_RSS},
            "results": results,
            "table": table,
        }
        (RESULTS / f"{stamp}.json").write_text(json.dumps(payload, indent=2) + "\n")
        plot(results, RESULTS / f"{stamp}.png")
        print(f"\nwrote {RESULTS / (stamp + '.json')} and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
