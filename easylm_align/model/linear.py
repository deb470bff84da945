"""Bias-free projections `x @ w` whose weight gradient is one 2-D matrix product.

The weight gradient of a projection applied to (batch, seq, in) activations contracts the batch
and sequence axes. Written as autodiff (or an einsum over `...`) leaves that as a product over two
contracting axes, which XLA's CPU compiler lowers by materialising a transposed copy of the
activation gradient, fused with whatever elementwise work produced it (rotary embedding, SiLU);
such fused transposes ran about 10× slower than a plain copy and were a fifth of the CPU train
step (docs/PERFORMANCE.md). Flattening both operands to (tokens, features) first makes it a
single transposed-operand matmul that the backend takes without a copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weight_grad(inputs: jnp.ndarray, grads: jnp.ndarray) -> jnp.ndarray:
    """Σ over all leading axes of inputsᵀ·grads: (..., in), (..., out) → (in, out)."""
    flat = lambda z: z.reshape(-1, z.shape[-1])
    return jnp.einsum("ni,no->io", flat(inputs), flat(grads))


@jax.custom_vjp
def linear(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """(..., in) @ (in, out) → (..., out), in the arrays' dtype (as `nn.Dense` computes it)."""
    return x @ w


def _forward(x, w):
    return x @ w, (x, w)


def _backward(residuals, dy):
    x, w = residuals
    return dy @ w.T, weight_grad(x, dy)


linear.defvjp(_forward, _backward)
