"""The chunked cross entropy equals the full-logits one (loss, accuracy, gradients) to 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import skip_without_cpu_kernels
from easylm_align import cpu_kernels, model, objectives


def full_reference(hidden, kernel, targets, mask):
    """NumPy-free restatement of the definition: mean over masked positions of -log softmax[target]."""
    logits = hidden @ kernel
    log_probs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    denom = jnp.maximum(mask.sum(), 1.0)
    return -(picked * mask).sum() / denom, ((jnp.argmax(logits, -1) == targets) * mask).sum() / denom


@pytest.mark.parametrize("chunk,loss_kernel", [(1, "xla"), (16, "xla"), (24, "xla"), (64, "xla"), (1000, "xla"),
                                               (1, "cpu_fused"), (24, "cpu_fused"), (1000, "cpu_fused")])
def test_chunked_equals_full(chunk, loss_kernel):
    skip_without_cpu_kernels(loss_kernel)
    r = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(r[0], (3, 64, 32))
    kernel = jax.random.normal(r[1], (32, 500)) * 0.3
    targets = jax.random.randint(r[2], (3, 64), 0, 500)
    mask = (jax.random.uniform(r[3], (3, 64)) > 0.3).astype(jnp.float32)
    loss, acc = objectives.chunked_cross_entropy(hidden, kernel, targets, mask, chunk, loss_kernel)
    ref_loss, ref_acc = full_reference(hidden, kernel, targets, mask)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(acc, ref_acc, atol=1e-7)
    grads = jax.grad(lambda h, k: objectives.chunked_cross_entropy(h, k, targets, mask, chunk, loss_kernel)[0],
                     (0, 1))(hidden, kernel)
    ref_grads = jax.grad(lambda h, k: full_reference(h, k, targets, mask)[0], (0, 1))(hidden, kernel)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied,loss_kernel", [(False, "xla"), (True, "xla"), (False, "cpu_fused")])
def test_clm_loss_chunked_equals_logits_path(tied, loss_kernel):
    skip_without_cpu_kernels(loss_kernel)
    cfg = model.get_llama_config("debug", '{"vocab_size": 700, "tie_word_embeddings": %s}' % str(tied).lower())
    net = model.build_model(cfg)
    params = model.init_params(net, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 48), 0, 700)
    batch = {"input_tokens": ids[:, :-1], "target_tokens": ids[:, 1:],
             "positions": jnp.broadcast_to(jnp.arange(47), (2, 47)), "segment_ids": jnp.ones((2, 47), jnp.int32),
             "loss_masks": jnp.ones((2, 47)).at[0, :10].set(0)}

    def run(chunk):
        config = objectives.default_config()
        config.loss_chunk_size, config.loss_kernel = chunk, loss_kernel
        return jax.value_and_grad(lambda p: objectives.clm_loss(net, p, batch, jax.random.PRNGKey(2), True, config), has_aux=True)(params)

    (loss, metrics), grads = run(16)
    (ref_loss, ref_metrics), ref_grads = run(0)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(metrics["accuracy"], ref_metrics["accuracy"], atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    config = objectives.default_config()
    config.loss_chunk_size = -1
    with pytest.raises(ValueError, match="--objectives.loss_chunk_size=-1"):
        objectives.clm_loss(net, params, batch, jax.random.PRNGKey(2), True, config)


def test_loss_kernel_choice():
    if not cpu_kernels.unavailable():
        assert objectives.resolve_loss_kernel("auto", "cpu", 1) == "cpu_fused"
        assert objectives.resolve_loss_kernel("cpu_fused", "cpu", 8) == "cpu_fused"  # asked for: allowed
    assert objectives.resolve_loss_kernel("auto", "cpu", 8) == "xla"  # unpartitioned FFI call: not by default
    assert objectives.resolve_loss_kernel("auto", "gpu", 1) == "xla"
    assert objectives.resolve_loss_kernel("xla", "tpu", 8) == "xla"
    with pytest.raises(ValueError, match="--objectives.loss_kernel=cpu_fused: it runs on the CPU only"):
        objectives.resolve_loss_kernel("cpu_fused", "gpu", 1)
    with pytest.raises(ValueError, match="--objectives.loss_kernel='fused': use one of"):
        objectives.resolve_loss_kernel("fused", "cpu", 1)


def test_cpu_kernel_in_bf16_compute_matches_xla_ops():
    """bf16 activations and weights (fp32 logits inside): the kernel's gradients equal the XLA path's."""
    skip_without_cpu_kernels("cpu_fused")
    r = jax.random.split(jax.random.PRNGKey(4), 3)
    hidden = jax.random.normal(r[0], (2, 40, 32)).astype(jnp.bfloat16)
    kernel = (jax.random.normal(r[1], (32, 300)) * 0.3).astype(jnp.bfloat16)
    targets = jax.random.randint(r[2], (2, 40), 0, 300)
    mask = jnp.ones((2, 40)).at[1, :7].set(0)
    results = {}
    for loss_kernel in ("xla", "cpu_fused"):
        f = lambda h, k: objectives.chunked_cross_entropy(h, k, targets, mask, 16, loss_kernel)
        (loss, acc), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(hidden, kernel)
        results[loss_kernel] = (loss, acc, *grads)
    for name, a, b in zip(("loss", "accuracy", "d hidden", "d kernel"), results["cpu_fused"], results["xla"]):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-2, rtol=1e-2,
                                   err_msg=name)
