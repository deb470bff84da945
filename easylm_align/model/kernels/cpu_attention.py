"""`attention=cpu_fused`: the fused CPU attention kernel in `kernels/cpu_attention.cc`, through XLA's FFI.

As separate XLA ops, attention ran at half PyTorch's SDPA speed on the CPU (docs/PERFORMANCE.md).
The kernel is built and registered by `native`; where it cannot be, `attention=auto` keeps
`chunked`. fp32 only, self-attention over slots 0..T-1 (as `chunked`), with segment ids and
forgetful causal masking; no dropout. A query that sees no key gets zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from easylm_align.model.kernels import native

_FORWARD, _BACKWARD = "easylm_cpu_attention_fwd", "easylm_cpu_attention_bwd"


def _forward_call(q, k, v, q_seg, k_seg, keep):
    b, t, h, _ = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, t), jnp.float32))
    return jax.ffi.ffi_call(_FORWARD, out)(q, k, v, q_seg, k_seg, keep)


@jax.custom_vjp
def _fused(q, k, v, q_seg, k_seg, keep):
    return _forward_call(q, k, v, q_seg, k_seg, keep)[0]


def _fused_fwd(q, k, v, q_seg, k_seg, keep):
    out, lse = _forward_call(q, k, v, q_seg, k_seg, keep)
    return out, (q, k, v, q_seg, k_seg, keep, out, lse)


def _fused_bwd(residuals, d_out):
    q, k, v, q_seg, k_seg, keep, out, lse = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(_BACKWARD, shapes)(q, k, v, q_seg, k_seg, keep, out, lse,
                                                       d_out.astype(jnp.float32))
    return dq, dk, dv, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, q_segments: jnp.ndarray,
                    k_segments: jnp.ndarray, keys_kept: jnp.ndarray) -> jnp.ndarray:
    """q (batch, T, heads, d), k/v (batch, T, kv_heads, d), fp32; the (batch, T) vectors of MaskInfo."""
    native.require()
    i32 = lambda x: x.astype(jnp.int32)
    f32 = lambda x: x.astype(jnp.float32)
    return _fused(f32(q), f32(k), f32(v), i32(q_segments), i32(k_segments), i32(keys_kept)).astype(q.dtype)
