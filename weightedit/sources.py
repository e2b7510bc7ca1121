"""Turning what a user passes as ``--model`` into a local safetensors checkpoint folder.

Accepted forms:

- a local ``save_pretrained`` folder (single or sharded safetensors);
- a ``.gguf`` file, or a folder plus ``gguf_file=``: dequantized once by transformers and cached as a
  safetensors checkpoint under :func:`cache_dir`;
- a Hub id (``org/name``), downloaded through ``huggingface_hub.snapshot_download`` (``revision``,
  ``token``, ``HF_HOME``/``HF_ENDPOINT``/``HF_HUB_OFFLINE`` are honoured);
- ``recipe:NAME``: a known model from ``recipes/``, fetched from its offline mirror or the Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidCheckpointError, ModelNotFoundError, WeighteditError

__all__ = [
    "ModelSource",
    "public_name",
    "resolve_model",
    "cache_dir",
    "convert_gguf",
    "sha256_file",
    "cached_sha256",
    "known_sha256",
    "remember_sha256",
    "HUB_ALLOW_PATTERNS",
]

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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local checkpoint folder.

    Attributes:
        folder: local folder with ``config.json`` and safetensors weights.
        given: what the user passed.
        kind: ``"local"``, ``"hub"``, ``"gguf"`` or ``"recipe"``.
        revision: the Hub commit (for Hub models), else ``None``.
        inputs: the user's own files (which must never be written to).
        details: extra provenance (GGUF hash, recipe name, ...).
    """

    folder: Path
    given: str
    kind: str
    revision: str | None = None
    inputs: tuple[Path, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def public_name(self) -> str:
        """The model's name for files that may be published (no local absolute path)."""
        return public_name(self.given)

    def provenance(self) -> dict[str, Any]:
        return {"model": self.public_name, "kind": self.kind, "revision": self.revision, **self.details}


def public_name(given: str | os.PathLike[str] | None) -> str | None:
    """What to record for a model (or file) in files that may be published.

    Hub ids and ``recipe:NAME`` stay as given; a local path is recorded as ``./<last component>``, so that no
    absolute local path (a user name, a home folder) ends up in ``weightedit.json``, reports or plot titles,
    and so that it is never mistaken for a Hub id.
    """
    if given is None:
        return None
    text = str(given)
    if text.startswith("recipe:") or "://" in text or not text:
        return text
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or not _HUB_ID.match(text):
        name = path.resolve().name
        return f"./{name}" if name else text
    return text


def cache_dir() -> Path:
    """weightedit's cache: ``$WEIGHTEDIT_CACHE``, else ``$HF_HOME/weightedit`` (``~/.cache/huggingface/weightedit``)."""
    env = os.environ.get("WEIGHTEDIT_CACHE")
    if env:
        return Path(env).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(hf_home).expanduser() / "weightedit"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _hash_index() -> Path:
    return cache_dir() / "sha256-index.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def known_sha256(path: Path) -> str | None:
    """The SHA-256 of ``path`` if it was computed before for the same (path, size, mtime), else ``None``."""
    try:
        index = json.loads(_hash_index().read_text())
    except (OSError, ValueError):
        return None
    digest = index.get(_stat_key(path)) if isinstance(index, dict) else None
    return str(digest) if digest else None


def cached_sha256(path: Path) -> str:
    """SHA-256 of ``path``, remembered by (path, size, mtime) so unchanged large files are hashed once."""
    key = _stat_key(path)
    try:
        index = json.loads(_hash_index().read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return str(index[key])
    digest = sha256_file(path)
    remember_sha256(path, digest)
    return digest


def remember_sha256(path: Path, digest: str) -> None:
    index_path = _hash_index()
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    index[_stat_key(path)] = digest
    from .atomic import write_text_atomic

    write_text_atomic(index_path, json.dumps(index, indent=0), record=False)


def resolve_model(
    model: str | os.PathLike[str],
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    token: str | bool | None = None,
    gguf_dtype: str = "bfloat16",
    progress: bool = True,
) -> ModelSource:
    """Resolve ``model`` to a local safetensors checkpoint folder (see the module docstring).

    Raises:
        ModelNotFoundError: nothing usable at that path, Hub id or recipe name.
    """
    given = str(model)
    if not given.strip():
        raise ModelNotFoundError(
            "--model is empty: pass a save_pretrained folder, a .gguf file, a Hub id (org/name) or recipe:NAME"
        )
    if given.startswith("recipe:"):
        from .recipes import fetch_recipe

        return fetch_recipe(given.split(":", 1)[1], progress=progress)

    path = Path(given).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelNotFoundError(
                    f"{path} is a file but not a .gguf: pass a save_pretrained folder, a .gguf file, or a Hub id"
                )
            return _from_gguf(path, given=given, dtype=gguf_dtype, progress=progress)
        if gguf_file:
            target = path / gguf_file
            if not target.is_file():
                raise ModelNotFoundError(f"--gguf-file {gguf_file} is not in {path}: check the file name")
            return _from_gguf(target, given=given, dtype=gguf_dtype, progress=progress)
        if not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if ggufs:
                raise ModelNotFoundError(
                    f"{path} has no config.json but holds {ggufs[0]}: pass --gguf-file {ggufs[0]} "
                    "(or the .gguf path itself as --model)"
                )
            raise ModelNotFoundError(
                f"{path} is not a transformers checkpoint (no config.json): pass a save_pretrained folder, "
                "a .gguf file, a Hub id or recipe:NAME"
            )
        _check_config(path / "config.json")
        return ModelSource(folder=path.resolve(), given=given, kind="local", inputs=(path.resolve(),))

    looks_local = given.startswith((".", "/", "~")) or given.endswith(".gguf") or given.count("/") > 1
    if looks_local or not _HUB_ID.match(given):
        raise ModelNotFoundError(
            f"model path {given} does not exist: pass an existing save_pretrained folder, a .gguf file, "
            "a Hub id (org/name) or recipe:NAME"
        )
    return _from_hub(
        given, revision=revision, gguf_file=gguf_file, token=token, gguf_dtype=gguf_dtype, progress=progress
    )


def _check_config(path: Path) -> None:
    """A readable ``config.json`` holding a JSON object, or a one-line error naming what is wrong."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidCheckpointError(f"cannot read {path}: {e}; fix or re-download config.json") from None
    if not isinstance(config, dict):
        raise InvalidCheckpointError(
            f"{path} holds a JSON {type(config).__name__}, not an object: fix or re-download config.json"
        )


def _from_hub(
    repo_id: str,
    *,
    revision: str | None,
    gguf_file: str | None,
    token: str | bool | None,
    gguf_dtype: str,
    progress: bool,
) -> ModelSource:
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
            source = _from_gguf(path, given=repo_id, dtype=gguf_dtype, progress=progress)
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
            f"{repo_id} is gated: accept its license on the Hub and pass --token (or set HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"Hub repo {repo_id} not found (or private): check the id, or pass --token / set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"revision {revision!r} not found in {repo_id}: check --revision") from None
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


def _from_gguf(path: Path, *, given: str, dtype: str, progress: bool) -> ModelSource:
    folder, digest = convert_gguf(path, dtype=dtype, progress=progress)
    return ModelSource(
        folder=folder,
        given=given,
        kind="gguf",
        inputs=(path.resolve(), folder),
        details={"gguf_file": path.name, "gguf_sha256": digest, "gguf_dtype": dtype},
    )


def convert_gguf(path: Path, *, dtype: str = "bfloat16", progress: bool = True) -> tuple[Path, str]:
    """Dequantize a GGUF file into a cached safetensors checkpoint; return ``(folder, sha256 of the file)``.

    The conversion is keyed by the file's SHA-256 and the dtype, and written atomically, so a second call
    (or a second run of the demo) costs one hash of the file.
    """
    import torch

    from ._progress import status
    from .atomic import atomic_output_dir

    path = Path(path).resolve()
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InvalidCheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF'): check the path")
    with status(f"hashing {path.name}", enabled=progress):
        digest = cached_sha256(path)
    out = cache_dir() / "gguf" / f"{digest[:16]}-{dtype}"
    if (out / "config.json").exists():
        return out, digest
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise WeighteditError(f"unknown dtype {dtype!r} for GGUF conversion: use bfloat16, float16 or float32")
    with (
        atomic_output_dir(out, overwrite=True, record=False) as tmp,
        status(f"dequantizing {path.name} (once; cached)", enabled=progress),
    ):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Releases that have GgufConfig load GGUF weights quantized unless told to dequantize; the earlier 5.x
        # releases have no such option and always dequantize.
        gguf_config = getattr(transformers, "GgufConfig", None)
        extra = {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype, **extra)
        except (ValueError, KeyError, RuntimeError, IndexError, EOFError, struct.error) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            if isinstance(e, (struct.error, EOFError, IndexError)):
                raise InvalidCheckpointError(
                    f"{path.name} is truncated or corrupted inside its GGUF header ({first}): re-download it"
                ) from None
            raise ModelNotFoundError(f"transformers cannot load {path.name}: {first}") from None
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                raise ModelNotFoundError(
                    f"{path.name} did not dequantize fully ({name} is {tensor.dtype}); convert it to "
                    "safetensors with another tool first"
                )
        # Every weight is a plain tensor now: drop the marker that makes save_pretrained refuse.
        model.hf_quantizer = None
        for cfg in (model.config, getattr(model.config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
        model.save_pretrained(tmp, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        (tmp / "weightedit-gguf.json").write_text(
            json.dumps({"gguf_file": path.name, "gguf_sha256": digest, "dtype": dtype}, indent=2) + "\n"
        )
        del model
    return out, digest


def card_front_matter(folder: Path) -> dict[str, Any]:
    """The YAML front matter of a model folder's ``README.md`` (its model card), or ``{}``.

    The edit carries the base model's ``license`` and ``language`` from it into its own card.
    """
    card = Path(folder) / "README.md"
    if not card.is_file():
        return {}
    try:
        import yaml

        text = card.read_text(encoding="utf-8")
        if text.startswith("---"):
            front = yaml.safe_load(text.split("---", 2)[1]) or {}
            return front if isinstance(front, dict) else {}
    except (OSError, ValueError, IndexError, yaml.YAMLError):
        return {}
    return {}
