"""`linear`'s hand-written backward pass equals autodiff of x @ w."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easylm_align.model.linear import linear, weight_grad


@pytest.mark.parametrize("shape", [(3, 17, 24), (51, 24), (2, 3, 5, 24)])
def test_values_and_gradients_equal_autodiff_fp32(shape):
    r = jax.random.split(jax.random.PRNGKey(0), 3)
    x, w = jax.random.normal(r[0], shape), jax.random.normal(r[1], (shape[-1], 40))
    dy = jax.random.normal(r[2], shape[:-1] + (40,))
    ours, ours_vjp = jax.vjp(linear, x, w)
    theirs, theirs_vjp = jax.vjp(lambda a, b: jnp.einsum("...i,io->...o", a, b), x, w)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("x", "w"), ours_vjp(dy), theirs_vjp(dy)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5, err_msg=name)


def test_weight_grad_sums_every_leading_axis():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    g = np.ones((2, 3, 5), np.float32)
    np.testing.assert_allclose(weight_grad(x, g), np.einsum("abi,abo->io", x, g))


def test_bf16_stays_bf16():
    x, w = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 3), jnp.bfloat16)
    dx, dw = jax.vjp(linear, x, w)[1](jnp.ones((4, 3), jnp.bfloat16))
    assert dx.dtype == dw.dtype == jnp.bfloat16
