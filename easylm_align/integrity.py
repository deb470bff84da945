"""Checksums of a checkpoint's files, recorded when it is saved and verified before it is restored.

`seal(DIR)` writes `DIR/checksums.json`: the size and SHA-256 of every file below DIR. It runs
after Orbax has committed the checkpoint (the files are final then, whatever process wrote them,
asynchronously or not), on one process. `verify(DIR)` recomputes them and raises `DamagedCheckpoint`
naming the first file that is missing, has another size or other bytes, so a bit flip, a
truncated data file or a truncated metadata file is found before any value is read.

A checkpoint without `checksums.json` is *unsealed*: written before checksums existed, by another
tool, or by a run killed between Orbax's commit and the seal. `verify` raises `Unsealed` for it, and
each caller decides (resume prefers a sealed checkpoint; `params::` loads it with a warning).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from easylm_align.errors import UserError

MANIFEST = "checksums.json"
_CHUNK = 1 << 22


class DamagedCheckpoint(UserError):
    """A file of the checkpoint differs from what was saved, or the checksums cannot be read."""


class Unsealed(UserError):
    """The checkpoint records no checksums."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def seal(directory: str | Path) -> None:
    """Records every file's size and SHA-256; written to a temporary name first, so a kill leaves
    no half-written manifest (only an unsealed checkpoint)."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): [p.stat().st_size, _digest(p)] for p in _files(directory)}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    os.replace(tmp, directory / MANIFEST)


def is_sealed(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).exists()


def verify(directory: str | Path) -> None:
    """Raises `Unsealed` or `DamagedCheckpoint` (naming the checkpoint and the file) unless every
    recorded file is there with its size and checksum."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.exists():
        raise Unsealed(f"checkpoint {directory} records no checksums ({MANIFEST}): it cannot be verified")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"checkpoint {directory} is damaged: its {MANIFEST} is unreadable ({e})") from None
    for name, (size, digest) in sorted(files.items()):
        path = directory / name
        try:
            actual_size = path.stat().st_size
            problem = (f"has {actual_size} bytes, {size} when saved" if actual_size != size
                       else "differs from its checksum when saved" if _digest(path) != digest else "")
        except OSError as e:
            problem = f"cannot be read ({e.strerror or e})"
        if problem:
            raise DamagedCheckpoint(f"checkpoint {directory} is damaged: {name} {problem}")
