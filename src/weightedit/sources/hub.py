"""Models from the Hugging Face Hub: a snapshot of the files a checkpoint needs, or one GGUF file of a repo."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelNotFoundError
from .gguf import from_gguf
from .model import ModelSource

__all__ = ["HUB_ALLOW_PATTERNS", "from_hub"]

# What a checkpoint needs from a Hub repo: weights, configs, tokenizer and chat template files.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.py",
]


def from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
    gguf_dtype: str = "bfloat16",
    progress: bool = True,
) -> ModelSource:
    """Download ``repo_id`` (at ``revision``) through huggingface_hub's cache.

    Raises:
        ModelNotFoundError: the repo, revision or file cannot be had (gated, missing, offline, network).
    """
    # huggingface_hub loads here, not at import: only a Hub model needs it (about 0.3 s of start-up).
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        if gguf_file:
            path = Path(hf_hub_download(repo_id, gguf_file, revision=revision, token=token))
            source = from_gguf(path, given=repo_id, dtype=gguf_dtype, progress=progress)
            return ModelSource(
                folder=source.folder,
                given=repo_id,
                kind="hub",
                revision=revision,
                inputs=source.inputs,
                details={**source.details, "gguf_file": gguf_file},
            )
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=HUB_ALLOW_PATTERNS))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its license on the Hub and pass <<token>> (or set HF_TOKEN)",
            option="model",
            value=repo_id,
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"Hub repo {repo_id} not found (or private): check the id, or pass <<token>> / set HF_TOKEN",
            option="model",
            value=repo_id,
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(
            f"revision {revision!r} not found in {repo_id}: check <<revision>>", option="revision", value=revision
        ) from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"cannot download {repo_id}: the Hub is unreachable and it is not in the cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); connect, or pass a local folder"
        ) from None
    except OSError as e:
        raise ModelNotFoundError(f"cannot download {repo_id}: {e}; check the network, or pass a local folder") from None
    # The snapshot folder is named after the resolved commit.
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    return ModelSource(folder=folder, given=repo_id, kind="hub", revision=commit, inputs=(folder,))
