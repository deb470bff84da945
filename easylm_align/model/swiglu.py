"""LLaMA's feed-forward block, w2(silu(x·w1) ∘ (x·w3)), with a hand-written backward pass.

Autodiff of the plain expression leaves XLA to rebuild the SiLU derivative inside several
fusions and to materialise transposed copies of it for the weight gradients; on the CPU that
made the block's backward pass about 1.5× slower than PyTorch's. Here the forward pass keeps the
two pre-activations (what autodiff keeps too) and the backward pass forms each gradient once:

    a = x·w1, c = x·w3, s = sigmoid(a), h = a·s·c, y = h·w2
    dh = dy·w2ᵀ;  da = dh·c·s·(1 + a·(1 − s));  dc = dh·a·s
    dx = da·w1ᵀ + dc·w3ᵀ;  dw1 = xᵀ·da;  dw3 = xᵀ·dc;  dw2 = hᵀ·dy

All arithmetic is in the dtype the arrays arrive in (the compute dtype), as `nn.Dense` and
autodiff do; the weight gradients are 2-D products (`linear.weight_grad` says why);
`tests/test_swiglu.py` checks values and gradients against autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from easylm_align.model.linear import weight_grad


@jax.custom_vjp
def swiglu(x: jnp.ndarray, w1: jnp.ndarray, w3: jnp.ndarray, w2: jnp.ndarray) -> jnp.ndarray:
    """(..., hidden) → (..., hidden) through the (hidden, intermediate) kernels w1, w3 and w2ᵀ."""
    return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2


def _forward(x, w1, w3, w2):
    a, c = x @ w1, x @ w3
    return (jax.nn.silu(a) * c) @ w2, (x, w1, w3, w2, a, c)


def _backward(residuals, dy):
    x, w1, w3, w2, a, c = residuals
    s = jax.nn.sigmoid(a)
    dh = dy @ w2.T
    da = dh * c * (s * (1 + a * (1 - s)))
    dc = dh * a * s
    return (da @ w1.T + dc @ w3.T, weight_grad(x, da), weight_grad(x, dc), weight_grad(a * s * c, dy))


swiglu.defvjp(_forward, _backward)
