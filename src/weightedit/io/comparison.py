"""The file ``compare-directions`` writes (``comparison.json``), read back by evaluation reports.

It lives below both the command that writes it (:mod:`weightedit.crosslingual`) and the report that reads
it (:mod:`weightedit.evaluation.report`), so neither stage imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA", "COMPARISON_FILE", "load_comparison"]

SCHEMA = "weightedit.compare-directions/1"
COMPARISON_FILE = "comparison.json"


def load_comparison(path: Path) -> dict[str, Any]:
    """Read a ``comparison.json`` (a folder holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / COMPARISON_FILE
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
