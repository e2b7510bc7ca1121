"""Plots for reports: grouped bars per language and heatmaps, written as PNG with matplotlib (Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..prompts import LANGUAGE_NAMES  # noqa: E402

__all__ = ["language_label", "grouped_bars", "heatmap"]


def language_label(code: str) -> str:
    return f"{LANGUAGE_NAMES[code]} ({code})" if code in LANGUAGE_NAMES else code


def grouped_bars(
    path: Path,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    reference: float | None = None,
    value_format: str = "{:.0f}",
    intervals: Mapping[str, Sequence[Sequence[float] | None]] | None = None,
    note: str | None = None,
) -> Path:
    """One group of bars per label (language), one bar per series (e.g. before/after).

    Every bar carries its value (so a 0 is visibly a measured zero, not a missing bar), and the y axis leaves
    headroom above the tallest bar for the legend. ``intervals`` gives each series' ``[lo, hi]`` per label
    (same units as the values), drawn as error bars; ``note`` is printed under the axis (n, interval kind).
    """
    n = len(labels)
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * n + 2), 4.8), dpi=120)
    x = np.arange(n)
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    top = 0.0
    for i, (name, values) in enumerate(series.items()):
        vals = [np.nan if v is None else float(v) for v in values]
        xs = x + (i - (len(series) - 1) / 2) * width
        drawn = ax.bar(xs, vals, width, label=name, color=colors[i % len(colors)])
        labels_i = ["" if np.isnan(v) else value_format.format(v) for v in vals]
        ci = (intervals or {}).get(name)
        if ci is not None:
            lo = [0.0 if c is None or np.isnan(v) else max(0.0, v - float(c[0])) for v, c in zip(vals, ci, strict=True)]
            hi = [0.0 if c is None or np.isnan(v) else max(0.0, float(c[1]) - v) for v, c in zip(vals, ci, strict=True)]
            ax.errorbar(xs, np.nan_to_num(vals), yerr=[lo, hi], fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
            top = max([top, *(float(c[1]) for c in ci if c is not None)])
            # Values go above the error bar, so they stay readable.
            for xi, v, h in zip(xs, vals, hi, strict=True):
                if not np.isnan(v):
                    ax.annotate(
                        value_format.format(v),
                        (xi, v + h),
                        xytext=(0, 1.5),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
        else:
            ax.bar_label(drawn, labels=labels_i, fontsize=7, padding=1.5)
        top = max([top, *(v for v in vals if not np.isnan(v))])
    if reference is not None:
        ax.axhline(reference, color="grey", linewidth=1, linestyle="--")
    ax.set_xticks(x)
    ax.set_xticklabels([language_label(c) for c in labels], rotation=40, ha="right", fontsize=9)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    else:
        ax.set_ylim(0, max(top, reference or 0.0) * 1.2 or 1.0)
    ax.set_title(title, fontsize=11)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="dimgray", ha="left", va="bottom")
    if len(series) > 1:
        ax.legend(frameon=False, ncols=len(series), loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def heatmap(
    path: Path,
    matrix: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    fmt: str = "{:.2f}",
    colorbar: str = "",
) -> Path:
    """An annotated heatmap (rows × cols)."""
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(cols) + 3), max(5, 0.5 * len(rows) + 2)), dpi=120)
    im = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([language_label(c) for c in cols], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([language_label(c) for c in rows], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    if len(rows) * len(cols) <= 400:
        for i in range(len(rows)):
            for j in range(len(cols)):
                v = matrix[i, j]
                if np.isnan(v):
                    continue
                # Black text on light cells, white on dark ones, whatever the colormap.
                r, g, b, _ = im.cmap(im.norm(v))
                light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
                ax.text(
                    j, i, fmt.format(v), ha="center", va="center", fontsize=6.5, color="black" if light else "white"
                )
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if colorbar:
        cbar.set_label(colorbar)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
