"""What the command line and the edit load: heavy libraries only where a command needs them.

`weightedit --help` and the argument parsing of every command must not import torch, transformers,
Optuna, SciPy or matplotlib (each command imports the library inside its function), and the streaming
edit (`weightedit orthogonalize --direction FILE`) loads torch and safetensors but nothing that runs or
scores a model. Each check runs in a fresh interpreter, so modules imported by other tests do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "optuna", "scipy", "matplotlib", "accelerate", "huggingface_hub")


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_start_up_imports_no_heavy_library() -> None:
    assert _loaded_after("import weightedit.cli.main") == []


def test_streaming_edit_loads_torch_but_no_model_runtime() -> None:
    loaded = _loaded_after("import weightedit.edit.rewrite, weightedit.edit.direction_file")
    assert "torch" in loaded
    assert [m for m in loaded if m != "torch"] == []
