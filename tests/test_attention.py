"""Every attention backend equals an independent reference, forward and gradients, in fp32.

The reference below is written from the definition (softmax over the visible keys, GQA by
repeating kv heads), not by calling easylm_align.model.attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import skip_without_cpu_kernels
from easylm_align import model, sharding
from easylm_align.model import attention
from easylm_align.model.kernels import native

B, T, HEADS, KV, D = 2, 256, 4, 2, 32


def reference(q, k, v, segments, keep=None, dropout_scale=None):
    """softmax(q·kᵀ/√d + mask)·v with GQA; padding queries (no visible key) give 0."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    t = q.shape[1]
    pos = jnp.arange(t)
    visible = (pos[:, None] >= pos[None, :])[None] & (segments[:, :, None] == segments[:, None, :]) \
        & (segments[:, None, :] > 0)
    if keep is not None:
        visible = visible & keep[:, None, :]
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    weights = jnp.exp(scores - jnp.max(jnp.where(visible[:, None], scores, -1e30), -1, keepdims=True))
    weights = jnp.where(visible[:, None], weights, 0.0)
    probs = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
    if dropout_scale is not None:  # (b, kv, g, t, s) → (b, heads, t, s)
        probs = probs * dropout_scale.reshape(probs.shape)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def packed_padded_segments():
    """Row 0: three packed examples then padding; row 1: one example and a long padding tail."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :40], seg[0, 40:41], seg[0, 41:200] = 1, 2, 3
    seg[1, :97] = 1
    return jnp.asarray(seg)


def inputs(seed=0, t=T):
    r = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(r[0], (B, t, HEADS, D))
    k = jax.random.normal(r[1], (B, t, KV, D))
    v = jax.random.normal(r[2], (B, t, KV, D))
    return q, k, v, r[3]


def mask_info(segments, keep=None):
    slots = jnp.broadcast_to(jnp.arange(segments.shape[1], dtype=jnp.int32), segments.shape)
    return attention.MaskInfo(slots, slots, segments, segments, keep)


def run(backend, q, k, v, info, **kw):
    return attention.attend(q, k, v, info, backend=backend, **kw)


def check_backend(backend, keep=None, **kw):
    q, k, v, _ = inputs()
    segments = packed_padded_segments()
    info = mask_info(segments, keep)
    real = np.asarray(segments > 0)[:, :, None, None]
    weight = jax.random.normal(jax.random.PRNGKey(9), (B, T, HEADS, D)) * jnp.asarray(real)  # loss on real rows

    ours = run(backend, q, k, v, info, **kw)
    theirs = reference(q, k, v, segments, keep)
    np.testing.assert_allclose(np.where(real, ours, 0), np.where(real, theirs, 0), atol=1e-5, rtol=0)
    grad_ours = jax.grad(lambda q, k, v: jnp.sum(run(backend, q, k, v, info, **kw) * weight), (0, 1, 2))(q, k, v)
    grad_ref = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v, segments, keep) * weight), (0, 1, 2))(q, k, v)
    for a, b in zip(grad_ours, grad_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["einsum", "xla", "blockwise", "chunked", "cpu_fused"])
def test_backend_equals_reference_on_packed_padded_gqa_batch(backend):
    skip_without_cpu_kernels(backend)
    check_backend(backend, block_size=64)


@pytest.mark.parametrize("t,heads,kv,d", [(77, 6, 3, 24), (200, 4, 1, 128)])
def test_cpu_fused_with_forgetful_mask_odd_sizes_and_a_row_that_sees_nothing(t, heads, kv, d):
    """T and head_dim that are not multiples of the kernel's blocks, or a head_dim of two 64-float
    panels; GQA; FCM; one all-padding row."""
    skip_without_cpu_kernels("cpu_fused")
    r = jax.random.split(jax.random.PRNGKey(3), 5)
    q, k, v = jax.random.normal(r[0], (2, t, heads, d)), jax.random.normal(r[1], (2, t, kv, d)), \
        jax.random.normal(r[2], (2, t, kv, d))
    segments = jnp.asarray(np.stack([np.r_[np.ones(30), 2 * np.ones(t - 30)], np.zeros(t)]).astype(np.int32))
    keep = jax.random.bernoulli(r[3], 0.7, (2, t)).at[:, 0].set(True)
    info = mask_info(segments, keep)
    real = np.asarray(segments > 0)[:, :, None, None]
    weight = jax.random.normal(r[4], q.shape) * jnp.asarray(real)
    ours = run("cpu_fused", q, k, v, info)
    assert np.all(np.asarray(ours)[1] == 0)  # the padding row sees no key: zeros, not NaN
    np.testing.assert_allclose(np.where(real, ours, 0), np.where(real, reference(q, k, v, segments, keep), 0),
                               atol=1e-5, rtol=0)
    grads = [jax.grad(lambda *a: jnp.sum(f(*a) * weight), (0, 1, 2))(q, k, v)
             for f in (lambda *a: run("cpu_fused", *a, info), lambda *a: reference(*a, segments, keep))]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_size", [64, 100, 256, 1024])
def test_blockwise_and_chunked_any_block_size_and_forgetful_mask(block_size):
    # As FCM does, the first key of each segment stays visible, so no real query sees nothing.
    keep = jax.random.bernoulli(jax.random.PRNGKey(3), 0.7, (B, T)).at[:, jnp.asarray([0, 40, 41])].set(True)
    check_backend("blockwise", keep=keep, block_size=block_size)
    check_backend("chunked", keep=keep, block_size=block_size)
    check_backend("einsum", keep=keep)


def test_chunked_in_bf16_is_close_to_the_fp32_reference():
    """bf16 inputs: scores, softmax and the backward pass accumulate in fp32."""
    q, k, v, _ = inputs()
    segments = packed_padded_segments()
    real = np.asarray(segments > 0)[:, :, None, None]
    ours = run("chunked", *(x.astype(jnp.bfloat16) for x in (q, k, v)), mask_info(segments), block_size=64)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.where(real, ours.astype(jnp.float32), 0),
                               np.where(real, reference(q, k, v, segments), 0), atol=5e-2, rtol=0)


def test_splash_in_interpret_mode_equals_reference():
    check_backend("splash")


def test_splash_on_a_mesh_runs_per_device_and_equals_reference():
    """XLA cannot partition the Mosaic kernel: on the mesh 2,1,4 each device runs it on its own row
    (dp) and kv head (mp); forward and gradients still equal the reference."""
    r = jax.random.split(jax.random.PRNGKey(5), 4)
    t, kv = 128, 4
    q, k, v = (jax.random.normal(key, (B, t, heads, 16)) for key, heads in zip(r[:3], (2 * kv, kv, kv)))
    segments = jnp.asarray(np.stack([np.r_[np.ones(50), 2 * np.ones(t - 50)], np.r_[np.ones(90), np.zeros(t - 90)]])
                           .astype(np.int32))
    real = np.asarray(segments > 0)[:, :, None, None]
    weight = jax.random.normal(r[3], q.shape) * jnp.asarray(real)
    with sharding.activation_rules(sharding.make_mesh("2,1,4")):
        ours, grads = jax.value_and_grad(lambda *a: jnp.sum(run("splash", *a, mask_info(segments)) * weight),
                                         (0, 1, 2))(q, k, v)
    theirs, expected = jax.value_and_grad(lambda *a: jnp.sum(reference(*a, segments) * weight), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    for a, b in zip(grads, expected):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="attention=cudnn needs an NVIDIA GPU")
def test_cudnn_equals_reference():  # pragma: no cover - GPU only
    q, k, v, _ = inputs()
    segments = packed_padded_segments()
    ours = run("cudnn", *(x.astype(jnp.bfloat16) for x in (q, k, v)), mask_info(segments))
    real = np.asarray(segments > 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(real, ours.astype(jnp.float32), 0),
                               np.where(real, reference(q, k, v, segments), 0), atol=3e-2)


def test_blockwise_dropout_equals_reference_with_the_same_keep_mask():
    q, k, v, rng = inputs()
    segments = packed_padded_segments()
    info = mask_info(segments)
    rate, block = 0.2, 64
    scale = attention.dropout_keep_mask(rng, rate, (B, KV, HEADS // KV, T, T), block)
    assert 0.15 < float((scale == 0).mean()) < 0.25
    real = np.asarray(segments > 0)[:, :, None, None]
    weight = jax.random.normal(jax.random.PRNGKey(9), (B, T, HEADS, D)) * jnp.asarray(real)
    ours = lambda q, k, v: run("blockwise", q, k, v, info, dropout_rate=rate, dropout_rng=rng, block_size=block)
    theirs = lambda q, k, v: reference(q, k, v, segments, dropout_scale=scale)
    np.testing.assert_allclose(np.where(real, ours(q, k, v), 0), np.where(real, theirs(q, k, v), 0), atol=1e-5)
    loss = lambda f: jax.grad(lambda *x: jnp.sum(f(*x) * weight), (0, 1, 2))(q, k, v)
    for a, b in zip(loss(ours), loss(theirs)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # Another rng, another pattern; no rng, no dropout.
    other = run("blockwise", q, k, v, info, dropout_rate=rate, dropout_rng=jax.random.PRNGKey(77), block_size=block)
    assert np.abs(np.where(real, other - ours(q, k, v), 0)).max() > 1e-2
    np.testing.assert_allclose(np.where(real, run("blockwise", q, k, v, info, dropout_rate=rate, block_size=block), 0),
                               np.where(real, reference(q, k, v, segments), 0), atol=1e-5)


def test_auto_picks_by_platform_and_options():
    plain = attention.Options(0.0, False, jnp.bfloat16)
    dropout = attention.Options(0.05, True, jnp.bfloat16)
    fcm = attention.Options(0.0, True, jnp.bfloat16)
    assert attention.resolve("auto", plain, "tpu") == "splash"
    assert attention.resolve("auto", fcm, "tpu") == "xla"
    assert attention.resolve("auto", dropout, "tpu") == "blockwise"
    assert attention.resolve("auto", plain, "gpu") == "cudnn"
    assert attention.resolve("auto", attention.Options(0.0, False, jnp.float32), "gpu") == "xla"
    assert attention.resolve("auto", dropout, "gpu") == "blockwise"
    assert attention.resolve("auto", plain, "cpu") == "chunked"  # bf16: the CPU kernel is fp32 only
    assert attention.resolve("auto", fcm, "cpu") == "chunked"
    if not native.unavailable():
        assert attention.resolve("auto", attention.Options(0.0, True, jnp.float32), "cpu") == "cpu_fused"
    with pytest.raises(ValueError, match="attention=cpu_fused runs on the CPU only"):
        attention.resolve("cpu_fused", plain, "gpu")
    with pytest.raises(ValueError, match="attention=cpu_fused needs fp32 compute"):
        attention.resolve("cpu_fused", plain, "cpu")
    assert attention.resolve("auto", dropout, "cpu") == "blockwise"
    with pytest.raises(ValueError, match="attention=xla has no attention dropout"):
        attention.resolve("xla", dropout, "cpu")
    with pytest.raises(ValueError, match="attention=cudnn needs an NVIDIA GPU"):
        attention.resolve("cudnn", plain, "cpu")
    with pytest.raises(ValueError, match="attention=splash has no forgetful causal masking"):
        attention.resolve("splash", fcm, "tpu")


def test_config_field_and_flag_spellings():
    assert model.get_llama_config("debug").attention == "auto"
    assert model.get_llama_config("debug", '{"attention": "blockwise"}').attention == "blockwise"
    assert model.get_llama_config("debug", overrides={"attention": "einsum"}).attention == "einsum"
    with pytest.raises(ValueError, match="attention='flash': use one of auto, einsum, xla, cudnn, splash, blockwise, chunked, cpu_fused"):
        model.get_llama_config("debug", '{"attention": "flash"}')


def test_model_backends_agree_in_training_with_forgetful_masking():
    """The whole model, training mode with FCM (same key mask on every backend): logits and grads."""
    base = model.get_llama_config("debug", '{"vocab_size": 512, "fcm_min_ratio": 0.2, "fcm_max_ratio": 0.4,'
                                           ' "num_key_value_heads": 2, "attention_block_size": 32}')
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 96), 0, 512)
    segments = jnp.asarray(np.repeat([[1] * 50 + [2] * 30 + [0] * 16], 2, axis=0))
    params = model.init_params(model.build_model(base), jax.random.PRNGKey(0))

    def loss(backend):
        cfg = base.copy_and_resolve_references()
        cfg.attention = backend
        net = model.build_model(cfg)

        def f(p):
            out = net.apply({"params": p}, ids, segment_ids=segments, deterministic=False,
                            rngs={"dropout": jax.random.PRNGKey(5)})
            return jnp.sum(out.logits * (segments > 0)[..., None]) / 1000.0
        return jax.jit(jax.value_and_grad(f))(params)

    value, grads = loss("einsum")
    for backend in ("xla", "blockwise", "chunked", "cpu_fused"):
        skip_without_cpu_kernels(backend)
        other_value, other_grads = loss(backend)
        np.testing.assert_allclose(other_value, value, atol=1e-4, rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(other_grads), jax.tree_util.tree_leaves(grads)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
