"""`attention=cpu_fused`: the fused CPU attention kernel in `kernels/cpu_attention.cc`, through XLA's FFI.

XLA gives no way to write a fused attention kernel for the CPU (Pallas has no CPU backend), and
as separate ops attention ran at half PyTorch's SDPA speed there (docs/PERFORMANCE.md). This
module compiles the C++ kernel with the machine's C++ compiler the first time it is needed
(about 5 s), keeps the library in a cache keyed by the source, compiler, flags, jaxlib version
and CPU, and registers its forward and backward handlers as FFI targets. Where no compiler is
found or the build fails, `unavailable()` says why and `attention=auto` keeps `chunked`.

fp32 only, self-attention over slots 0..T-1 (as `chunked`), with segment ids and forgetful causal
masking; no dropout. A query that sees no key gets zeros. The FFI call is not partitioned: on a
mesh of several CPU devices XLA gathers its operands and runs it whole on each (correct, not
memory-saving; CPU meshes are for tests and dry runs).
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
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).parent / "kernels" / "cpu_attention.cc"
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC", "-w", "-pthread")
_TARGETS = ("easylm_cpu_attention_fwd", "easylm_cpu_attention_bwd")


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


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(),
                                     jaxlib.__version__.encode(), _cpu_signature().encode()])).hexdigest()[:16]
    target = cache_dir() / f"cpu_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", partial]
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
    """None once the kernel is built, loaded and registered (once per process); else why it cannot be."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"attention=cpu_fused needs a C++ compiler to build its kernel; {compiler!r} was not found (set CXX)"
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as error:
        return f"attention=cpu_fused: building its kernel failed: {error}"
    for name, symbol in zip(_TARGETS, ("EasylmAttentionForward", "EasylmAttentionBackward")):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


def _forward_call(q, k, v, q_seg, k_seg, keep):
    b, t, h, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, t), jnp.float32))
    return jax.ffi.ffi_call(_TARGETS[0], out)(q, k, v, q_seg, k_seg, keep)


@jax.custom_vjp
def _fused(q, k, v, q_seg, k_seg, keep):
    return _forward_call(q, k, v, q_seg, k_seg, keep)[0]


def _fused_fwd(q, k, v, q_seg, k_seg, keep):
    out, lse = _forward_call(q, k, v, q_seg, k_seg, keep)
    return out, (q, k, v, q_seg, k_seg, keep, out, lse)


def _fused_bwd(residuals, d_out):
    q, k, v, q_seg, k_seg, keep, out, lse = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(_TARGETS[1], shapes)(q, k, v, q_seg, k_seg, keep, out, lse,
                                                       d_out.astype(jnp.float32))
    return dq, dk, dv, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, q_segments: jnp.ndarray,
                    k_segments: jnp.ndarray, keys_kept: jnp.ndarray) -> jnp.ndarray:
    """q (batch, T, heads, d), k/v (batch, T, kv_heads, d), fp32; the (batch, T) vectors of MaskInfo."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    i32 = lambda x: x.astype(jnp.int32)
    f32 = lambda x: x.astype(jnp.float32)
    return _fused(f32(q), f32(k), f32(v), i32(q_segments), i32(k_segments), i32(keys_kept)).astype(q.dtype)
