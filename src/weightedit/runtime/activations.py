"""Batched forward passes: last-position log-probabilities, residual means, and gradient screens.

Every pass is batched with left padding (so the post-instruction tokens line up at the end of every
row), passes explicit position ids (so absolute-position models see no padding offset), asks only for
the last position's logits, and runs under ``torch.inference_mode`` unless gradients are needed.
Memory grows with layers × post-instruction positions × d_model, not with the number of prompts.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._progress import progress_bar
from .hooks import capture_residuals, writer_modules
from .modeling import Batch, LoadedModel, batches
from .scoring import log_odds_of

__all__ = [
    "last_logprobs",
    "capture_means",
    "CaptureResult",
    "ablation_screen",
]

Intervention = Callable[[], contextlib.AbstractContextManager[Any]]


def _cache_keyword(model: Any) -> str:
    """Name of the forward argument that takes a key/value cache: ``cache`` from transformers 5.2x on,
    ``past_key_values`` before (the old name is removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _output_cache(out: Any) -> Any:
    """The key/value cache of a forward output, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def after_prefix(batch: Batch, prefix_cache: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The key/value cache, attention mask and position ids with which ``batch`` continues its shared prefix.

    With ``prefix_cache`` (keys and values of ``batch.prefix``, from :func:`_prefix_cache`), the cache is a copy
    repeated once per row, the mask covers the prefix and then each row (padding sits between the two and is
    masked out), and positions continue after the prefix. Without it: no cache, the batch's own mask and
    positions that skip the left padding.
    """
    mask = batch.attention_mask
    if prefix_cache is None or batch.prefix is None:
        return None, mask, _position_ids(mask)
    n, p = batch.input_ids.shape[0], batch.prefix.numel()
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(n)
    full = torch.cat([torch.ones(n, p, dtype=mask.dtype, device=mask.device), mask], 1)
    positions = (p + mask.long().cumsum(-1) - 1).clamp(min=p)
    return cache, full, positions


def _forward(loaded: LoadedModel, batch: Batch, prefix_cache: Any = None) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt, ``[batch, vocab]`` float32.

    With ``prefix_cache`` (keys and values of ``batch.prefix``), only the rows after the shared prefix are
    run (:func:`after_prefix`).
    """
    cache, mask, positions = after_prefix(batch, prefix_cache)
    out = loaded.model(
        input_ids=batch.input_ids,
        attention_mask=mask,
        position_ids=positions,
        logits_to_keep=1,
        use_cache=cache is not None,
        **({_cache_keyword(loaded.model): cache} if cache is not None else {}),
    )
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


def _prefix_cache(loaded: LoadedModel, prefix: torch.Tensor | None) -> Any:
    """Keys and values of the shared prefix (computed under whatever interventions are active)."""
    if prefix is None or not loaded.prefix_caching:
        return None
    out = loaded.model(input_ids=prefix[None], use_cache=True, logits_to_keep=1)
    return _output_cache(out)


@torch.inference_mode()
def last_logprobs(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    intervention: Intervention | None = None,
    progress: bool = False,
    description: str = "forward",
) -> torch.Tensor:
    """Next-token log-probabilities after each formatted prompt, ``[len(texts), vocab]`` on the CPU."""
    out: torch.Tensor | None = None
    ctx = intervention or contextlib.nullcontext
    with progress_bar(description, len(texts), enabled=progress) as bar, ctx():
        cache = None
        for batch in batches(loaded, texts, batch_size, split_prefix=loaded.prefix_caching):
            if cache is None:
                cache = _prefix_cache(loaded, batch.prefix)
            lp = _forward(loaded, batch, cache).cpu()
            if out is None:
                out = torch.empty(len(texts), lp.shape[-1])
            out[batch.index] = lp
            bar.advance(len(batch.index))
    assert out is not None
    return out


@dataclass
class CaptureResult:
    """Mean residual stream at the post-instruction positions, and the mean first-token distribution."""

    means: torch.Tensor  # [n_layers, n_post, d_model] float64: input of each block
    probs: torch.Tensor  # [vocab] float64: mean next-token distribution after the prompts
    count: int


@torch.inference_mode()
def capture_means(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = False,
    description: str = "capturing activations",
) -> CaptureResult:
    """Mean block-input residuals at the last ``loaded.n_post`` positions of every prompt."""
    n_layers = loaded.n_layers
    n_post = loaded.n_post
    sums = torch.zeros(n_layers, n_post, loaded.d_model, dtype=torch.float64)
    prob_sum: torch.Tensor | None = None
    store: dict[int, torch.Tensor] = {}
    with progress_bar(description, len(texts), enabled=progress) as bar:
        cache = None
        for batch in batches(loaded, texts, batch_size, split_prefix=loaded.prefix_caching):
            if cache is None:
                cache = _prefix_cache(loaded, batch.prefix)
            store.clear()
            with capture_residuals(loaded.model, store, positions=slice(-n_post, None)):
                lp = _forward(loaded, batch, cache)
            for layer in range(n_layers):
                sums[layer] += store[layer].double().sum(0).cpu()
            p = lp.double().exp().sum(0).cpu()
            prob_sum = p if prob_sum is None else prob_sum + p
            bar.advance(len(batch.index))
    assert prob_sum is not None
    return CaptureResult(means=sums / len(texts), probs=prob_sum / len(texts), count=len(texts))


def ablation_screen(
    loaded: LoadedModel,
    texts: Sequence[str],
    token_ids: Sequence[int],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """``M = Σ g wᵀ`` over every residual write ``w`` and its gradient ``g`` (``[d_model, d_model]``, float64).

    Ablating a unit direction ``r`` changes each write by ``-r (r·w)``, so to first order the summed
    refusal score changes by ``-rᵀ M r``: one forward and backward pass screens every candidate at once
    (attribution patching). Divide by ``len(texts)`` for the mean.
    """
    model = loaded.model
    d = loaded.d_model
    acc = torch.zeros(d, d, dtype=torch.float64)
    saved: list[torch.Tensor] = []
    embedding = model.get_input_embeddings()

    def keep(module: Any, args: Any, output: Any) -> Any:
        h = output if isinstance(output, torch.Tensor) else output[0]
        if not h.requires_grad:
            # Embeddings (token and learned-position ones) are the first writes: nothing upstream needs a
            # gradient, so make their output a leaf that gets one.
            h = h.detach().requires_grad_(True)
            h.retain_grad()
            saved.append(h)
            return h if isinstance(output, torch.Tensor) else (h, *output[1:])
        h.retain_grad()
        saved.append(h)
        return None

    modules = writer_modules(model)
    if embedding not in modules:
        modules.append(embedding)
    handles = [m.register_forward_hook(keep) for m in modules]
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), progress_bar("screening candidates (ablation)", len(texts), enabled=progress) as bar:
            for batch in batches(loaded, texts, batch_size):
                saved.clear()
                lp = _forward(loaded, batch)
                log_odds_of(lp, token_ids).sum().backward()
                mask = batch.attention_mask.bool()
                for h in saved:
                    if h.grad is None:
                        continue
                    if h.dim() == 3 and h.shape[:2] == mask.shape:
                        w, g = h.detach()[mask], h.grad[mask]  # [tokens, d]
                    else:
                        # Writes not laid out as [batch, seq, d]: MoE experts see only their routed tokens
                        # ([routed, d]), learned positions may broadcast over the batch. Padding positions need
                        # no mask here: nothing reads them, so their gradient is zero.
                        w, g = h.detach().reshape(-1, d), h.grad.reshape(-1, d)
                    acc += g.double().cpu().T @ w.double().cpu()
                bar.advance(len(batch.index))
    finally:
        for handle in handles:
            handle.remove()
        for p, req in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(req)
        saved.clear()
    return acc
