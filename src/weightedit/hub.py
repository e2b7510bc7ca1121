"""Pushing edited checkpoints to the Hugging Face Hub, with a generated model card.

All traffic goes through ``huggingface_hub`` (``create_repo``, ``create_commit`` with large files as LFS),
so ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HOME`` work as everywhere else in the ecosystem. The card and the
report plots are added to the commit from memory: pushing never changes the local folder.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .card import REPORT_DIR_IN_MODEL, build_card, find_report
from .errors import HubError, WeighteditError

__all__ = ["PushResult", "push_model", "resolve_token", "refuse_offline"]

_RETRIES = 3
_RETRY_DELAY_S = 1.0  # before the second attempt; doubled before each later one
_SKIP = {".DS_Store"}


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    files: list[str]


def resolve_token(token: str | None) -> str:
    """``token``, else ``HF_TOKEN``, else the saved login; a clear error when there is none."""
    value = token or get_token()
    if not value:
        raise HubError(
            "no Hugging Face token: pass <<token>>, set HF_TOKEN, or log in with `hf auth login`", option="token"
        )
    return value


def refuse_offline() -> None:
    """``HF_HUB_OFFLINE=1`` forbids every Hub request: say so at once instead of retrying a request that cannot go out."""
    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise HubError(
            "offline mode is on (HF_HUB_OFFLINE=1), so nothing can be pushed: unset HF_HUB_OFFLINE to push; "
            "nothing local was changed"
        )


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP client huggingface_hub uses: httpx2 (2.x), httpx (1.x), requests (0.x)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, name) for name in names if isinstance(getattr(mod, name, None), type)]
    return tuple(found)


def _is_network_error(err: Exception) -> bool:
    return isinstance(err, _network_errors()) or ((code := _status(err)) is not None and code >= 500)


def _call(what: str, repo_id: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a Hub call with retries on network errors and one-line errors for the rest."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    delay = _RETRY_DELAY_S
    last: Exception | None = None
    for attempt in range(1, _RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except RepositoryNotFoundError:
            raise HubError(
                f"{what}: repo {repo_id} not found or not yours: check <<repo_id>> and the token's permissions",
                option="repo_id",
                value=repo_id,
            ) from None
        except HfHubHTTPError as e:
            code = _status(e)
            if code == 401:
                raise HubError(
                    f"{what}: the Hub rejected the token (401): check <<token>> / HF_TOKEN", option="token"
                ) from None
            if code == 403:
                raise HubError(
                    f"{what}: the token may not write to {repo_id} (403): use a write token for that namespace",
                    option="token",
                ) from None
            if code is not None and code < 500:
                raise HubError(f"{what} failed ({code}): {str(e).splitlines()[0]}") from None
            last = e
        except Exception as e:  # network errors come from httpx and the standard library
            if not _is_network_error(e):
                raise
            last = e
        if attempt < _RETRIES:
            time.sleep(delay)
            delay *= 2
    raise HubError(
        f"{what}: cannot reach the Hub at {endpoint} after {_RETRIES} attempts ({type(last).__name__}): "
        "nothing local was changed; retry when the network is back"
    )


def _local_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (
            not path.is_file()
            or rel.parts[0].startswith(".")
            or path.name in _SKIP
            or path.name.endswith(".incomplete")
        ):
            continue
        files.append(path)
    return files


def _check_existing(
    api: Any, repo_id: str, revision: str | None, provenance: dict[str, Any], token: str, force: bool
) -> list[str]:
    """Refuse to push over a repo that holds a different model (unless ``force``).

    Returns the remote files that a forced push replaces (all of the other model's files), else ``[]``.
    """
    try:
        remote = _call("listing the repo", repo_id, api.list_repo_files, repo_id, revision=revision, token=token)
    except HubError:
        return []  # a new repo or branch: nothing to clash with
    except RevisionNotFoundError:
        return []
    weights = [f for f in remote if f.endswith((".safetensors", ".bin", ".gguf"))]
    if not weights:
        return []
    if "weightedit.json" in remote:
        try:
            path = hf_hub_download(repo_id, "weightedit.json", revision=revision, token=token)
            theirs = json.loads(Path(path).read_text())
        except (EntryNotFoundError, OSError, ValueError):
            theirs = {}
        same = theirs.get("direction", {}).get("sha256") == provenance.get("direction", {}).get(
            "sha256"
        ) and theirs.get("input_shards") == provenance.get("input_shards")
        if same:
            return []
    if force:
        return list(remote)
    raise HubError(
        f"{repo_id} already holds a different model ({len(weights)} weight files, e.g. {weights[0]}): "
        "push to a new <<repo_id>>, or pass <<force>> to replace its files",
        option="repo_id",
        value=repo_id,
    )


def push_model(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    report: Path | None = None,
    force: bool = False,
) -> PushResult:
    """Upload an edited checkpoint folder with a generated model card (``README.md``) and report plots.

    With ``force``, a repo holding a different model has its files replaced: those not in the upload are deleted
    in the same commit (``.gitattributes`` stays).

    Raises:
        HubError: missing token, 401/403, a repo holding a different model, or the network failing after retries.
    """
    refuse_offline()
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise WeighteditError(
            f"{folder} is not a checkpoint folder (config.json + *.safetensors): pass the <<out>> of orthogonalize",
            path=folder,
        )
    provenance_path = folder / "weightedit.json"
    provenance = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    tok = resolve_token(token)
    api = HfApi(token=tok)

    card = build_card(folder, repo_id=repo_id, report=report)
    report_data, report_dir = find_report(folder, report)
    operations: list[CommitOperationAdd | CommitOperationDelete] = []
    names: list[str] = []
    for path in _local_files(folder):
        rel = path.relative_to(folder).as_posix()
        if rel == "README.md":
            continue
        operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
        names.append(rel)
    if report_dir is not None and report_dir.resolve() != (folder / REPORT_DIR_IN_MODEL).resolve():
        for path in [*sorted(report_dir.glob("*.png")), report_dir / "report.json", report_dir / "report.md"]:
            if path.is_file():
                rel = f"{REPORT_DIR_IN_MODEL}/{path.name}"
                operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)))
                names.append(rel)
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    names.append("README.md")
    del report_data

    _call("creating the repo", repo_id, api.create_repo, repo_id, private=private, exist_ok=True, token=tok)
    if revision:
        _call("creating the branch", repo_id, api.create_branch, repo_id, branch=revision, exist_ok=True, token=tok)
    replaced = _check_existing(api, repo_id, revision, provenance, tok, force)
    # --force replaces the other model: its files must not survive next to ours (a stale model.safetensors
    # next to a sharded checkpoint is what from_pretrained would load).
    keep = {*names, ".gitattributes"}
    operations += [CommitOperationDelete(path_in_repo=f) for f in replaced if f not in keep]
    info = _call(
        "uploading",
        repo_id,
        api.create_commit,
        repo_id,
        operations=operations,
        commit_message=commit_message or f"Upload {folder.name} (edited with weightedit)",
        revision=revision,
        token=tok,
    )
    return PushResult(
        repo_id=repo_id, revision=revision or "main", commit_url=str(getattr(info, "commit_url", info)), files=names
    )
