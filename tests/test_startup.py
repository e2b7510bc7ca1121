"""What the command line and the edit load: heavy libraries only where a command needs them.

Importing the command line (every command registered, as `weightedit --help` does) must not import torch,
transformers, Optuna, SciPy, matplotlib, accelerate or huggingface_hub (each command imports the library inside
its function), and the streaming edit (`weightedit orthogonalize --direction FILE`) loads none of them either,
torch included, nor weightedit's model-running packages. Each check runs in a fresh interpreter, so modules
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


def test_streaming_edit_plans_without_torch() -> None:
    """The rewrite, the direction file's metadata and the planner load no torch: the copy starts at once."""
    statement = (
        "import weightedit.edit.rewrite, weightedit.edit.direction_file, weightedit.edit.output, "
        "weightedit.edit.verify, weightedit.edit.spans"
    )
    assert _loaded_after(statement, HEAVY) == []
    assert _loaded_after(statement, MODEL_RUNNING) == []


def test_streaming_edit_lanes_load_no_torch_and_no_model_runtime() -> None:
    """The edit lanes compute in NumPy (weightedit.edit.kernels), with their BLAS limit (threadpoolctl)."""
    statement = "import weightedit.edit.writer; weightedit.edit.writer.single_threaded_blas().__enter__()"
    assert _loaded_after(statement, HEAVY) == []
    assert _loaded_after(statement, MODEL_RUNNING) == []


def test_the_blas_limit_takes_effect() -> None:
    """threadpoolctl finds NumPy's BLAS (releases before 3.5 do not see the OpenBLAS NumPy 2 ships, and then the
    limit silently does nothing) and holds it to one thread while the lanes run."""
    code = (
        "import json, numpy\nfrom threadpoolctl import threadpool_info\n"
        "from weightedit.edit.writer import single_threaded_blas\n"
        "with single_threaded_blas():\n    inside = [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']\n"
        "print(json.dumps(inside))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    inside = json.loads(out.stdout.strip().splitlines()[-1])
    assert inside, "threadpoolctl finds no BLAS library behind NumPy"
    assert set(inside) == {1}


def test_quiet_libraries_imports_nothing_and_still_silences_them() -> None:
    """--quiet sets what transformers and huggingface_hub read when they are imported later."""
    statement = "from weightedit.cli._options import quiet_libraries; quiet_libraries(True)"
    assert _loaded_after(statement, HEAVY) == []
    code = (
        f"{statement}\nimport logging, json\nimport huggingface_hub.utils as hub\n"
        "import transformers.utils.logging as tl\n"
        "print(json.dumps([hub.are_progress_bars_disabled(), tl.is_progress_bar_enabled(), "
        "logging.getLogger('transformers').getEffectiveLevel(), "
        "logging.getLogger('huggingface_hub').getEffectiveLevel()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, False, 40, 40]


def test_the_console_entry_point_exits_with_the_command_status(tmp_path) -> None:
    """main() leaves without the interpreter teardown: output flushed, exit codes kept."""
    run = [sys.executable, "-c", "from weightedit.cli.main import main; main()"]
    ok = subprocess.run([*run, "--version"], capture_output=True, text=True)
    assert (ok.returncode, ok.stdout.strip()) == (0, f"weightedit {_version()}")
    bad = subprocess.run(
        [
            *run,
            "orthogonalize",
            "--model",
            str(tmp_path / "missing"),
            "--direction-lang",
            "en",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "does not exist" in bad.stderr
    assert not (tmp_path / "o").exists()


def _version() -> str:
    import weightedit

    return weightedit.__version__


def test_a_command_that_loads_torch_still_prints_all_its_output(tiny_checkpoints, tmp_path) -> None:
    """The fast exit flushes what the command printed after torch was loaded (stdout a pipe, as in scripts)."""
    from weightedit.edit.direction_file import Direction, save_direction

    from tiny_models import random_direction

    path = save_direction(Direction(vector=random_direction()), tmp_path / "r.safetensors")
    run = [sys.executable, "-c", "from weightedit.cli.main import main; main()"]
    args = ["orthogonalize", "--model", str(tiny_checkpoints("llama")), "--direction", str(path)]
    done = subprocess.run([*run, *args, "--out", str(tmp_path / "out"), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tensors_edited"] > 0
    assert (tmp_path / "out" / "weightedit.json").exists()
