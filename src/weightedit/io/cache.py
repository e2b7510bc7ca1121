"""weightedit's own cache folder (converted GGUF files, recipe mirrors, cached baselines, known hashes)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """weightedit's cache: ``$WEIGHTEDIT_CACHE``, else ``$HF_HOME/weightedit`` (``~/.cache/huggingface/weightedit``)."""
    env = os.environ.get("WEIGHTEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(hf_home).expanduser() / "weightedit"
