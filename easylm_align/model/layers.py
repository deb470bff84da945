"""The decoder's layers: RMSNorm, rotary position embedding (with Llama 3.1's and linear
frequency scaling), the weight holder the projections multiply by themselves, and the SwiGLU MLP."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from easylm_align.model.swiglu import swiglu


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)  # the statistic is always taken in fp32
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


class Rope(NamedTuple):
    """What fixes the rotary frequencies (hashable, so the tables are cached per model)."""
    theta: float
    scaling: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    @classmethod
    def of(cls, config: ConfigDict) -> "Rope":
        return cls(float(config.rope_theta), config.rope_scaling_type, float(config.rope_scaling_factor),
                   float(config.rope_low_freq_factor), float(config.rope_high_freq_factor),
                   int(config.rope_original_max_position_embeddings))


def inverse_frequencies(rope: Rope, dim: int) -> np.ndarray:
    """fp32 inverse frequencies of the dim/2 rotary pairs, scaled as `rope.scaling` says.

    llama3 (Meta's `apply_scaling` of Llama 3.1): a pair whose wavelength exceeds
    original/low_freq_factor is slowed by `factor`, one shorter than original/high_freq_factor is
    kept, and in between the two are mixed with weight s = (original/wavelength - low)/(high - low).
    """
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    if rope.scaling == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.scaling == "llama3":
        wavelength = np.float32(2 * np.pi) / inv_freq
        low_wavelength = rope.original_max_positions / rope.low_freq_factor
        high_wavelength = rope.original_max_positions / rope.high_freq_factor
        slowed = np.where(wavelength > low_wavelength, inv_freq / np.float32(rope.factor), inv_freq)
        s = (rope.original_max_positions / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        mixed = (1 - s) * slowed / np.float32(rope.factor) + s * slowed
        medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
        return np.where(medium, mixed, slowed).astype(np.float32)
    return inv_freq


def rotary_cos_sin(positions: jnp.ndarray, dim: int, rope: Rope | float,
                   table_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin of shape positions.shape + (dim,), half-split layout, for positions in [0, table_size).

    Looked up in tables made once, in NumPy, when the model is traced: computed in the graph,
    XLA fuses cos and sin into every consumer of the rotated q and k (each key slice of
    `chunked` attention, the transposes of the backward pass) and so recomputes them per
    element, a tenth of the CPU train step (docs/PERFORMANCE.md). A position outside the table
    gives NaN (gather's fill value), so a mistake surfaces as a non-finite loss.
    """
    rope = rope if isinstance(rope, Rope) else Rope(float(rope))
    cos, sin = _rotary_tables(table_size, dim, rope)
    return jnp.take(cos, positions, axis=0), jnp.take(sin, positions, axis=0)


@functools.lru_cache(maxsize=8)
def _rotary_tables(size: int, dim: int, rope: Rope) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = inverse_frequencies(rope, dim)
    freqs = np.arange(size, dtype=np.float32)[:, None] * inv_freq  # the fp32 angles the graph computed
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x of shape (batch, seq, heads, head_dim); dimension j pairs with j + head_dim/2."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Kernel(nn.Module):
    """A dense layer's weight (and with `use_bias` its bias), stored as `nn.Dense` stores them
    ({name}/kernel, {name}/bias), for layers that multiply by it themselves."""
    shape: tuple[int, int]
    init_std: float
    param_dtype: Any
    use_bias: bool = False

    @nn.compact
    def __call__(self):
        w = self.param("kernel", nn.initializers.normal(self.init_std), self.shape, self.param_dtype)
        if not self.use_bias:
            return w
        return w, self.param("bias", nn.initializers.zeros, self.shape[1:], self.param_dtype)


def kernel(module: nn.Module, shape: tuple[int, int], name: str) -> jnp.ndarray:
    """`module`'s bias-free weight `name`, created as `Kernel` and cast to the module's compute dtype."""
    return Kernel(shape, module.config.initializer_range, module.param_dtype, name=name)().astype(module.dtype)


class FeedForward(nn.Module):
    """SwiGLU, w2(silu(x·w1) ∘ (x·w3)), with the hand-written backward pass of `swiglu`."""
    config: ConfigDict
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h, i = cfg.hidden_size, cfg.intermediate_size
        return swiglu(x.astype(self.dtype), kernel(self, (h, i), "w1"), kernel(self, (h, i), "w3"),
                      kernel(self, (i, h), "w2"))
