"""Is the refusal direction the same in every language? Per-language directions, cosines and transfer.

For each language, the direction is the mean difference at one layer and position (selected on the
reference language, or given). The *cosine matrix* compares the unit directions; the *transfer matrix*
holds, for every pair (A, B), the mean refusal score on B's harmful select prompts with A's direction
removed as the weight edit removes it (B's own refusal tokens). A universal direction shows up as high
cosines and a transfer matrix whose every row is low where the baseline row is high.

A language the model does not refuse in (:attr:`weightedit.scoring.RefusalTokens.refuses`) still gets a
direction and cosines, but no refusal scores: its baseline and transfer column are NaN ("does not refuse"),
since scores built on tokens that do not mark refusal mean nothing.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..io.atomic import atomic_output_dir
from ..io.comparison import COMPARISON_FILE, SCHEMA
from ..render.plots import heatmap
from ..runtime.activations import last_logprobs
from ..runtime.hooks import ablate_as_edit
from ..runtime.modeling import LoadedModel
from ..runtime.scoring import RefusalTokens, refusal_scores
from ..sources.model import public_name
from .selection import SelectionOptions, capture_language, check_refusal, compute_direction, language_data

__all__ = ["Comparison", "compare_directions", "save_comparison"]


@dataclass
class Comparison:
    model: str
    langs: list[str]
    layer: int
    position: int
    directions: dict[str, torch.Tensor]  # unit vectors
    cosine: torch.Tensor  # [n, n]
    baseline: torch.Tensor  # [n] refusal score on each language's harmful val, no intervention
    transfer: torch.Tensor  # [n, n]: row = ablated direction's language, column = evaluated language
    refusal_tokens: dict[str, RefusalTokens]
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def not_refusing(self) -> list[str]:
        return [lang for lang in self.langs if not self.refusal_tokens[lang].refuses]

    def summary(self) -> dict[str, Any]:
        n = len(self.langs)
        off = self.cosine[~torch.eye(n, dtype=torch.bool)] if n > 1 else torch.tensor([1.0])
        scored = ~torch.isnan(self.baseline)
        refusing = scored & (self.baseline > 0)
        rel = self.transfer[:, refusing] - self.baseline[refusing]
        transfer = self.transfer[:, scored]
        return {
            "cosine_min_offdiag": float(off.min()),
            "cosine_mean_offdiag": float(off.mean()),
            "baseline_mean": float(self.baseline[scored].mean()) if scored.any() else None,
            "transfer_mean": float(transfer.mean()) if transfer.numel() else None,
            "transfer_max": float(transfer.max()) if transfer.numel() else None,
            "mean_drop_where_refusing": float(-rel.mean()) if rel.numel() else 0.0,
            "languages_refusing_at_baseline": int(refusing.sum()),
            "languages_not_refusing": self.not_refusing,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "languages": self.langs,
            "layer": self.layer,
            "position": self.position,
            "cosine": self.cosine.tolist(),
            # NaN (null) where the evaluated language does not refuse.
            "baseline_refusal_score": _nulls(self.baseline.tolist()),
            "transfer_refusal_score": [_nulls(row) for row in self.transfer.tolist()],
            "refusal_tokens": {k: v.to_dict() for k, v in self.refusal_tokens.items()},
            "summary": self.summary(),
            "options": self.options,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
        }


def _nulls(values: list[float]) -> list[float | None]:
    return [None if v != v else v for v in values]


def compare_directions(
    loaded: LoadedModel,
    langs: list[str],
    options: SelectionOptions | None = None,
    *,
    reference: str = "en",
    layer: int | None = None,
    position: int | None = None,
    progress: bool = True,
) -> Comparison:
    """Per-language directions at one layer/position, their cosine matrix and the transfer matrix."""
    options = options or SelectionOptions(n_train=32, n_val=8)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    n_post = loaded.n_post
    directions: dict[str, torch.Tensor] = {}
    tokens: dict[str, RefusalTokens] = {}
    if layer is None or position is None:
        ref = compute_direction(loaded, [reference], options, progress=progress)
        layer, position = ref.direction.layer, ref.direction.position
        assert ref.direction.candidates is not None and layer is not None and position is not None
        v = ref.direction.candidates[layer, position + n_post].float()
        directions[reference] = v / v.norm()
        tokens[reference] = ref.refusal_tokens[reference]
    timings["select"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    val: dict[str, list[str]] = {}
    for lang in langs:
        data = language_data(loaded, lang, options)
        val[lang] = data.harmful_val
        if lang in directions:
            continue
        candidates, lang_tokens = capture_language(loaded, data, options, progress=progress)
        tokens[lang] = check_refusal(loaded, data, lang_tokens, options, progress=progress)
        v = candidates[layer, position + n_post]
        directions[lang] = v / v.norm()
    timings["capture"] = time.perf_counter() - t1

    stacked = torch.stack([directions[lang] for lang in langs])
    cosine = stacked @ stacked.T

    t2 = time.perf_counter()
    texts = [t for lang in langs for t in val[lang]]
    owner = [i for i, lang in enumerate(langs) for _ in val[lang]]
    owner_t = torch.tensor(owner)

    def per_language(lp: torch.Tensor) -> torch.Tensor:
        out = torch.full((len(langs),), float("nan"))
        for i, lang in enumerate(langs):
            if tokens[lang].refuses:
                out[i] = refusal_scores(lp[owner_t == i], tokens[lang].ids).mean()
        return out

    baseline = per_language(
        last_logprobs(
            loaded,
            texts,
            batch_size=options.batch_size,
            progress=progress,
            description="baseline refusal, all languages",
        )
    )
    transfer = torch.empty(len(langs), len(langs))
    for a, lang in enumerate(langs):
        lp = last_logprobs(
            loaded,
            texts,
            batch_size=options.batch_size,
            intervention=functools.partial(ablate_as_edit, loaded.model, directions[lang]),
            progress=progress,
            description=f"ablating the {lang} direction",
        )
        transfer[a] = per_language(lp)
    timings["transfer"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    return Comparison(
        model=loaded.source.public_name or loaded.source.given,
        langs=list(langs),
        layer=int(layer),
        position=int(position),
        directions=directions,
        cosine=cosine,
        baseline=baseline,
        transfer=transfer,
        refusal_tokens=tokens,
        options={
            "n_train": options.n_train,
            "n_val": options.n_val,
            "reference": reference,
            "prompts": public_name(options.prompts) if options.prompts else "builtin",
        },
        timings=timings,
    )


def save_comparison(result: Comparison, out: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write ``comparison.json``, ``directions.safetensors``, ``cosine.png`` and ``transfer.png`` as folder ``out``.

    The folder is built aside and renamed into place when complete; an existing ``out`` needs ``overwrite``.
    """
    final = Path(out)
    with atomic_output_dir(final, overwrite=overwrite) as tmp:
        paths = _write_comparison(result, tmp)
    return {k: final / v.name for k, v in paths.items()}


def _write_comparison(result: Comparison, out: Path) -> dict[str, Path]:
    paths = {
        "json": out / COMPARISON_FILE,
        "directions": out / "directions.safetensors",
        "cosine_png": out / "cosine.png",
        "transfer_png": out / "transfer.png",
    }
    paths["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    save_file(
        {lang: v.contiguous() for lang, v in result.directions.items()},
        str(paths["directions"]),
        metadata={"layer": str(result.layer), "position": str(result.position), "model": result.model},
    )
    heatmap(
        paths["cosine_png"],
        result.cosine.numpy(),
        result.langs,
        result.langs,
        title=f"Cosine similarity of refusal directions — {result.model}\n(layer {result.layer}, position {result.position})",
        xlabel="language",
        ylabel="language",
        cmap="viridis",
        vmin=min(0.0, float(result.cosine.min())),
        vmax=1.0,
        colorbar="cosine",
    )
    matrix = torch.cat([result.baseline[None], result.transfer]).numpy()
    finite = matrix[~torch.isnan(torch.from_numpy(matrix)).numpy()]
    scale = max(abs(float(finite.min())), abs(float(finite.max()))) if finite.size else 1.0
    silent = set(result.not_refusing)
    heatmap(
        paths["transfer_png"],
        matrix,
        ["baseline", *result.langs],
        [f"{lang} (does not refuse)" if lang in silent else lang for lang in result.langs],
        title=f"Refusal score on harmful prompts after ablating each language's direction — {result.model}",
        xlabel="evaluated language (harmful select prompts; blank: the model does not refuse in it)",
        ylabel="ablated direction",
        cmap="RdBu_r",
        vmin=-scale,
        vmax=scale,
        fmt="{:.1f}",
        colorbar="refusal score (log-odds of refusal tokens)",
    )
    return paths
