"""The fused clipped AdamW equals optax's chain of clip_by_global_norm and adamw; both AdamW variants
equal a NumPy AdamW; a zeroed embedding row stays as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easylm_align import optimizer
from easylm_align.tree_paths import path_str


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


def _numpy_adamw(params, grads_per_step, lr_at, b1, b2, eps, wd, clip, hf):
    """AdamW in float64 from the two libraries' documented steps: torch.optim.AdamW (decay lr·wd·p
    first, then lr·m̂/(√v̂ + ε)) or Hugging Face's AdamW (adamw_hf: step size lr·√(1−β₂ᵗ)/(1−β₁ᵗ) on
    m/(√v + ε), then decay lr·wd of the stepped weights). Norm scales are not decayed (the
    optimizer is told so by `weight_decay_exclude`). Clipping is torch's clip_grad_norm_ to `clip`."""
    p = {k: np.float64(v) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        g = {k: np.float64(x) for k, x in grads.items()}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        if clip and norm >= clip:
            g = {k: x * clip / norm for k, x in g.items()}
        lr = lr_at(t - 1)
        for k in p:
            decay = wd if not k.endswith("norm/scale") else 0.0
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            if hf:
                p[k] = p[k] - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m[k] / (np.sqrt(v[k]) + eps)
                p[k] = p[k] - lr * decay * p[k]
            else:
                p[k] = p[k] * (1 - lr * decay)
                p[k] = p[k] - lr * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
    return p


def _flat(tree):
    return {path_str(k): np.asarray(x) for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_hf_places_eps_before_the_bias_correction(fused):
    """Against NumPy AdamW: `variant=adamw_hf` is Hugging Face's step, `adamw_torch` torch's; with ε
    comparable to √v the two differ well beyond the tolerance, so the test tells them apart."""
    warmup, decay_steps, peak = 2, 10, 1e-2
    lr_at = lambda t: peak * t / warmup if t < warmup else \
        0.5 * peak * (1 + np.cos(np.pi * (t - warmup) / (decay_steps - warmup)))
    rng = np.random.default_rng(1)
    params = _params(rng)
    grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * (3.0 if s % 2 else 1e-3),
                                                          jnp.float32), params) for s in range(5)]
    expected = {}
    for variant in optimizer.VARIANTS:
        expected[variant] = _numpy_adamw(_flat(params), [_flat(g) for g in grads], lr_at, 0.9, 0.999, 1e-3, 0.1, 1.0,
                                         hf=variant == "adamw_hf")
        cfg = optimizer.default_config()
        cfg.adamw_optimizer.update(dict(lr=peak, end_lr=0.0, lr_warmup_steps=warmup, lr_decay_steps=decay_steps,
                                        b2=0.999, eps=1e-3, weight_decay=0.1, clip_gradient=1.0, fused=fused,
                                        variant=variant, weight_decay_exclude="norm/scale$"))
        tx, _ = optimizer.build(cfg)
        p, state = params, tx.init(params)
        for g in grads:
            u, state = jax.jit(tx.update)(g, state, p)
            p = optax.apply_updates(p, u)
        for k, x in _flat(p).items():
            np.testing.assert_allclose(x, expected[variant][k], rtol=2e-6, atol=2e-7)
    gap = max(np.abs(expected["adamw_hf"][k] - expected["adamw_torch"][k]).max() for k in expected["adamw_hf"])
    assert gap > 1e-4


def test_zero_embedding_row_freezes_that_row_only():
    cfg = optimizer.default_config()
    cfg.adamw_optimizer.update(dict(lr=1e-2, weight_decay=0.0, variant="adamw_hf"))
    tx, _ = optimizer.build(cfg)
    rng = np.random.default_rng(2)
    params = {"embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)},
              "lm_head": {"kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}}
    p, state = params, tx.init(params)
    for _ in range(3):
        g = optimizer.zero_embedding_row(jax.tree_util.tree_map(lambda x: jnp.ones_like(x), p), 2)
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
    before, after = np.asarray(params["embed_tokens"]["embedding"]), np.asarray(p["embed_tokens"]["embedding"])
    assert after[2].tobytes() == before[2].tobytes()
    assert (after[[0, 1, 3, 4, 5]] != before[[0, 1, 3, 4, 5]]).all()
    assert (np.asarray(p["lm_head"]["kernel"])[:, 2] != np.asarray(params["lm_head"]["kernel"])[:, 2]).all()


def test_unknown_variant_is_a_config_error():
    cfg = optimizer.default_config()
    cfg.adamw_optimizer.variant = "adam_hf"
    with pytest.raises(optimizer.ConfigError, match=r"adamw_optimizer\.variant='adam_hf': use one of"):
        optimizer.build(cfg)
