"""The C++ CPU kernels beside this module (`*.cc`): built with the machine's compiler on first use, registered
with XLA's FFI, and cached.

XLA gives no way to write a fused kernel for the CPU (Pallas has no CPU backend), and two parts of
the train step ran far slower there as XLA ops than PyTorch's fused kernels do (docs/PERFORMANCE.md):
attention (`cpu_attention.py`) and the cross entropy over the vocabulary (`cpu_cross_entropy.py`).
Their sources are compiled together into one library the first time one is needed (a few
seconds), kept in a cache keyed by the sources, compiler, flags, jaxlib version and CPU, and
their handlers registered once per process. Where no compiler is found or the build fails,
`unavailable()` says why and the `auto` choices keep the XLA paths.

The FFI calls are not partitioned: on a mesh of several CPU devices XLA gathers their operands and
runs each whole on every device (correct, not memory-saving; CPU meshes are for tests and dry runs).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jaxlib

KERNELS = Path(__file__).parent  # the .cc and .h files sit beside this module
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w", "-pthread")
# FFI target name -> the handler symbol the library exports.
TARGETS = {
    "easylm_cpu_attention_fwd": "EasylmAttentionForward",
    "easylm_cpu_attention_bwd": "EasylmAttentionBackward",
    "easylm_cpu_cross_entropy": "EasylmCrossEntropy",
}


def cache_dir() -> Path:
    """$EASYLM_ALIGN_CACHE, else $XDG_CACHE_HOME/easylm_align, else ~/.cache/easylm_align."""
    explicit = os.environ.get("EASYLM_ALIGN_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "easylm_align"


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (Linux), else the machine."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def _sources() -> list[Path]:
    return sorted(KERNELS.glob("*.cc"))


def _build(compiler: str) -> Path:
    parts = [path.read_bytes() for path in sorted(KERNELS.glob("*.[ch]*"))]
    parts += [compiler.encode(), " ".join(FLAGS).encode(), jaxlib.__version__.encode(), _cpu_signature().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, _sources()), "-o", partial]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, target)  # atomic: processes building at once each land a whole file
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


@functools.lru_cache(maxsize=None)
def unavailable() -> Optional[str]:
    """None once the kernels are built, loaded and registered (once per process); else why they cannot be."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"the CPU kernels need a C++ compiler to build; {compiler!r} was not found (set CXX)"
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as error:
        return f"building the CPU kernels failed: {error}"
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


def require() -> None:
    """Raises RuntimeError (with the reason) unless the kernels are ready to call."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
