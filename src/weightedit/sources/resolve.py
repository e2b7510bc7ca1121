"""Turning what a user passes as ``--model`` into a local safetensors checkpoint folder.

Accepted forms:

- a local ``save_pretrained`` folder (single or sharded safetensors);
- a ``.gguf`` file, or a folder plus ``gguf_file=``: dequantized once by transformers and cached as a
  safetensors checkpoint under :func:`~weightedit.cache.cache_dir` (:mod:`weightedit.gguf`);
- a Hub id (``org/name``), downloaded through ``huggingface_hub.snapshot_download`` (``revision``,
  ``token``, ``HF_HOME``/``HF_ENDPOINT``/``HF_HUB_OFFLINE`` are honoured; :mod:`weightedit.hub_download`);
- ``recipe:NAME``: a known model (:mod:`weightedit.recipes`), fetched from its offline mirror or the Hub.

This module only dispatches: the pieces it calls never import it, so the recipes can use the Hub and GGUF
readers without a cycle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidCheckpointError, ModelNotFoundError
from ..io.cache import cache_dir
from ..io.hashing import cached_sha256
from .gguf import convert_gguf, from_gguf
from .hub import HUB_ALLOW_PATTERNS, from_hub
from .model import ModelSource, is_hub_id, public_name
from .recipes import fetch_recipe

__all__ = [
    "ModelSource",
    "public_name",
    "resolve_model",
    "card_front_matter",
    # Re-exported for the modules that take everything about a model's source from here.
    "cache_dir",
    "cached_sha256",
    "convert_gguf",
    "HUB_ALLOW_PATTERNS",
]


def resolve_model(
    model: str | os.PathLike[str],
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
    gguf_dtype: str = "bfloat16",
    progress: bool = True,
) -> ModelSource:
    """Resolve ``model`` to a local safetensors checkpoint folder (see the module docstring).

    Raises:
        ModelNotFoundError: nothing usable at that path, Hub id or recipe name.
    """
    given = str(model)
    if not given.strip():
        raise ModelNotFoundError(
            "<<model>> is empty: pass a save_pretrained folder, a .gguf file, a Hub id (org/name) or recipe:NAME",
            option="model",
            value=given,
        )
    if given.startswith("recipe:"):
        return fetch_recipe(given.split(":", 1)[1], progress=progress)

    path = Path(given).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelNotFoundError(
                    f"{path} is a file but not a .gguf: pass a save_pretrained folder, a .gguf file, or a Hub id",
                    path=path,
                )
            return from_gguf(path, given=given, dtype=gguf_dtype, progress=progress)
        if gguf_file:
            target = path / gguf_file
            if not target.is_file():
                raise ModelNotFoundError(
                    f"<<gguf_file>> {gguf_file} is not in {path}: check the file name",
                    path=target,
                    option="gguf_file",
                    value=gguf_file,
                )
            return from_gguf(target, given=given, dtype=gguf_dtype, progress=progress)
        if not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if ggufs:
                raise ModelNotFoundError(
                    f"{path} has no config.json but holds {ggufs[0]}: pass <<gguf_file>> {ggufs[0]} "
                    "(or the .gguf path itself as <<model>>)",
                    path=path,
                )
            raise ModelNotFoundError(
                f"{path} is not a transformers checkpoint (no config.json): pass a save_pretrained folder, "
                "a .gguf file, a Hub id or recipe:NAME",
                path=path,
            )
        _check_config(path / "config.json")
        return ModelSource(folder=path.resolve(), given=given, kind="local", inputs=(path.resolve(),))

    looks_local = given.startswith((".", "/", "~")) or given.endswith(".gguf") or given.count("/") > 1
    if looks_local or not is_hub_id(given):
        raise ModelNotFoundError(
            f"model path {given} does not exist: pass an existing save_pretrained folder, a .gguf file, "
            "a Hub id (org/name) or recipe:NAME",
            path=path,
            option="model",
            value=given,
        )
    return from_hub(
        given, revision=revision, gguf_file=gguf_file, token=token, gguf_dtype=gguf_dtype, progress=progress
    )


def _check_config(path: Path) -> None:
    """A readable ``config.json`` holding a JSON object, or a one-line error naming what is wrong."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidCheckpointError(f"cannot read {path}: {e}; fix or re-download config.json", path=path) from None
    if not isinstance(config, dict):
        raise InvalidCheckpointError(
            f"{path} holds a JSON {type(config).__name__}, not an object: fix or re-download config.json", path=path
        )


def card_front_matter(folder: Path) -> dict[str, Any]:
    """The YAML front matter of a model folder's ``README.md`` (its model card), or ``{}``.

    The edit carries the base model's ``license`` and ``language`` from it into its own card.
    """
    card = Path(folder) / "README.md"
    if not card.is_file():
        return {}
    try:
        text = card.read_text(encoding="utf-8")
        if text.startswith("---"):
            front = yaml.safe_load(text.split("---", 2)[1]) or {}
            return front if isinstance(front, dict) else {}
    except (OSError, ValueError, IndexError, yaml.YAMLError):
        return {}
    return {}
