"""``weightedit push`` and ``weightedit card``: model cards and Hub uploads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from weightedit._progress import console
from weightedit.errors import WeighteditError

from ._options import JsonOpt, RepoIdOpt, TokenOpt, emit_json, epilog, handle_errors

ReportOpt = Annotated[
    Path | None, typer.Option("--report", help="Evaluation report folder (weightedit evaluate --out) to include.")
]


def _check_card_inputs(model: Path, report: Path | None) -> None:
    """weightedit.json and report.json must be readable JSON objects (one-line errors instead of tracebacks)."""
    paths = [(model / "weightedit.json", "re-run weightedit orthogonalize")]
    if report is not None:
        paths.append((report if report.suffix == ".json" else report / "report.json", "re-run weightedit evaluate"))
    for path, fix in paths:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise WeighteditError(f"{path} is not valid JSON ({e}): {fix}", path=path) from None
        if not isinstance(data, dict):
            raise WeighteditError(f"{path} holds a JSON {type(data).__name__}, not an object: {fix}", path=path)


def register(app: typer.Typer) -> None:
    app.command(
        "push",
        epilog=epilog(
            "weightedit push --model ./qwen-ortho --repo-id me/qwen-ortho --report report/",
            "HF_ENDPOINT=https://hub.example.org weightedit push --model ./edited --repo-id team/edited --private",
        ),
    )(push)
    app.command("card", epilog=epilog("weightedit card --model ./qwen-ortho --report report/"))(card)


@handle_errors
def push(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Edited checkpoint folder (the --out of orthogonalize).")
    ],
    repo_id: RepoIdOpt,
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    branch: Annotated[str | None, typer.Option("--branch", help="Branch to push to (created if missing).")] = None,
    token: TokenOpt = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", help="Commit message.")] = None,
    report: ReportOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace a repo that holds a different model (its files not in this upload are deleted)."
        ),
    ] = False,
    json_out: JsonOpt = False,
    # The old spelling of --branch: --revision names the input's revision in every other command.
    revision: Annotated[str | None, typer.Option("--revision", hidden=True)] = None,
) -> None:
    """Upload an edited model with a generated model card (large files go through LFS)."""
    from weightedit.hub import push_model

    _check_card_inputs(model, report)
    result = push_model(
        model,
        repo_id,
        private=private,
        revision=revision if revision is not None else branch,
        token=token,
        commit_message=commit_message,
        report=report,
        force=force,
    )
    if json_out:
        emit_json(
            {
                "repo_id": result.repo_id,
                "revision": result.revision,
                "commit_url": result.commit_url,
                "files": result.files,
            }
        )
        return
    console.print(f"pushed {len(result.files)} files to {result.repo_id}@{result.revision}: {result.commit_url}")


@handle_errors
def card(
    model: Annotated[Path, typer.Option("--model", "-m", help="Edited checkpoint folder.")],
    report: ReportOpt = None,
    repo_id: Annotated[str | None, typer.Option("--repo-id", help="Name to title the card with.")] = None,
) -> None:
    """Write the model card (README.md, plus report plots) into the model folder, without pushing."""
    from weightedit.card import write_card

    _check_card_inputs(model, report)
    path = write_card(model, repo_id=repo_id, report=report)
    console.print(f"wrote {path}")
