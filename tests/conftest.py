from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network: the Hub is emulated where a test needs it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny_models import make_model, save_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shared-data",
        action="store_true",
        help="also run the tests marked shared_data, which read ../shared/data beside the clone (CI enables them)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that read ../shared/data form a group that runs only when asked for, and then fail if it is missing.

    A plain clone has no ../shared/data, so ``python -m pytest`` deselects the group instead of failing or
    skipping silently; ``--shared-data`` selects it and requires the folder.
    """
    marked = [item for item in items if item.get_closest_marker("shared_data")]
    if not config.getoption("--shared-data"):
        if marked:
            config.hook.pytest_deselected(items=marked)
            items[:] = [item for item in items if not item.get_closest_marker("shared_data")]
        return
    if marked and not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"--shared-data was given but {SHARED_DATA} does not exist")


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
