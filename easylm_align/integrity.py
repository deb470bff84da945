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

import concurrent.futures
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


def _digests(paths: list[Path]) -> list[str]:
    """SHA-256 of each file; several files at once (hashlib releases the GIL, and Orbax splits an
    item's data into several files), so hashing is bound by the disk rather than one core."""
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_digest, paths))


def seal(directory: str | Path) -> None:
    """Records every file's size and SHA-256; written to a temporary name first, so a kill leaves
    no half-written manifest (only an unsealed checkpoint)."""
    directory = Path(directory)
    paths = _files(directory)
    files = {str(p.relative_to(directory)): [p.stat().st_size, digest] for p, digest in zip(paths, _digests(paths))}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    os.replace(tmp, directory / MANIFEST)


def is_sealed(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).exists()


def verify(directory: str | Path, only: tuple[str, ...] = ()) -> None:
    """Raises `Unsealed` or `DamagedCheckpoint` (naming the checkpoint and the file) unless every
    recorded file (every one whose name starts with one of `only`, when given) is there with its
    size and checksum."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.exists():
        raise Unsealed(f"checkpoint {directory} records no checksums ({MANIFEST}): it cannot be verified")
    try:
        files = json.loads(manifest.read_text())["files"]
        if not all(isinstance(entry, list) and len(entry) == 2 for entry in files.values()):
            raise ValueError("an entry is not [size, sha256]")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpoint(f"checkpoint {directory} is damaged: its {MANIFEST} is unreadable ({e})") from None
    names = sorted(name for name in files if not only or name.startswith(only))
    for name in names:  # sizes first: a truncated or missing file is named without reading the rest
        try:
            actual = (directory / name).stat().st_size
        except OSError as e:
            raise DamagedCheckpoint(f"checkpoint {directory} is damaged: {name} cannot be read "
                                    f"({e.strerror or e})") from None
        if actual != files[name][0]:
            raise DamagedCheckpoint(f"checkpoint {directory} is damaged: {name} has {actual} bytes, "
                                    f"{files[name][0]} when saved")
    try:
        digests = _digests([directory / name for name in names])
    except OSError as e:
        raise DamagedCheckpoint(f"checkpoint {directory} is damaged: a file cannot be read ({e})") from None
    for name, digest in zip(names, digests):
        if digest != files[name][1]:
            raise DamagedCheckpoint(f"checkpoint {directory} is damaged: {name} differs from its checksum when saved")
