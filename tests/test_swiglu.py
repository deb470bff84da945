"""The feed-forward block's hand-written backward pass equals autodiff of the plain expression."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easylm_align import model
from easylm_align.model.swiglu import swiglu


def plain(x, w1, w3, w2):
    """LLaMA's SwiGLU written from the definition: silu(u) = u · sigmoid(u)."""
    a = jnp.einsum("...h,hi->...i", x, w1)
    return jnp.einsum("...i,ih->...h", a * jax.nn.sigmoid(a) * jnp.einsum("...h,hi->...i", x, w3), w2)


def operands(dtype, shape=(3, 17, 24), inter=40):
    r = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(r[0], shape)
    w1, w3 = (jax.random.normal(key, (shape[-1], inter)) * 0.3 for key in r[1:3])
    w2 = jax.random.normal(r[3], (inter, shape[-1])) * 0.3
    dy = jax.random.normal(r[4], shape)
    return [a.astype(dtype) for a in (x, w1, w3, w2)], dy.astype(dtype)


@pytest.mark.parametrize("shape", [(3, 17, 24), (51, 24)])
def test_values_and_gradients_equal_autodiff_fp32(shape):
    args, dy = operands(jnp.float32, shape)
    ours, ours_vjp = jax.vjp(swiglu, *args)
    theirs, theirs_vjp = jax.vjp(plain, *args)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("x", "w1", "w3", "w2"), ours_vjp(dy), theirs_vjp(dy)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


def test_bf16_gradients_are_close_to_fp32():
    args, dy = operands(jnp.bfloat16)
    grads = jax.vjp(swiglu, *args)[1](dy)
    exact = jax.vjp(plain, *(a.astype(jnp.float32) for a in args))[1](dy.astype(jnp.float32))
    for a, b in zip(grads, exact):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=0.15 * float(jnp.max(jnp.abs(b))), rtol=0)


def test_model_keeps_dense_parameter_layout():
    """feed_forward/{w1,w2,w3}/kernel, shaped as nn.Dense stores them (checkpoints and HF export)."""
    cfg = model.get_llama_config("debug")
    params = model.init_params(model.build_model(cfg), jax.random.PRNGKey(0))
    ff = params["layers_0"]["feed_forward"]
    assert {k: v["kernel"].shape for k, v in ff.items()} == {
        "w1": (cfg.hidden_size, cfg.intermediate_size), "w3": (cfg.hidden_size, cfg.intermediate_size),
        "w2": (cfg.intermediate_size, cfg.hidden_size)}
