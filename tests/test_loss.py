"""The chunked cross entropy equals the full-logits one (loss, accuracy, gradients) to 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import skip_without_cpu_kernels
from easylm_align import model, objectives
from easylm_align.model.kernels import native


def full_reference(hidden, kernel, targets, mask):
    """Restatement of the token mean: mean over masked positions of -log softmax[target]."""
    logits = hidden @ kernel
    log_probs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    denom = jnp.maximum(mask.sum(), 1.0)
    return -(picked * mask).sum() / denom, ((jnp.argmax(logits, -1) == targets) * mask).sum() / denom


def token_mean(mask):
    return objectives.target_weights(mask, "token")


@pytest.mark.parametrize("chunk,loss_kernel", [(1, "xla"), (16, "xla"), (24, "xla"), (64, "xla"), (1000, "xla"),
                                               (1, "cpu_fused"), (24, "cpu_fused"), (1000, "cpu_fused")])
def test_chunked_equals_full(chunk, loss_kernel):
    skip_without_cpu_kernels(loss_kernel)
    r = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(r[0], (3, 64, 32))
    kernel = jax.random.normal(r[1], (32, 500)) * 0.3
    targets = jax.random.randint(r[2], (3, 64), 0, 500)
    mask = (jax.random.uniform(r[3], (3, 64)) > 0.3).astype(jnp.float32)
    loss, acc = objectives.chunked_cross_entropy(hidden, kernel, targets, token_mean(mask), chunk, loss_kernel)
    ref_loss, ref_acc = full_reference(hidden, kernel, targets, mask)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(acc, ref_acc, atol=1e-7)
    grads = jax.grad(lambda h, k: objectives.chunked_cross_entropy(h, k, targets, token_mean(mask), chunk, loss_kernel)[0],
                     (0, 1))(hidden, kernel)
    ref_grads = jax.grad(lambda h, k: full_reference(h, k, targets, mask)[0], (0, 1))(hidden, kernel)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def tiny_clm(tied: bool):
    """A 2-layer model with a 700-token head (tied or not), its parameters, and a batch of 2 × 47
    whose first row's first 10 targets are masked; `run(**objectives fields)` is the jitted CLM
    loss with its metrics and gradients under those `--objectives.*` settings."""
    cfg = model.get_llama_config("debug", '{"vocab_size": 700, "tie_word_embeddings": %s}' % str(tied).lower())
    net = model.build_model(cfg)
    params = model.init_params(net, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 48), 0, 700)
    batch = {"input_tokens": ids[:, :-1], "target_tokens": ids[:, 1:],
             "positions": jnp.broadcast_to(jnp.arange(47), (2, 47)), "segment_ids": jnp.ones((2, 47), jnp.int32),
             "loss_masks": jnp.ones((2, 47)).at[0, :10].set(0)}

    def run(**fields):
        config = objectives.default_config()
        config.update(fields)
        loss_fn = lambda p: objectives.clm_loss(net, p, batch, jax.random.PRNGKey(2), True, config)
        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return net, params, batch, run


@pytest.mark.parametrize("tied,loss_kernel", [(False, "xla"), (True, "xla"), (False, "cpu_fused")])
def test_clm_loss_chunked_equals_logits_path(tied, loss_kernel):
    skip_without_cpu_kernels(loss_kernel)
    net, params, batch, run = tiny_clm(tied)
    (loss, metrics), grads = run(loss_chunk_size=16, loss_kernel=loss_kernel)
    (ref_loss, ref_metrics), ref_grads = run(loss_chunk_size=0, loss_kernel=loss_kernel)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(metrics["accuracy"], ref_metrics["accuracy"], atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    config = objectives.default_config()
    config.loss_chunk_size = -1
    with pytest.raises(ValueError, match="--objectives.loss_chunk_size=-1"):
        objectives.clm_loss(net, params, batch, jax.random.PRNGKey(2), True, config)


def test_loss_kernel_choice():
    if not native.unavailable():
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
        f = lambda h, k: objectives.chunked_cross_entropy(h, k, targets, token_mean(mask), 16, loss_kernel)
        (loss, acc), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(hidden, kernel)
        results[loss_kernel] = (loss, acc, *grads)
    for name, a, b in zip(("loss", "accuracy", "d hidden", "d kernel"), results["cpu_fused"], results["xla"]):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-2, rtol=1e-2,
                                   err_msg=name)


# ----------------------------------------------------------------------------------------------
# How the loss averages: EasyLM's per-row mean (COMMIT), AFP's token mean
# ----------------------------------------------------------------------------------------------

def log_softmax_np(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def easylm_row_mean(logits, targets, mask):
    """EasyLM's `cross_entropy_loss_and_accuracy` (jax_utils.py) restated in NumPy: per row, the trained
    tokens' summed log-probability over the row's trained-token count floored at 1e-10, then the mean
    over rows; accuracy the same way."""
    valid_length = np.maximum(mask.sum(-1), 1e-10)
    log_probs = np.take_along_axis(log_softmax_np(logits), targets[..., None], -1)[..., 0]
    loss = -np.mean(np.where(mask > 0, log_probs, 0.0).sum(-1) / valid_length)
    correct = np.where(mask > 0, logits.argmax(-1) == targets, False)
    return loss, np.mean(correct.sum(-1) / valid_length)


def token_mean_np(logits, targets, mask):
    """PyTorch's `nn.CrossEntropyLoss()` over the trained positions (AFP): a mean over all of them."""
    log_probs = np.take_along_axis(log_softmax_np(logits), targets[..., None], -1)[..., 0]
    return -log_probs[mask > 0].mean(), (logits.argmax(-1) == targets)[mask > 0].mean()


def uneven_batch(seq=40, vocab=300, width=32):
    """Rows with 0, 1, 37 and 12 trained tokens: the two means differ a lot here."""
    r = np.random.default_rng(11)
    hidden = r.normal(size=(4, seq, width)).astype(np.float32)
    kernel = (r.normal(size=(width, vocab)) * 0.3).astype(np.float32)
    targets = r.integers(0, vocab, size=(4, seq)).astype(np.int32)
    mask = np.zeros((4, seq), np.float32)
    mask[1, 5] = 1
    mask[2, 3:] = 1
    mask[3, 20:32] = 1
    return hidden, kernel, targets, mask


@pytest.mark.parametrize("chunk,loss_kernel", [(0, "xla"), (16, "xla"), (16, "cpu_fused")])
def test_row_mean_is_easylms_and_token_mean_is_afps(chunk, loss_kernel):
    skip_without_cpu_kernels(loss_kernel)
    hidden, kernel, targets, mask = uneven_batch()
    logits = (hidden.astype(np.float64) @ kernel.astype(np.float64))
    for average, reference in (("row", easylm_row_mean), ("token", token_mean_np)):
        weights = objectives.target_weights(jnp.asarray(mask), average)
        if chunk:
            loss, acc = objectives.chunked_cross_entropy(jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets),
                                                         weights, chunk, loss_kernel)
        else:
            loss, acc = objectives.cross_entropy_loss_and_accuracy(jnp.asarray(hidden) @ jnp.asarray(kernel),
                                                                   jnp.asarray(targets), weights)
        ref_loss, ref_acc = reference(logits, targets, mask)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, err_msg=average)
        np.testing.assert_allclose(float(acc), ref_acc, rtol=1e-6, atol=1e-7, err_msg=average)
    row, token = easylm_row_mean(logits, targets, mask)[0], token_mean_np(logits, targets, mask)[0]
    assert abs(row - token) > 0.05 * token  # the batch tells the two apart


def test_row_mean_gradient_and_the_mesh():
    """The gradient is that of EasyLM's loss (autodiff of the NumPy-checked full-logits path), and the
    mean is over the global batch's rows: the batch sharded over 8 devices gives the same numbers."""
    hidden, kernel, targets, mask = (jnp.asarray(x) for x in uneven_batch())
    weights = objectives.target_weights(mask, "row")
    full = lambda h, k: objectives.cross_entropy_loss_and_accuracy(h @ k, targets, weights)[0]
    chunked = lambda h, k: objectives.chunked_cross_entropy(h, k, targets, weights, 16, "xla")[0]
    ref_grads = jax.grad(full, (0, 1))(hidden, kernel)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    on_mesh = jax.jit(jax.value_and_grad(chunked, (0, 1)))
    loss, grads = on_mesh(jax.device_put(hidden, rows), kernel)
    assert len(jax.devices()) == 8  # conftest's emulated mesh; four rows over four devices
    np.testing.assert_allclose(float(loss), float(full(hidden, kernel)), rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert float(jnp.abs(ref_grads[0][0]).max()) == 0.0  # the all-masked row gets no gradient


def test_loss_average_flag():
    assert objectives.resolve_loss_average("auto", "clm") == "row"
    assert objectives.resolve_loss_average("auto", "afp") == "token"
    assert objectives.resolve_loss_average("token", "clm") == "token"
    with pytest.raises(ValueError, match="--objectives.loss_average='rows': use one of"):
        objectives.resolve_loss_average("rows", "clm")


# ----------------------------------------------------------------------------------------------
# The vocabulary-chunked loss (`--objectives.loss_vocab_chunk_size`)
# ----------------------------------------------------------------------------------------------

def numpy_loss_and_grads(hidden, kernel, targets, weights):
    """The weighted cross entropy, accuracy and gradients restated in float64 NumPy:
    d loss / d logits = (softmax − one-hot) · weight, d hidden = that @ kernelᵀ, d kernel = hiddenᵀ @ that."""
    h, k, w = (np.asarray(x, np.float64) for x in (hidden, kernel, weights))
    logits = h @ k
    log_probs = log_softmax_np(logits)
    t = np.asarray(targets)
    loss = -(np.take_along_axis(log_probs, t[..., None], -1)[..., 0] * w).sum()
    accuracy = ((logits.argmax(-1) == t) * w).sum()
    dlogits = (np.exp(log_probs) - np.eye(k.shape[1])[t]) * w[..., None]
    return loss, accuracy, dlogits @ k.T, np.einsum("bsd,bsv->dv", h, dlogits)


@pytest.mark.parametrize("chunk,vocab_chunk", [(16, 64), (40, 64), (16, 7), (16, 300), (16, 1000), (13, 128)])
def test_vocab_chunked_equals_plain_path_and_numpy(chunk, vocab_chunk):
    """Uneven row weights (EasyLM's row mean; one row all masked), 300 = 4 × 64 + 44 columns; every
    third target is the arg-max, so accuracy is neither 0 nor 1."""
    hidden, kernel, targets, mask = uneven_batch()
    targets[:, ::3] = (hidden @ kernel).argmax(-1)[:, ::3]
    hidden, kernel, targets, mask = (jnp.asarray(x) for x in (hidden, kernel, targets, mask))
    weights = objectives.target_weights(mask, "row")
    f = lambda h, k: objectives.chunked_cross_entropy(h, k, targets, weights, chunk, "xla", vocab_chunk)
    (loss, acc), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(hidden, kernel)
    plain = lambda h, k: objectives.cross_entropy_loss_and_accuracy(h @ k, targets, weights)
    (ref_loss, ref_acc), ref_grads = jax.value_and_grad(plain, (0, 1), has_aux=True)(hidden, kernel)
    np_loss, np_acc, *np_grads = numpy_loss_and_grads(hidden, kernel, targets, weights)
    for reference_loss, reference_acc, reference_grads in ((ref_loss, ref_acc, ref_grads),
                                                           (np_loss, np_acc, np_grads)):
        np.testing.assert_allclose(float(loss), float(reference_loss), rtol=1e-6)
        np.testing.assert_allclose(float(acc), float(reference_acc), rtol=0, atol=1e-7)
        for name, a, b in zip(("d hidden", "d kernel"), grads, reference_grads):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(f(hidden, kernel)[0]), float(loss), rtol=1e-6)  # undifferentiated
    assert 0.1 < float(acc) < 0.9 and float(jnp.abs(grads[1]).max()) > 1e-3


def test_vocab_chunked_arg_max_takes_the_first_of_equal_logits():
    """Columns 5 and 69 (and 10 and 290) are equal, in different slices of 64: `jnp.argmax`'s first
    index wins, so a position whose target is the later copy counts as wrong."""
    r = np.random.default_rng(3)
    kernel = (r.normal(size=(16, 300)) * 0.1).astype(np.float32)
    kernel[:, 5] = kernel[:, 69] = 3.0
    kernel[:, 10] = kernel[:, 290] = -3.0
    hidden = np.concatenate([np.ones((1, 8, 16)), -np.ones((1, 8, 16))]).astype(np.float32)
    targets = np.array([[69] * 6 + [5] * 2, [290] * 6 + [10] * 2], np.int32)
    weights = objectives.target_weights(jnp.ones((2, 8)), "token")
    acc = objectives.chunked_cross_entropy(jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets),
                                           weights, 8, "xla", 64)[1]
    ref_acc = objectives.cross_entropy_loss_and_accuracy(jnp.asarray(hidden @ kernel), jnp.asarray(targets), weights)[1]
    assert float(acc) == float(ref_acc) == 0.25  # the last equal column would give 0.75


def test_clm_loss_vocab_chunked_with_a_tied_head_equals_logits_path():
    """The whole causal-LM loss through a tied 700-token head (700 = 10 × 64 + 60): the embedding's
    gradient, lookup and head together, equals the full-logits path; positions unchunked (0) too."""
    _, _, _, run = tiny_clm(tied=True)
    (ref_loss, ref_metrics), ref_grads = run(loss_chunk_size=0, loss_average="token")
    for chunk in (16, 0):
        (loss, metrics), grads = run(loss_chunk_size=chunk, loss_vocab_chunk_size=64, loss_average="token")
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        np.testing.assert_allclose(metrics["accuracy"], ref_metrics["accuracy"], atol=1e-7)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("vocab_axis", [1, 0])
def test_vocab_chunked_on_a_mesh(vocab_axis):
    """Rows sharded over 2 devices and the vocabulary over 4 (conftest's 8 emulated devices) give
    the single-device full-logits numbers, with the kernel as (hidden, vocab) columns or as a tied
    head's (vocab, hidden) table (vocab_axis=0)."""
    hidden, kernel, targets, mask = (jnp.asarray(x) for x in uneven_batch())
    weights = objectives.target_weights(mask, "row")
    full = lambda h, k: objectives.cross_entropy_loss_and_accuracy(h @ k, targets, weights)[0]
    chunked = lambda h, k: objectives.chunked_cross_entropy(h, k, targets, weights, 16, "xla", 64, vocab_axis)[0]
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    given = kernel if vocab_axis else kernel.T
    vocab = jax.sharding.PartitionSpec(*((None, "model") if vocab_axis else ("model", None)))
    loss, grads = jax.jit(jax.value_and_grad(chunked, (0, 1)))(
        jax.device_put(hidden, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))),
        jax.device_put(given, jax.sharding.NamedSharding(mesh, vocab)))
    np.testing.assert_allclose(float(loss), float(full(hidden, kernel)), rtol=1e-6)
    ref_hidden, ref_kernel = jax.grad(full, (0, 1))(hidden, kernel)
    np.testing.assert_allclose(grads[0], ref_hidden, atol=1e-6, rtol=0)
    np.testing.assert_allclose(grads[1], ref_kernel if vocab_axis else ref_kernel.T, atol=1e-6, rtol=0)


def test_vocab_chunked_in_bf16_compute_matches_the_position_chunked_loss():
    """bf16 activations, fp32 kernel: rounded where the position-only path rounds, so the two agree
    to summation order, in the same dtypes."""
    r = jax.random.split(jax.random.PRNGKey(4), 3)
    hidden = jax.random.normal(r[0], (2, 40, 32)).astype(jnp.bfloat16)
    kernel = jax.random.normal(r[1], (32, 300)) * 0.3
    targets = jax.random.randint(r[2], (2, 40), 0, 300)
    weights = token_mean(jnp.ones((2, 40)).at[1, :7].set(0))
    results = []
    for vocab_chunk in (0, 64):
        f = lambda h, k: objectives.chunked_cross_entropy(h, k, targets, weights, 16, "xla", vocab_chunk)
        (loss, acc), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(hidden, kernel)
        results.append((loss, acc, *grads))
    for name, a, b in zip(("loss", "accuracy", "d hidden", "d kernel"), *results):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-2, rtol=1e-2,
                                   err_msg=name)


def test_vocab_chunked_loss_kernel_choice():
    config = objectives.default_config()
    config.loss_vocab_chunk_size = 64
    assert objectives.clm_loss_kernel(config) == "xla"  # auto: the vocabulary-chunked loss is XLA ops
    with pytest.raises(ValueError, match="--objectives.loss_vocab_chunk_size=64 needs --objectives.loss_kernel=xla"):
        objectives.chunked_cross_entropy(jnp.ones((1, 4, 8)), jnp.ones((8, 100)), jnp.zeros((1, 4), jnp.int32),
                                         jnp.ones((1, 4)), 4, "cpu_fused", 64)
    config.loss_vocab_chunk_size = -1
    with pytest.raises(ValueError, match="--objectives.loss_vocab_chunk_size=-1: use 0"):
        objectives.clm_loss(None, None, {}, None, True, config)
