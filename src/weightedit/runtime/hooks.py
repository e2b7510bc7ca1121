"""Interventions on a loaded model's residual stream, via forward hooks.

These are the run-time counterparts of the weight edit:

- ``ablate_as_edit`` projects each writer's output against the vector the weight edit projects that writer
  against (``r``, or ``γ ⊙ r`` normalized for the writers of post-norm blocks), so a model under it computes
  exactly what the orthogonalized checkpoint computes, in every family. Selection and transfer scores use it.
- ``ablate`` projects a direction out of the residual stream at every block's input and output (activation
  ablation). For pre-norm models this equals the edit; for post-norm ones it does not (the norm after a
  writer renormalizes), so it serves as the activation-space reference.
- ``add`` adds a multiple of a direction at one layer (used for the *induce* score), and
  ``capture_residuals`` records the residual stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..edit.arch import ArchSpec, spec_for_config
from ..edit.projection import effective_direction

__all__ = [
    "decoder_layers",
    "writer_modules",
    "writer_targets",
    "ablate",
    "ablate_as_edit",
    "add",
    "capture_residuals",
    "project_away",
]


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> Sequence[nn.Module]:
    """The list of decoder blocks of a ``*ForCausalLM`` model (``model.model.layers``, ``transformer.h``, ...)."""
    spec = spec or spec_for_config(model.config)
    obj: Any = model
    for part in spec.layers_path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if obj is None:  # e.g. a base model without the LM head wrapper
        obj = model
        for part in spec.layers_path.split(".")[1:]:
            obj = getattr(obj, part)
    return obj


def project_away(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x - (x·r) r`` along the last axis (``r`` unit norm)."""
    r = r.to(device=x.device, dtype=x.dtype)
    return x - (x @ r).unsqueeze(-1) * r


def _replace_hidden(output: Any, fn: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    return output


def writer_modules(model: nn.Module, spec: ArchSpec | None = None) -> list[nn.Module]:
    """Modules whose output is added to the residual stream: each writer's module, or for post-norm
    writers the norm that follows it."""
    spec = spec or spec_for_config(model.config)
    seen: dict[int, nn.Module] = {}
    for name, _ in model.named_parameters():
        m = spec.match(name)
        if m is None:
            continue
        target = m.norm_name or name
        module = model.get_submodule(target.rsplit(".", 1)[0])
        seen.setdefault(id(module), module)
    return list(seen.values())


def writer_targets(
    model: nn.Module, direction: torch.Tensor, spec: ArchSpec | None = None
) -> list[tuple[nn.Module, torch.Tensor]]:
    """Each module that owns a writer tensor, with the unit vector the edit projects its output against.

    The module's output is the write (``W x + b`` of a linear layer, an embedding row, a fused expert
    stack's combined output); for post-norm writers the vector is ``γ ⊙ r`` normalized, where ``γ`` is the
    effective gain of the norm that follows (:func:`weightedit.edit.effective_direction`). Writers whose norm
    zeroes ``r`` are left out: nothing along ``r`` reaches the residual stream from them.
    """
    spec = spec or spec_for_config(model.config)
    r = (direction / direction.norm()).detach().to("cpu", torch.float32)
    params = dict(model.named_parameters())
    out: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    for name in params:
        m = spec.match(name)
        if m is None:
            continue
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if id(module) in out:
            continue
        norm = params.get(m.norm_name) if m.norm_name else None
        u = effective_direction(r, None if norm is None else norm.detach().cpu(), spec.norm_offset)
        if float(u.norm()) > 0:
            out[id(module)] = (module, u)
    return list(out.values())


@contextlib.contextmanager
def ablate_as_edit(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Within the block, run ``model`` as the checkpoint orthogonalized against ``direction`` would run.

    Every writer module's output is projected against its own vector (:func:`writer_targets`), which is what
    the edit does to the writer's weights and bias. The LM head is left alone, as the default untying edit
    leaves it.
    """
    handles = []

    def make_hook(u: torch.Tensor) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return _replace_hidden(output, lambda h: project_away(h, u))

        return hook

    try:
        for module, u in writer_targets(model, direction):
            handles.append(module.register_forward_hook(make_hook(u)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def ablate(model: nn.Module, direction: torch.Tensor, *, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Within the block, remove ``direction`` from everything written to the residual stream.

    Hooks project the direction out of each block's input and out of the output of every writer module
    (embeddings, attention output, MLP/expert output, or the norm after them in post-norm blocks), so
    the residual stream never carries it, between sub-blocks included. For pre-norm models this is
    exactly what the orthogonalized checkpoint computes. ``layers`` restricts the block-input hooks.
    """
    r = direction / direction.norm()
    blocks = decoder_layers(model)
    chosen = range(len(blocks)) if layers is None else layers
    handles = []

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (project_away(args[0], r), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = project_away(kwargs["hidden_states"], r)
        return args, kwargs

    def post_hook(module: nn.Module, args: Any, output: Any) -> Any:
        return _replace_hidden(output, lambda h: project_away(h, r))

    try:
        for i in chosen:
            handles.append(blocks[i].register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(blocks[i].register_forward_hook(post_hook))
        if layers is None:
            for module in writer_modules(model):
                handles.append(module.register_forward_hook(post_hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def add(model: nn.Module, vector: torch.Tensor, *, layer: int) -> Iterator[None]:
    """Within the block, add ``vector`` to the residual stream at the input of block ``layer`` (all positions)."""
    blocks = decoder_layers(model)

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            h = args[0]
            return (h + vector.to(device=h.device, dtype=h.dtype), *args[1:]), kwargs
        kwargs = dict(kwargs)
        h = kwargs["hidden_states"]
        kwargs["hidden_states"] = h + vector.to(device=h.device, dtype=h.dtype)
        return args, kwargs

    handle = blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_residuals(
    model: nn.Module, store: dict[int, torch.Tensor], *, positions: slice | None = None
) -> Iterator[None]:
    """Record the residual stream at the input of every block (``store[layer] = [batch, pos, d_model]``).

    Layer ``n_layers`` (one past the last) holds the last block's output. ``positions`` keeps only a
    slice of positions, so memory grows with layers × positions × d_model, not with the prompt length.
    """
    blocks = decoder_layers(model)
    sl = positions or slice(None)
    handles = []

    def make_pre(i: int) -> Any:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            store[i] = h[:, sl].detach()

        return pre_hook

    def last_hook(module: nn.Module, args: Any, output: Any) -> None:
        h = output if isinstance(output, torch.Tensor) else output[0]
        store[len(blocks)] = h[:, sl].detach()

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(make_pre(i), with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(last_hook))
        yield
    finally:
        for h in handles:
            h.remove()
