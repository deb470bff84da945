"""Writing a converter's output safely: into a hidden sibling renamed into place at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from absl import flags
from absl import logging as absl_logging

from easylm_align.conversion import ConversionError


def quiet_orbax_logs() -> None:
    """Warnings only, unless --verbosity is given: Orbax logs every array it reads or writes at INFO."""
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def _check_output(dest: Path, overwrite: bool) -> None:
    """Refuses to replace a non-empty output unless asked; checked before any work is done."""
    if dest.exists() and not overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise ConversionError(f"output {dest} exists and is not empty; pass --overwrite to replace it")
    if not dest.absolute().parent.is_dir():
        raise ConversionError(f"the parent directory of output {dest} does not exist")


@contextlib.contextmanager
def staged_output(dest: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a fresh sibling path to write into (not yet created); renamed to `dest` on success.

    A failure (or a kill) leaves no directory named `dest` that looks complete: the partial work
    sits under a hidden `.NAME.partial-*` sibling, removed on a clean failure.
    """
    dest = dest.absolute()
    _check_output(dest, overwrite)
    tag = uuid.uuid4().hex[:8]
    stage = dest.parent / f".{dest.name}.partial-{tag}"
    try:
        yield stage
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{tag}"
            os.replace(dest, old)
            os.replace(stage, dest)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(stage, dest)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
