"""Options shared by several commands, error handling, and output helpers."""

from __future__ import annotations

import functools
import inspect
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

# Light modules only (enums and options; no torch): every command module imports this one at start-up.
from weightedit._progress import console
from weightedit.direction.options import Search, SelectionOptions
from weightedit.edit.options import TiedEmbeddings
from weightedit.errors import WeighteditError
from weightedit.io import atomic
from weightedit.runtime.options import Dtype, ModelLoadOptions

from ._messages import cli_message

F = TypeVar("F", bound=Callable[..., Any])

# Exit codes (README, "Exit codes").
EXIT_NEGATIVE = 1
EXIT_ERROR = 2

# ---------------------------------------------------------------------------------------------------------
# Options shared by several commands: each is defined once here, with one spelling and one default (a test
# checks that every command agrees, and that the README's stated defaults are these).
# ---------------------------------------------------------------------------------------------------------

_SELECTION = SelectionOptions()

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
    Dtype,
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
ChatTemplateOpt = Annotated[
    Path | None, typer.Option("--chat-template", help="Jinja chat template for a tokenizer without one.")
]
LangsOpt = Annotated[
    str,
    typer.Option(
        "--langs",
        help="Languages: a comma list of codes (en,zh,ar) or all; a direction averages their unit directions.",
    ),
]
# The old spelling of --langs, still accepted for one release and hidden from --help.
OldLangOpt = Annotated[str | None, typer.Option("--lang", "-l", hidden=True)]
DirectionLangOpt = Annotated[
    str, typer.Option("--direction-lang", help="Language(s) of the prompts the direction is computed from.")
]
PromptsOpt = Annotated[
    str | None,
    typer.Option(
        "--prompts", help="Prompt source: JSONL/CSV file, folder (PolyRefuse layout), or hf://datasets/ORG/NAME."
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Prompts per forward pass.")]
NTrainOpt = Annotated[
    int, typer.Option("--n-train", help="Harmful and harmless prompts (each) for the mean difference.")
]
NValOpt = Annotated[int, typer.Option("--n-val", help="Held-out harmful and harmless prompts (each) for selection.")]
SearchOpt = Annotated[
    Search,
    typer.Option(
        "--search",
        help="fast: pre-screen every candidate on a few prompts, score in that order until the best is certain; "
        "thorough: score all exactly (GPU).",
    ),
]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Candidates scored exactly before the fast search may stop.")]
LayerOpt = Annotated[int | None, typer.Option("--layer", help="Use this layer instead of selecting one.")]
PositionOpt = Annotated[
    int | None, typer.Option("--position", help="Use this post-instruction position (-1 = last token).")
]
MaxKlOpt = Annotated[
    float, typer.Option("--max-kl", help="KL filter (nats on harmless prompts): candidates above it are never chosen.")
]
AllowFailingOpt = Annotated[
    bool,
    typer.Option(
        "--allow-failing-filters",
        help="When no candidate passes the KL filter, keep the lowest bypass anyway (recorded; the model may degrade).",
    ),
]
AllowNonRefusingOpt = Annotated[
    bool,
    typer.Option("--allow-non-refusing", help="Use a language the model does not refuse in (its scores mean little)."),
]
CheckGenerationsOpt = Annotated[
    int,
    typer.Option(
        "--check-generations",
        help="Harmful training prompts completed and judged to confirm each language refuses (0 skips the check).",
    ),
]
TiedEmbeddingsOpt = Annotated[
    TiedEmbeddings,
    typer.Option(
        "--tied-embeddings",
        help="For tied input/output embeddings: untie (exact edit, lm_head keeps the original) or edit-both "
        "(smaller, not exact).",
    ),
]
RepoIdOpt = Annotated[str, typer.Option("--repo-id", help="Hub repo to upload to, e.g. user/name.")]
LimitOpt = Annotated[int, typer.Option("--limit", help="Harmful and harmless prompts per language.")]
GenerateOpt = Annotated[
    int | None,
    typer.Option(
        "--generate",
        help="Harmful prompts per language to complete greedily and judge: the headline refusal rate "
        "(default: every evaluated prompt, = --limit); 0 = first-token scores only (a quick look).",
        show_default=False,
    ),
]
MaxNewTokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", help="Tokens per completion at most (each stops at the model's EOS).")
]
JudgeOpt = Annotated[
    str, typer.Option("--judge", help="Generation judge: substring, score, or model:PATH (a local classifier).")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars, and no progress or warnings from transformers/hub.")
]

# The defaults, one per option: the library's own where it has one.
N_TRAIN = _SELECTION.n_train
N_VAL = _SELECTION.n_val
BATCH_SIZE = _SELECTION.batch_size
TOP_K = _SELECTION.top_k
MAX_KL = _SELECTION.kl_threshold
CHECK_GENERATIONS = _SELECTION.check_generations
# EvalOptions.max_new_tokens, written out because evaluation.runner imports torch, which start-up must not pay (a
# test checks that the two agree). The demo keeps its own budget (64; README, "What the demo prints").
MAX_NEW_TOKENS = 96


def one_spelling(value: str, old: str | None) -> str:
    """The value of an option given under its current or its old (hidden) spelling."""
    return old if old is not None else value


def selection_options(**flags: Any) -> SelectionOptions:
    """The library's :class:`SelectionOptions` (which checks every value) from the commands' flag values.

    ``max_kl`` is the flag's name for ``kl_threshold``.
    """
    if "max_kl" in flags:
        flags["kl_threshold"] = flags.pop("max_kl")
    return SelectionOptions(**flags)


def _flag(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation, default=default)


# The flags of direction selection, by the name of their command-line parameter.
SELECTION_FLAGS = {
    p.name: p
    for p in (
        _flag("n_train", NTrainOpt, N_TRAIN),
        _flag("n_val", NValOpt, N_VAL),
        _flag("batch_size", BatchOpt, BATCH_SIZE),
        _flag("prompts", PromptsOpt, None),
        _flag("search", SearchOpt, Search.FAST),
        _flag("top_k", TopKOpt, TOP_K),
        _flag("layer", LayerOpt, None),
        _flag("position", PositionOpt, None),
        _flag("max_kl", MaxKlOpt, MAX_KL),
        _flag("allow_failing_filters", AllowFailingOpt, False),
        _flag("allow_non_refusing", AllowNonRefusingOpt, False),
        _flag("check_generations", CheckGenerationsOpt, CHECK_GENERATIONS),
    )
}
# The flags of loading a model to run it.
LOAD_FLAGS = {
    p.name: p
    for p in (
        _flag("dtype", DtypeOpt, Dtype.AUTO),
        _flag("device_map", DeviceMapOpt, None),
        _flag("chat_template", ChatTemplateOpt, None),
        _flag("trust_remote_code", TrustRemoteCodeOpt, False),
    )
}


def with_selection(*names: str) -> Callable[[F], F]:
    """Give a command the selection flags ``names`` (default: all of them), defined here once, and pass them on
    as one checked :class:`SelectionOptions` in its ``selection`` parameter."""
    flags = [SELECTION_FLAGS[n] for n in (names or SELECTION_FLAGS)]
    return _grouped("selection", flags, selection_options)


def with_load_options(func: F) -> F:
    """Give a command the model-loading flags, defined here once, and pass them on as one checked
    :class:`ModelLoadOptions` in its ``load`` parameter."""
    return _grouped("load", list(LOAD_FLAGS.values()), _load_options)(func)


def _load_options(*, chat_template: Path | None, **flags: Any) -> ModelLoadOptions:
    return ModelLoadOptions(chat_template=str(chat_template) if chat_template else None, **flags)


def _grouped(name: str, flags: list[inspect.Parameter], build: Callable[..., Any]) -> Callable[[F], F]:
    """A decorator that replaces the command's parameter ``name`` by ``flags`` (typer reads the signature) and
    calls the command with ``build(**flag values)`` in their place."""

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != name]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in flags}
            return func(**kwargs, **{name: build(**values)})

        # typer reads the signature through inspect, which takes __signature__ where a function sets one.
        command.__signature__ = signature.replace(parameters=[*own, *flags])  # type: ignore[attr-defined]
        return cast(F, command)

    return decorate


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def quiet_libraries(quiet: bool) -> None:
    """With ``--quiet``, also silence transformers' and huggingface_hub's progress bars, logs and warnings.

    The libraries read these settings from the environment when they are imported; one that is already
    imported is told directly. Nothing is imported here: a command that never loads transformers (the
    streaming edit) must not pay half a second for silencing it.
    """
    if not quiet:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_VERBOSITY"] = "error"
    os.environ["TQDM_DISABLE"] = "1"  # bars that libraries draw with tqdm directly (GGUF dequantization)
    _disable_tqdm()
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    warnings.filterwarnings("ignore")
    for name in ("transformers", "huggingface_hub", "accelerate", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "huggingface_hub.utils" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers.utils.logging" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


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
