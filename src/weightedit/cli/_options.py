"""Options shared by several commands, error handling, and output helpers."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import typer

from weightedit._progress import console
from weightedit.errors import WeighteditError
from weightedit.io import atomic

from ._messages import cli_message

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes (README, "Exit codes").
EXIT_NEGATIVE = 1
EXIT_ERROR = 2

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Hub id, local save_pretrained folder, .gguf file, or recipe:NAME."),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist unless --overwrite).")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace --out if it exists (after the new one is complete).")
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit of --model.")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="Hugging Face token (default: HF_TOKEN or the saved login).", envvar="HF_TOKEN"),
]
GgufFileOpt = Annotated[
    str | None, typer.Option("--gguf-file", help="GGUF file inside the --model folder or Hub repo.")
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Compute dtype: auto (float32 on CPU, bfloat16 on GPUs that support it), float32, bfloat16, float16.",
    ),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="accelerate device map: auto, cpu, cuda, cuda:1, ... (default: cuda if available, else cpu).",
    ),
]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow custom modeling code from the model repo.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars, and no progress or warnings from transformers/hub.")
]


def quiet_libraries(quiet: bool) -> None:
    """With ``--quiet``, also silence transformers' and huggingface_hub's progress bars, logs and warnings."""
    if not quiet:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # bars that libraries draw with tqdm directly (GGUF dequantization)
    _disable_tqdm()
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    warnings.filterwarnings("ignore")
    for name in ("transformers", "huggingface_hub", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - every supported huggingface_hub has it
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _disable_tqdm() -> None:
    """tqdm reads TQDM_DISABLE when it is imported; an already imported tqdm gets the same default here."""
    std = sys.modules.get("tqdm.std")
    if std is None or getattr(std.tqdm, "_weightedit_quiet", False):
        return
    std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)
    std.tqdm._weightedit_quiet = True


def local_inputs(*given: str | Path | None) -> tuple[Path, ...]:
    """The arguments that name existing local paths (checked against ``--out`` before anything is resolved)."""
    found = []
    for g in given:
        if g is None or str(g) == "":
            continue
        path = Path(str(g)).expanduser()
        if path.exists():
            found.append(path)
    return tuple(found)


def resolve_source(
    model: str,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    quiet: bool = False,
) -> Any:
    """Resolve ``--model`` (with ``--gguf-file``, ``--revision``, ``--token``) to a local checkpoint, once."""
    from weightedit.sources import resolve_model

    quiet_libraries(quiet)
    return resolve_model(model, gguf_file=gguf_file, revision=revision, token=token, progress=not quiet)


def epilog(*examples: str) -> str:
    """An ``Examples`` section for ``--help``."""
    lines = "\n\n".join(f"  $ {e}" for e in examples)
    return f"Examples:\n\n{lines}"


def handle_errors(func: F) -> F:
    """Turn known errors into one line on stderr and exit code 2; Ctrl-C, SIGTERM and SIGHUP into 128 + signal.

    The interrupt message says what is true: which temporary paths are left (if any could not be removed)
    and which outputs were already complete when the signal came.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        atomic.reset_state()
        try:
            with atomic.install_signal_handlers():
                return func(*args, **kwargs)
        except WeighteditError as e:
            _fail(cli_message(e))
            if os.environ.get("WEIGHTEDIT_DEBUG"):
                raise
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", 2)
            _fail(_interrupt_message(signum, atomic.leftover_temporaries(), atomic.committed_outputs()))
            raise typer.Exit(128 + signum) from None
        except OSError as e:
            # The environment refused something (permissions, a vanished file): not a bug, one line.
            where = f" ({e.filename})" if e.filename else ""
            _fail(f"{e.strerror or e}{where}: check the path and its permissions")
            if os.environ.get("WEIGHTEDIT_DEBUG"):
                raise
            raise typer.Exit(EXIT_ERROR) from None

    return cast(F, wrapper)


def _interrupt_message(signum: int, leftovers: list[Path], committed: list[Path]) -> str:
    name = "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"
    if leftovers:
        listed = ", ".join(str(p) for p in leftovers[:3])
        return f"{name}: temporary files could not all be removed: delete {listed}"
    if committed:
        done = ", ".join(str(p) for p in committed[:3])
        return f"{name}: temporary files were removed; already complete and kept: {done}"
    return f"{name}: temporary files were removed and no output was written"


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if not os.environ.get("WEIGHTEDIT_DEBUG"):
        console.print("[dim](set WEIGHTEDIT_DEBUG=1 for a traceback)[/]", highlight=False)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()
