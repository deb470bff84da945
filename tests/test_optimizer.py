"""The fused clipped AdamW equals optax's chain of clip_by_global_norm and adamw."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easylm_align import optimizer


def _params(rng):
    return {"layers": {"attention": {"wq": {"kernel": jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32)}},
                       "ffn_norm": {"scale": jnp.ones((2, 8), jnp.float32)}},
            "lm_head": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}}


@pytest.mark.parametrize("bf16_momentum", [False, True])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_fused_adamw_equals_optax_chain(bf16_momentum, clip):
    cfg = optimizer.default_config()
    cfg.adamw_optimizer.update(dict(lr=1e-2, end_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=10, weight_decay=0.1,
                                    clip_gradient=clip, bf16_momentum=bf16_momentum))
    reference_cfg = cfg.copy_and_resolve_references()
    reference_cfg.adamw_optimizer.fused = False
    fused, fused_lr = optimizer.build(cfg)
    reference, reference_lr = optimizer.build(reference_cfg)
    rng = np.random.default_rng(0)
    p_fused = p_ref = _params(rng)
    s_fused, s_ref = fused.init(p_fused), reference.init(p_ref)
    for step in range(6):
        # Large and small gradients alternate, so clipping both triggers and does not.
        grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * (5.0 if step % 2 else 0.01),
                                                             jnp.float32), p_ref)
        u_fused, s_fused = jax.jit(fused.update)(grads, s_fused, p_fused)
        u_ref, s_ref = jax.jit(reference.update)(grads, s_ref, p_ref)
        p_fused, p_ref = optax.apply_updates(p_fused, u_fused), optax.apply_updates(p_ref, u_ref)
        assert float(fused_lr(s_fused)) == pytest.approx(float(reference_lr(s_ref)), rel=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_fused, p_ref)
    mu = optax.tree_utils.tree_get(s_fused, "mu")
    assert jax.tree_util.tree_leaves(mu)[0].dtype == (jnp.bfloat16 if bf16_momentum else jnp.float32)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-2, atol=1e-6),
                           mu, optax.tree_utils.tree_get(s_ref, "mu"))


def test_fused_adamw_updates_the_moments_in_place():
    # The reason the fused path exists: with clipping and bf16 momentum, optax's chain holds a clipped
    # copy of every gradient as a temporary; the fused update does not.
    cfg = optimizer.default_config()
    cfg.adamw_optimizer.bf16_momentum = True
    params = {"w": jax.ShapeDtypeStruct((64, 1024, 256), jnp.float32)}  # 64 MiB

    def temporaries(fused):
        cfg.adamw_optimizer.fused = fused
        tx, _ = optimizer.build(cfg)

        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, jax.eval_shape(tx.init, params),
                                                              params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(False) - temporaries(True) >= 0.99 * 64 * 2**20  # one gradient-sized tree
