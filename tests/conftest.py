from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network: the Hub is emulated where a test needs it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny_models import make_model, save_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """``get(family, shards=True)`` -> folder of a saved tiny random model (built once per session)."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(family: str, shards: bool = True) -> Path:
        key = (family, shards)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{'sharded' if shards else 'single'}")
            save_model(make_model(family), folder, shards=shards)
            cache[key] = folder
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test session gets its own weightedit cache, unless a test sets one."""
    if "WEIGHTEDIT_CACHE" not in os.environ:
        monkeypatch.setenv("WEIGHTEDIT_CACHE", str(tmp_path_factory.getbasetemp() / "weightedit-cache"))
