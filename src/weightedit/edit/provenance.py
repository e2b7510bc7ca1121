"""``weightedit.json``: what an edited checkpoint was made from, with which direction and options, and what was
verified before it was published (docs/architecture.md, "File formats")."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..io.checkpoint import Checkpoint
from ..sources import card_front_matter
from ..sources.model import ModelSource, public_name
from .direction_file import Direction, DirectionHeader
from .plan import EditPlan

__all__ = ["PROVENANCE_FILE", "edit_provenance"]

PROVENANCE_FILE = "weightedit.json"
# Facts about the direction file that the record keeps (the file by its name only: it may be published).
_DIRECTION_META = ("file", "file_sha256", "n_harmful", "n_harmless", "selection")


def edit_provenance(
    source: ModelSource,
    checkpoint: Checkpoint,
    plan: EditPlan,
    direction: Direction | DirectionHeader,
    *,
    direction_sha256: str,
    input_hashes: dict[str, str],
    verification: dict[str, Any],
    options: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record written beside the edited weights; the input's own record, if it has one, becomes ``parent``.

    ``direction`` is the direction or its file's header (the facts recorded), ``direction_sha256`` the hash of
    the vector the edit used."""
    card = card_front_matter(checkpoint.folder)
    provenance: dict[str, Any] = {
        "weightedit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            **source.provenance(),
            "license": source.details.get("license") or card.get("license"),
            "language": source.details.get("language") or card.get("language"),
        },
        "input_shards": input_hashes,
        "model_type": plan.spec.model_type,
        "d_model": checkpoint.d_model,
        "direction": {
            "sha256": direction_sha256,
            "layer": direction.layer,
            "position": direction.position,
            "languages": list(direction.languages),
            "model": public_name(direction.model),
            "config_hash": direction.config_hash,
            **{k: (Path(str(v)).name if k == "file" else v) for k, v in direction.meta.items() if k in _DIRECTION_META},
            **_layer_rows(direction),
        },
        "options": options,
        "edited_groups": plan.groups(),
        "verification": verification,
        **(extra or {}),
    }
    parent = checkpoint.folder / PROVENANCE_FILE
    if parent.exists():
        with contextlib.suppress(OSError, ValueError):
            provenance["parent"] = json.loads(parent.read_text(encoding="utf-8"))
    return provenance


def _layer_rows(direction: Direction | DirectionHeader) -> dict[str, int]:
    """How many per-layer rows the direction has (recorded only when it has them)."""
    rows = direction.n_layer_rows
    return {} if rows is None else {"layer_rows": rows}
