"""Options shared by several commands, error handling, and output helpers."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from weightedit._progress import console
from weightedit.errors import WeighteditError

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes (README, "Exit codes").
EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

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
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


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

    return resolve_model(model, gguf_file=gguf_file, revision=revision, token=token, progress=not quiet)


def epilog(*examples: str) -> str:
    """An ``Examples`` section for ``--help``."""
    lines = "\n\n".join(f"  $ {e}" for e in examples)
    return f"Examples:\n\n{lines}"


def handle_errors(func: F) -> F:
    """Turn known errors into one line on stderr and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except WeighteditError as e:
            from ._messages import cli_message

            _fail(cli_message(e))
            if os.environ.get("WEIGHTEDIT_DEBUG"):
                raise
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            _fail("interrupted: temporary files were removed and no output was written")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if not os.environ.get("WEIGHTEDIT_DEBUG"):
        console.print("[dim](set WEIGHTEDIT_DEBUG=1 for a traceback)[/]", highlight=False)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()
