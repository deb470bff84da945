"""The platform the model is compiled for: the local backend, or the TPU a `--dry_run_topology` names.

Backend choices (`attention=auto`, `objectives.loss_kernel=auto`, splash's interpreter) follow the
platform the step will run on. Usually that is the local backend; a dry run compiled for a TPU
slice on a host without one sets it for the duration of the compile, so the compiled step holds the
TPU's kernels and not the CPU's.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax

_targets: list[str] = []


def target() -> str:
    """'cpu', 'gpu' or 'tpu': the platform being compiled for."""
    return _targets[-1] if _targets else jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    _targets.append(platform)
    try:
        yield
    finally:
        _targets.pop()
