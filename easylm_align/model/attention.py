"""Attention backends behind one function, chosen by the LLaMA config field `attention`.

Every backend computes, per query, softmax(q·k / sqrt(d)) over the keys it may see, times v:
a key is visible when it is at an earlier or equal slot, in the same non-zero segment, kept
by forgetful causal masking (FCM) and, with a sliding window W > 0 (Mistral), fewer than W slots
back (q_slot - k_slot < W, Hugging Face's rule). `MaskInfo` carries those facts as per-token vectors, so a
backend that never materialises the (query, key) mask does not have to.

* `einsum`: the plain path. fp32 scores of shape (batch, kv_heads, group, T, S) and a full mask;
  supports everything (dropout, FCM, the KV cache); the reference the others are tested against.
* `xla`: `jax.nn.dot_product_attention(implementation="xla")`, the mask passed densely. No
  attention dropout.
* `cudnn`: the same call with `implementation="cudnn"` (fused flash attention on NVIDIA GPUs,
  bf16/fp16 only). No attention dropout.
* `splash`: the Pallas splash-attention kernel on TPU (causal mask and segment ids inside the
  kernel; interpreted elsewhere, which is only useful for tests). XLA cannot partition it, so on
  a mesh each device runs it on its own rows and kv heads. Sequences a multiple of 128 only; no
  dropout, no FCM, no sliding window (refused when the sequence is longer than the window).
* `chunked`: exact attention with the queries cut into blocks of `attention_block_size`; each
  block's softmax runs over the keys up to the block's end only (the causal mask hides the
  rest), in a head-major layout where every product is a plain batched matmul, with a custom
  VJP that recomputes the probabilities. The fastest pure-XLA backend on the CPU (docs/PERFORMANCE.md).
  Supports segment ids and FCM; no attention dropout.
* `blockwise`: memory-efficient attention in plain JAX: an online softmax over key blocks
  (Rabe & Staats, "Self-attention does not need O(n²) memory", 2021; the FlashAttention
  recurrence, Dao et al., 2022) with a custom VJP that recomputes each block in the backward
  pass, so neither pass holds more than one (query block, key block) tile of scores. Causal
  blocks above the diagonal are skipped. Supports segment ids, FCM and attention dropout on
  every platform.
* `cpu_fused`: a fused CPU kernel (C++, through XLA's FFI; `easylm_align/model/kernels/cpu_attention.py`,
  built by `easylm_align/native.py`):
  each (row, kv head) in one pass over its keys, no head-major copies, exact per-block softmax
  and a recomputing backward pass. fp32 on the CPU; segment ids and FCM; no attention dropout.
  Built with the machine's C++ compiler on first use. No sliding window: a windowed model whose
  sequence is longer than its window is refused (a shorter one never reaches the window).
* `auto`: `splash` on TPU and `cudnn` on GPU where the run's options and length allow, else `xla` there;
  on the CPU `cpu_fused` (fp32, a compiler at hand), else `chunked`; `blockwise` when attention
  dropout is on; the pick, and why faster backends were passed over, is logged once.

Queries whose row sees no key (padding, segment 0) have an unspecified output; their
positions carry no loss. The KV-cache decoding path always uses `einsum`.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from easylm_align.model.kernels import cpu_attention, native
from easylm_align.model.platform import target as target_platform
from easylm_align.errors import ConfigError

BACKENDS = ("auto", "einsum", "xla", "cudnn", "splash", "blockwise", "chunked", "cpu_fused")
_NEG = float(np.finfo(np.float32).min)
SPLASH_MULTIPLE = 128  # the kernel's smallest block


class MaskInfo(NamedTuple):
    """Who may attend to whom, as per-token vectors (batch, T) for queries and (batch, S) for keys."""
    q_slots: jnp.ndarray
    k_slots: jnp.ndarray
    q_segments: jnp.ndarray
    k_segments: jnp.ndarray
    key_keep: Optional[jnp.ndarray] = None  # FCM: False hides the key from every query of its row

    def keys_kept(self) -> jnp.ndarray:
        """The (batch, S) FCM keep-mask, all True when FCM is off."""
        return self.key_keep if self.key_keep is not None else jnp.ones(self.k_segments.shape, bool)

    def dense(self, window: int = 0) -> jnp.ndarray:
        """The (batch, T, S) boolean mask; `window` > 0 limits each query to that many slots back."""
        return block_mask(self.q_slots, self.k_slots, self.q_segments, self.k_segments, self.key_keep, window)


def block_mask(q_slots, k_slots, q_segments, k_segments, key_keep=None, window: int = 0) -> jnp.ndarray:
    distance = q_slots[:, :, None] - k_slots[:, None, :]
    causal = distance >= 0
    if window > 0:  # slots, not positions: a packed segment or a left-padded row is contiguous in slots
        causal = causal & (distance < window)
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    mask = causal & same
    return mask if key_keep is None else mask & key_keep[:, None, :]


class Options(NamedTuple):
    """What a run needs of its attention; `auto` picks from these."""
    dropout_rate: float
    fcm: bool
    dtype: Any
    window: bool = False  # a sliding window hides keys in this run (sequence longer than the window)
    seq_length: Optional[int] = None  # the query length, where the call knows it


def supported(backend: str, options: Options, platform: str) -> Optional[str]:
    """None if `backend` can run with `options` on `platform`, else the reason it cannot."""
    if backend in ("einsum", "blockwise"):
        return None
    if options.dropout_rate > 0:
        return f"attention={backend} has no attention dropout (attn_pdrop > 0)"
    if backend in ("xla", "chunked"):
        return None
    if backend == "cudnn":
        if platform != "gpu":
            return "attention=cudnn needs an NVIDIA GPU"
        if jnp.dtype(options.dtype) not in (jnp.bfloat16, jnp.float16):
            return "attention=cudnn needs bf16 or fp16 compute (--dtype)"
        return None
    if backend in ("splash", "cpu_fused") and options.window:
        return f"attention={backend} has no sliding window (sliding_window shorter than the sequence)"
    if backend == "splash":
        if options.fcm:
            return "attention=splash has no forgetful causal masking (fcm_max_ratio > 0)"
        if options.seq_length is not None and options.seq_length % SPLASH_MULTIPLE:
            return f"attention=splash needs a sequence length divisible by {SPLASH_MULTIPLE} (got {options.seq_length})"
        return None
    if backend == "cpu_fused":
        if platform != "cpu":
            return "attention=cpu_fused runs on the CPU only"
        if jnp.dtype(options.dtype) != jnp.float32:
            return "attention=cpu_fused needs fp32 compute (--dtype=fp32)"
        reason = native.unavailable()
        return f"attention=cpu_fused: {reason}" if reason else None
    raise ConfigError(f"attention={backend!r}: use one of {BACKENDS}")


@functools.lru_cache(maxsize=None)
def _log_pick(backend: str, platform: str, passed_over: tuple[str, ...]) -> None:
    logging.info("attention=auto picked %s on %s%s", backend, platform,
                 "".join(f"; not {reason}" for reason in passed_over))


def resolve(backend: str, options: Options, platform: Optional[str] = None) -> str:
    """The concrete backend for a config value; raises ValueError with the reason when it cannot run."""
    platform = platform or target_platform()
    if backend != "auto":
        reason = supported(backend, options, platform)
        if reason:
            raise ConfigError(reason)
        return backend
    # The fused kernel where there is one; on the CPU without it, chunked beats XLA's dense attention.
    preferred = {"tpu": ["splash", "xla"], "gpu": ["cudnn", "xla"]}.get(platform, ["cpu_fused", "chunked"])
    passed_over = []
    for candidate in preferred + ["blockwise"]:
        reason = supported(candidate, options, platform)
        if reason is None:
            _log_pick(candidate, platform, tuple(passed_over))
            return candidate
        passed_over.append(reason)
    raise AssertionError("blockwise supports every option")


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: MaskInfo, *, backend: str,
           dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
           block_size: int = 512, window: int = 0) -> jnp.ndarray:
    """q (batch, T, heads, d), k/v (batch, S, kv_heads, d) → (batch, T, heads, d) in q's dtype.

    `backend` is a concrete one (see `resolve`). Dropout applies to the attention probabilities
    when `dropout_rng` is given and `dropout_rate > 0`. `window` > 0: sliding-window attention.
    """
    rate = dropout_rate if dropout_rng is not None else 0.0
    if window > 0 and window >= q.shape[1] and backend in ("splash", "cpu_fused"):
        window = 0  # no query reaches the window's edge: plain causal attention is the same
    if window > 0 and backend in ("splash", "cpu_fused"):
        raise ConfigError(f"attention={backend} has no sliding window: sliding_window={window} is shorter "
                          f"than the sequence ({q.shape[1]}); use attention=chunked, blockwise or xla")
    if backend == "einsum":
        return _einsum(q, k, v, mask.dense(window), rate, dropout_rng)
    if backend in ("xla", "cudnn"):
        dense = mask.dense(window)[:, None]
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=dense,
                                            implementation=backend).astype(q.dtype)
    if backend == "splash":
        return _splash_on_mesh(q, k, v, mask, interpret=target_platform() != "tpu")
    if backend == "blockwise":
        return blockwise_attention(q, k, v, mask, rate, dropout_rng, block_size, window)
    if backend == "chunked":
        return chunked_attention(q, k, v, mask, block_size, window)
    if backend == "cpu_fused":
        return cpu_attention.fused_attention(q, k, v, mask.q_segments, mask.k_segments, mask.keys_kept())
    raise ValueError(f"attention={backend!r} is not a concrete backend")


def _grouped(q: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
    """(batch, T, heads, d) → (batch, T, kv_heads, group, d): each kv head serves `group` query heads."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)


def _einsum(q, k, v, dense_mask, rate, rng):
    b, t, h, d = q.shape
    qg = _grouped(q, k.shape[2])
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(dense_mask[:, None, None], scores / np.sqrt(d).astype(np.float32), _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    if rate > 0:
        keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(q.dtype), v.astype(q.dtype))
    return out.reshape(b, t, h, d)


# ----------------------------------------------------------------------------------------------
# Blockwise attention with a recomputing backward pass
# ----------------------------------------------------------------------------------------------

class _Blocks(NamedTuple):
    size: int      # block length along both T and S
    n: int         # number of blocks
    rate: float    # attention dropout
    window: int = 0  # sliding window, 0: none


def blockwise_attention(q, k, v, mask: MaskInfo, rate: float = 0.0, rng: Optional[jax.Array] = None,
                        block_size: int = 512, window: int = 0) -> jnp.ndarray:
    """Blockwise attention for self-attention without a cache (T == S, slots 0..T-1 per row).

    The sequence is padded to a multiple of the block with segment 0 (invisible keys).
    """
    b, t, h, d = q.shape
    size = min(block_size, t)
    n = -(-t // size)
    pad = n * size - t

    def padded(x, value=0):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value) if pad else x

    slots = jnp.broadcast_to(jnp.arange(n * size, dtype=jnp.int32), (b, n * size))
    vectors = (slots, padded(mask.q_segments), padded(mask.k_segments), padded(mask.keys_kept(), False))
    rng = rng if rng is not None and rate > 0 else jax.random.PRNGKey(0)
    out = _flash(_Blocks(size, n, rate, window), _grouped(padded(q), k.shape[2]),
                 padded(k).astype(q.dtype), padded(v).astype(q.dtype), vectors, rng)
    return out[:, :t].reshape(b, t, h, d)


def _tile(blocks: _Blocks, q, k, v, vectors, rng, i, j):
    """Scores, visibility and dropout keep-mask of query block i against key block j (fp32)."""
    slots, q_seg, k_seg, keep = vectors
    s = blocks.size
    qi = jax.lax.dynamic_slice_in_dim(q, i * s, s, axis=1)
    kj = jax.lax.dynamic_slice_in_dim(k, j * s, s, axis=1)
    vj = jax.lax.dynamic_slice_in_dim(v, j * s, s, axis=1)
    cut = lambda x, at: jax.lax.dynamic_slice_in_dim(x, at * s, s, axis=1)
    visible = block_mask(cut(slots, i), cut(slots, j), cut(q_seg, i), cut(k_seg, j), cut(keep, j),
                         blocks.window)[:, None, None]
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    drop = _tile_dropout(rng, blocks.rate, i, j, scores.shape) if blocks.rate > 0 else None
    return qi, kj, vj, scores, visible, drop


def _tile_dropout(rng: jax.Array, rate: float, i, j, shape: tuple[int, ...]) -> jnp.ndarray:
    """Tile (i, j)'s dropout scale, 0 or 1/(1-rate): its own key, so both passes draw the same pattern."""
    keep = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(rng, i), j), 1.0 - rate, shape)
    return keep / (1.0 - rate)


def dropout_keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...], block_size: int) -> jnp.ndarray:
    """The dense (batch, kv, group, T, S) scale (0 or 1/(1-rate)) that `blockwise` applies, for tests
    and for anyone who needs the same dropout pattern on another path. T == S, a multiple of the block."""
    b, kv, g, t, _ = shape
    n = t // block_size
    tile = (b, kv, g, block_size, block_size)
    rows = [jnp.concatenate([_tile_dropout(rng, rate, i, j, tile) for j in range(n)], axis=-1) for i in range(n)]
    return jnp.concatenate(rows, axis=-2)


def _last_visible_block(blocks: _Blocks, i):
    """Key blocks 0..result-1 hold every key a query of block i can see (causal)."""
    return jnp.minimum(blocks.n, i + 1)


def _forward(blocks: _Blocks, q, k, v, vectors, rng):
    b, t, kv, g, d = q.shape
    s = blocks.size

    def query_block(i):
        def key_block(j, carry):
            m, l, acc = carry
            _, _, vj, scores, visible, drop = _tile(blocks, q, k, v, vectors, rng, i, j)
            m_new = jnp.maximum(m, jnp.max(jnp.where(visible, scores, _NEG), axis=-1))
            p = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(-1)
            p = p * drop if drop is not None else p
            acc = acc * correction[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vj,
                                                           preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((b, kv, g, s), _NEG, jnp.float32), jnp.zeros((b, kv, g, s), jnp.float32),
                jnp.zeros((b, kv, g, s, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _last_visible_block(blocks, i), key_block, init)
        safe = jnp.where(l > 0, l, 1.0)
        out = jnp.where((l > 0)[..., None], acc / safe[..., None], 0.0)
        lse = jnp.where(l > 0, m + jnp.log(safe), 0.0)
        return out, lse

    out, lse = jax.lax.map(query_block, jnp.arange(blocks.n))  # (n, b, kv, g, s, d), (n, b, kv, g, s)
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv, g, t, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv, g, t)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(blocks: _Blocks, q, k, v, vectors, rng):
    return _flash_fwd(blocks, q, k, v, vectors, rng)[0]


def _flash_fwd(blocks, q, k, v, vectors, rng):
    out, lse = _forward(blocks, q, k, v, vectors, rng)
    return jnp.einsum("bkgtd->btkgd", out).astype(q.dtype), (q, k, v, vectors, rng, out, lse)


def _flash_bwd(blocks, residuals, d_out):
    q, k, v, vectors, rng, out, lse = residuals
    s = blocks.size
    do = jnp.einsum("btkgd->bkgtd", d_out).astype(jnp.float32)
    delta = jnp.sum(do * out, axis=-1)  # (b, kv, g, t): rowsum(dO ∘ O), FlashAttention's D

    def key_block(dq, j):
        def query_block(i, carry):
            dq, dk_j, dv_j = carry
            qi, kj, vj, scores, visible, drop = _tile(blocks, q, k, v, vectors, rng, i, j)
            cut = lambda x: jax.lax.dynamic_slice_in_dim(x, i * s, s, axis=3)
            p = jnp.where(visible, jnp.exp(scores - cut(lse)[..., None]), 0.0)
            do_i = cut(do)
            p_dropped = p * drop if drop is not None else p
            dv_j = dv_j + jnp.einsum("bkgqs,bkgqd->bskd", p_dropped, do_i)
            dp = jnp.einsum("bkgqd,bskd->bkgqs", do_i, vj.astype(jnp.float32))
            dp = dp * drop if drop is not None else dp
            ds = p * (dp - cut(delta)[..., None]) / np.sqrt(q.shape[-1])
            dk_j = dk_j + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi.astype(jnp.float32))
            dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj.astype(jnp.float32))
            dq = jax.lax.dynamic_update_slice_in_dim(dq, jax.lax.dynamic_slice_in_dim(dq, i * s, s, 1) + dq_i,
                                                     i * s, axis=1)
            return dq, dk_j, dv_j

        zeros = jnp.zeros(k.shape[:1] + (s,) + k.shape[2:], jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(j, blocks.n, query_block, (dq, zeros, zeros))  # causal: i >= j
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(blocks.n))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)
    return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Query-chunked attention with a recomputing backward pass
# ----------------------------------------------------------------------------------------------

def chunked_attention(q, k, v, mask: MaskInfo, block_size: int = 512, window: int = 0) -> jnp.ndarray:
    """Self-attention (T == S, slots 0..T-1 per row) computed one query block at a time.

    Query block [start, end) can only see keys before `end`, so its scores are (end x block),
    never (T x block): for n blocks about (n + 1) / 2n of the dense work. Each block's softmax is
    exact over those keys (no online rescaling, unlike `blockwise`), and the blocks are a static
    loop, so XLA sees plain batched matmuls in a head-major layout (batch, kv_heads, group, T, d)
    with no dynamic slicing. The backward pass recomputes each block's probabilities from q, k
    and the per-token mask vectors, so no (T, S) tensor is saved.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    head_major = jnp.einsum("btkgd->bkgtd", _grouped(q, kv))
    kh, vh = (jnp.einsum("bskd->bksd", x.astype(q.dtype)) for x in (k, v))
    out = _chunked((min(block_size, t), window), head_major, kh, vh,
                   (slots, mask.q_segments, mask.k_segments, mask.keys_kept()))
    return jnp.einsum("bkgtd->btkgd", out).reshape(b, t, h, d)


def _query_blocks(t: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(t, start + size)) for start in range(0, t, size)]


def _chunk_probs(q, k, vectors, start: int, end: int, window: int) -> jnp.ndarray:
    """fp32 softmax of queries [start, end) over keys [0, end): (batch, kv, group, end - start, end)."""
    slots, q_seg, k_seg, keep = vectors
    visible = block_mask(slots[:, start:end], slots[:, :end], q_seg[:, start:end], k_seg[:, :end], keep[:, :end],
                         window)
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q[:, :, :, start:end], k[:, :, :end],
                        preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None, None], scores / np.sqrt(q.shape[-1]).astype(np.float32), _NEG)
    return jax.nn.softmax(scores, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(blocking: tuple[int, int], q, k, v, vectors):
    """`blocking`: (query block size, sliding window or 0)."""
    return _chunked_fwd(blocking, q, k, v, vectors)[0]


def _chunked_fwd(blocking, q, k, v, vectors):
    size, window = blocking
    outs = [jnp.einsum("bkgqs,bksd->bkgqd", _chunk_probs(q, k, vectors, start, end, window).astype(v.dtype),
                       v[:, :, :end], preferred_element_type=jnp.float32)
            for start, end in _query_blocks(q.shape[3], size)]
    out = jnp.concatenate(outs, axis=3).astype(q.dtype)
    return out, (q, k, v, vectors, out)


def _chunked_bwd(blocking, residuals, d_out):
    size, window = blocking
    q, k, v, vectors, out = residuals
    f32 = lambda x: x.astype(jnp.float32)
    do = f32(d_out)
    delta = jnp.sum(do * f32(out), axis=-1)  # rowsum(dO ∘ O) = rowsum(dP ∘ P), FlashAttention's D
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for start, end in _query_blocks(q.shape[3], size):
        p = _chunk_probs(q, k, vectors, start, end, window)
        do_i = do[:, :, :, start:end]
        dv = dv.at[:, :, :end].add(jnp.einsum("bkgqs,bkgqd->bksd", p, do_i))
        dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, f32(v[:, :, :end]))
        ds = p * (dp - delta[..., start:end, None]) / np.sqrt(q.shape[-1]).astype(np.float32)
        dq.append(jnp.einsum("bkgqs,bksd->bkgqd", ds, f32(k[:, :, :end])))
        dk = dk.at[:, :, :end].add(jnp.einsum("bkgqs,bkgqd->bksd", ds, f32(q[:, :, :, start:end])))
    return jnp.concatenate(dq, axis=3).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ----------------------------------------------------------------------------------------------
# Splash attention (Pallas, TPU)
# ----------------------------------------------------------------------------------------------

def _splash_on_mesh(q, k, v, mask: MaskInfo, interpret: bool) -> jnp.ndarray:
    """Splash on the current mesh. XLA cannot partition a Mosaic kernel, so each device runs it on
    its own rows and kv heads (the activation rules' batch and head axes, where they divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return _splash(q, k, v, mask.q_segments, mask.k_segments, interpret)
    batch, heads = _mesh_axes("activation_batch", q.shape[0], mesh), _mesh_axes("activation_heads", k.shape[2], mesh)
    rows, segments = P(batch, None, heads, None), P(batch, None)
    per_device = jax.shard_map(functools.partial(_splash, interpret=interpret), mesh=mesh,
                               in_specs=(rows, rows, rows, segments, segments), out_specs=rows, check_vma=False)
    return per_device(q, k, v, mask.q_segments, mask.k_segments)


def _mesh_axes(logical: str, dim: int, mesh) -> Any:
    """The mesh axes a logical activation axis maps to, or None where they do not divide `dim`."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return axes if names and dim % math.prod(mesh.shape[a] for a in names) == 0 else None


def _splash(q, k, v, q_segments, k_segments, interpret: bool) -> jnp.ndarray:
    """Causal splash attention with segment ids; one MQA kernel per kv head serves its query group."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, h, d = q.shape
    kv = k.shape[2]
    group = h // kv
    block = min(512, t)
    if t % block or t % SPLASH_MULTIPLE:
        raise ConfigError(f"attention=splash needs a sequence length divisible by {SPLASH_MULTIPLE} (got {t})")
    sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    causal = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(group)])
    mqa = kernel.make_splash_mqa_single_device(causal, block_sizes=sizes, interpret=interpret)
    qg = jnp.einsum("btkgd->bkgtd", _grouped(q, kv)) / np.sqrt(d).astype(q.dtype)  # the kernel does not scale
    kh, vh = (jnp.einsum("bskd->bksd", x.astype(q.dtype)) for x in (k, v))

    def one_row(qr, kr, vr, q_seg, k_seg):
        segments = kernel.SegmentIds(q=q_seg, kv=k_seg)
        return jax.vmap(lambda qq, kk, vv: mqa(qq, kk, vv, segment_ids=segments))(qr, kr, vr)

    # Padding (segment 0) gets a segment of its own, -1: no real query sees it, and a padding query
    # sees itself, so its output stays finite (a NaN there would reach real rows through v).
    pad_apart = lambda seg: jnp.where(seg == 0, -1, seg)
    out = jax.vmap(one_row)(qg, kh, vh, pad_apart(q_segments), pad_apart(k_segments))  # (b, kv, g, t, d)
    return jnp.einsum("bkgtd->btkgd", out).reshape(b, t, h, d).astype(q.dtype)
