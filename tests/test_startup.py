"""What the command line and the edit load: heavy libraries only where a command needs them.

Importing the command line (every command registered, as `weightedit --help` does) must not import torch,
transformers, Optuna, SciPy, matplotlib, accelerate or huggingface_hub (each command imports the library inside
its function), and the streaming edit (`weightedit orthogonalize --direction FILE`) loads torch but neither
those libraries nor weightedit's model-running packages. Each check runs in a fresh interpreter, so modules
imported by other tests do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "optuna", "scipy", "matplotlib", "accelerate", "huggingface_hub")
MODEL_RUNNING = ("weightedit.runtime", "weightedit.direction", "weightedit.evaluation", "weightedit.optimize")


def _loaded_after(statement: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (top-level packages, or prefixes of dotted ones) are imported after ``statement``."""
    code = (
        f"import sys, json\n{statement}\n"
        f"print(json.dumps(sorted({{n for n in {names!r} for m in sys.modules if m == n or m.startswith(n + '.')}})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_start_up_imports_no_heavy_library() -> None:
    assert _loaded_after("import weightedit.cli.main", HEAVY) == []


def test_streaming_edit_loads_torch_but_no_model_runtime() -> None:
    statement = "import weightedit.edit.rewrite, weightedit.edit.direction_file"
    assert _loaded_after(statement, HEAVY) == ["torch"]
    assert _loaded_after(statement, MODEL_RUNNING) == []
