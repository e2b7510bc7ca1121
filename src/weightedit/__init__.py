"""weightedit: find the refusal direction of a chat LLM in any language and project it out of the weights.

The public API is small and flat; heavy modules (torch, transformers) load on first use, so that
``import weightedit`` and ``weightedit --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # architecture registry
    "ArchSpec": "edit.arch",
    "families": "edit.arch",
    "get_spec": "edit.arch",
    "register": "edit.arch",
    # edit
    "orthogonalize": "edit.rewrite",
    "orthogonalize_checkpoint": "edit.rewrite",
    "orthogonalize_model_": "edit.in_memory",
    "plan_edit": "edit.plan",
    "EditProfile": "edit.profile",
    "LayerKernel": "edit.profile",
    "EditReport": "edit.rewrite",
    "Checkpoint": "io.checkpoint",
    "resolve_model": "sources",
    "ModelSource": "sources",
    # directions
    "Direction": "edit.direction_file",
    "load_direction": "edit.direction_file",
    "save_direction": "edit.direction_file",
    "SelectionOptions": "direction.selection",
    "compute_direction": "direction.selection",
    "direction_for_model": "workflows",
    # optimisation of the edit's shape
    "OptimizeOptions": "optimize.options",
    "optimize_model": "workflows",
    "write_study_point": "workflows",
    # errors
    "WeighteditError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weightedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
