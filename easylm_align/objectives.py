"""Training objectives: masked next-token cross entropy (all recipes).

AFP's contrastive objective and poolers live here too (see `contrastive_loss`, `pool`).

How the per-token losses become one number is each reference's (`--objectives.loss_average`):
EasyLM, which COMMIT trains with, averages each row over its trained tokens and then averages the
rows (`row`); AFP's `nn.CrossEntropyLoss` averages over all trained tokens of the batch (`token`).
Both are written as per-position weights (`target_weights`) that the losses sum against, so every
path (full logits, chunked, either loss kernel, any mesh) computes the same mean over the global batch.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from easylm_align.model.kernels import cpu_cross_entropy, native
from easylm_align.errors import ConfigError
from easylm_align.model import lm_head_kernel, platform as model_platform


LOSS_AVERAGES = ("auto", "row", "token")
# The reference's average for each objective's causal-LM term: EasyLM's per-row mean (COMMIT),
# AFP's token mean (`nn.CrossEntropyLoss()` over the shifted labels).
REFERENCE_AVERAGE = {"clm": "row", "afp": "token"}


def resolve_loss_average(name: str, objective: str) -> str:
    """The concrete average for `--objectives.loss_average`: `auto` is `objective`'s reference's."""
    if name not in LOSS_AVERAGES:
        raise ConfigError(f"--objectives.loss_average={name!r}: use one of {LOSS_AVERAGES}")
    return REFERENCE_AVERAGE[objective] if name == "auto" else name


def target_weights(loss_mask: jnp.ndarray, average: str, groups: int = 1) -> jnp.ndarray:
    """Each position's weight in the mean loss, from a 0/1 mask (batch, seq).

    `token`: 1 / (trained tokens of the batch, at least 1); with `groups` > 1 the batch's rows are
    that many equal groups and the loss is the mean of the groups' token means (a data-parallel
    reference run's CLM loss, one group per rank). `row` (EasyLM's `cross_entropy_loss_and_accuracy`):
    1 / (the row's trained tokens, floored at 1e-10) / rows, so an all-masked row adds 0 to the mean
    but still counts as a row; equal groups of rows change nothing there.
    """
    mask = loss_mask.astype(jnp.float32)
    rows = mask.shape[0]
    if groups < 1 or rows % groups:
        raise ConfigError(f"--objectives.reference_ranks={groups} must be positive and divide the batch ({rows})")
    if average == "token":
        by_group = mask.reshape(groups, -1)
        return (by_group / jnp.maximum(by_group.sum(axis=1, keepdims=True), 1.0) / groups).reshape(mask.shape)
    if average == "row":
        return mask / jnp.maximum(mask.sum(axis=-1, keepdims=True), 1e-10) / rows
    raise ValueError(f"unknown loss average {average!r}")


def cross_entropy_loss_and_accuracy(logits: jnp.ndarray, targets: jnp.ndarray,
                                    weights: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean cross entropy and accuracy under `weights` (see `target_weights`; they sum to the mean)."""
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_ll = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    loss = -(token_ll * weights).sum()
    accuracy = ((jnp.argmax(logits, axis=-1) == targets) * weights).sum()
    return loss, accuracy


def _chunk_logits(h: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)


def _chunk_stats(logits, t, m) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """A chunk's weighted loss and correct count (`m`: the positions' weights), and the
    log-normaliser of each position."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    correct = ((jnp.argmax(logits, axis=-1) == t) * m).sum()
    return ((lse - target_logit) * m).sum(), correct, lse


def _logit_grads_xla(logits, t, m) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """A chunk's weighted loss, correct count, and d loss / d logits = (softmax − one-hot) · weight."""
    nll, correct, lse = _chunk_stats(logits, t, m)
    one_hot = jnp.arange(logits.shape[-1]) == t[..., None]
    return nll, correct, (jnp.exp(logits - lse[..., None]) - one_hot) * m[..., None]


def _logit_grads_cpu(logits, t, m) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    nll, correct, grads = cpu_cross_entropy.loss_and_logit_grads(logits, t, m)
    return (nll * m).sum(), (correct * m).sum(), grads


_LOGIT_GRADS = {"xla": _logit_grads_xla, "cpu_fused": _logit_grads_cpu}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_nll(h, w, t, m, loss_kernel) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(weighted loss, correct count) over chunks h (n, b, c, d) @ w (d, v); see chunked_cross_entropy."""
    def body(carry, xs):
        nll, correct, _ = _chunk_stats(_chunk_logits(xs[0], w), xs[1], xs[2])
        return (carry[0] + nll, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(body, (zero, zero), (h, t, m))[0]


def _chunked_nll_fwd(h, w, t, m, loss_kernel):
    """The loss and, from the same logits, its gradients: d loss / d logits, folded into dh (this
    chunk's rows) and dw (summed over chunks) at once."""
    logit_grads = _LOGIT_GRADS[loss_kernel]

    def body(carry, xs):
        hc, tc, mc = xs
        nll, correct, dlogits = logit_grads(_chunk_logits(hc, w), tc, mc)
        dlogits = dlogits.astype(hc.dtype)
        dh = jnp.einsum("bcv,dv->bcd", dlogits, w, preferred_element_type=jnp.float32).astype(hc.dtype)
        dw = carry[2] + jnp.einsum("bcd,bcv->dv", hc, dlogits, preferred_element_type=jnp.float32)
        return (carry[0] + nll, carry[1] + correct, dw), dh

    zero = jnp.zeros((), jnp.float32)
    (nll, correct, dw), dh = jax.lax.scan(body, (zero, zero, jnp.zeros(w.shape, jnp.float32)), (h, t, m))
    return (nll, correct), (dh, dw.astype(w.dtype))


def _chunked_nll_bwd(loss_kernel, residuals, cotangents):
    dh, dw = residuals
    g = cotangents[0]  # the correct count has no gradient
    return dh * g.astype(dh.dtype), dw * g.astype(dw.dtype), None, None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def _over_vocab(step, carry, vocab: int, size: int):
    """`carry = step(carry, start, width)` over the columns [0, vocab) in slices of `size`; a
    shorter last slice (vocab not divisible) is one more, static call."""
    size = min(size, vocab)
    full, tail = divmod(vocab, size)
    carry = jax.lax.fori_loop(0, full, lambda i, c: step(c, i * size, size), carry)
    return step(carry, full * size, tail) if tail else carry


def _slice_logits(hc, w, start, width, axis: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Vocabulary entries [start, start + width) of `w` (vocabulary along `axis`) as a (hidden,
    width) kernel in the activations' dtype, and their fp32 logits."""
    wc = jax.lax.dynamic_slice_in_dim(w, start, width, axis=axis).astype(hc.dtype)
    wc = wc.T if axis == 0 else wc
    return _chunk_logits(hc, wc), wc


def _vocab_stats(hc, w, tc, mc, vocab_chunk: int, axis: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """A position chunk's weighted loss, correct count and log-normalisers, from one vocabulary
    slice's logits at a time: running max and rescaled sum of exponentials, the target's logit,
    and the first arg-max (a later slice takes over only with a strictly larger logit, as
    `jnp.argmax` keeps the first of equal maxima)."""
    def step(carry, start, width):
        run_max, sum_exp, target_logit, best = carry
        logits, _ = _slice_logits(hc, w, start, width, axis)
        cols = start + jnp.arange(width)
        slice_max = logits.max(axis=-1)
        new_max = jnp.maximum(run_max, slice_max)
        sum_exp = sum_exp * jnp.exp(run_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(axis=-1)
        target_logit = target_logit + jnp.where(cols == tc[..., None], logits, 0.0).sum(axis=-1)
        best = jnp.where(slice_max > run_max, start + jnp.argmax(logits, axis=-1), best)
        return new_max, sum_exp, target_logit, best

    zeros = jnp.zeros(tc.shape, jnp.float32)
    init = (jnp.full(tc.shape, -jnp.inf, jnp.float32), zeros, zeros, jnp.zeros(tc.shape, jnp.int32))
    run_max, sum_exp, target_logit, best = _over_vocab(step, init, w.shape[axis], vocab_chunk)
    lse = run_max + jnp.log(sum_exp)
    return ((lse - target_logit) * mc).sum(), ((best == tc) * mc).sum(), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _vocab_chunked_nll(h, w, t, m, vocab_chunk, axis) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`_chunked_nll` with each position chunk's logits made `vocab_chunk` vocabulary entries at a
    time; `w` holds the vocabulary along `axis` (1: a (hidden, vocab) kernel, 0: a (vocab, hidden) table)."""
    def body(carry, xs):
        hc, tc, mc = xs
        nll, correct, _ = _vocab_stats(hc, w, tc, mc, vocab_chunk, axis)
        return (carry[0] + nll, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(body, (zero, zero), (h, t, m))[0]


def _vocab_chunked_nll_fwd(h, w, t, m, vocab_chunk, axis):
    """Two passes over the vocabulary per position chunk: the log-normalisers, then each slice's
    d loss / d logits, folded into dh (summed over slices, fp32) and into its own entries of dw.
    dw is the scan's one fp32 carry shaped as `w`, updated slice by slice in place: no full-size
    per-chunk product exists."""
    def body(carry, xs):
        hc, tc, mc = xs
        nll, correct, lse = _vocab_stats(hc, w, tc, mc, vocab_chunk, axis)

        def step(inner, start, width):
            dh, dw = inner
            logits, wc = _slice_logits(hc, w, start, width, axis)
            one_hot = start + jnp.arange(width) == tc[..., None]
            dlogits = ((jnp.exp(logits - lse[..., None]) - one_hot) * mc[..., None]).astype(hc.dtype)
            dh = dh + jnp.einsum("bcv,dv->bcd", dlogits, wc, preferred_element_type=jnp.float32)
            entries = jax.lax.dynamic_slice_in_dim(dw, start, width, axis=axis)
            entries = entries + jnp.einsum("bcd,bcv->dv" if axis else "bcd,bcv->vd", hc, dlogits,
                                           preferred_element_type=jnp.float32)
            return dh, jax.lax.dynamic_update_slice_in_dim(dw, entries, start, axis=axis)

        dh, dw = _over_vocab(step, (jnp.zeros(hc.shape, jnp.float32), carry[2]), w.shape[axis], vocab_chunk)
        return (carry[0] + nll, carry[1] + correct, dw), dh.astype(hc.dtype)

    zero = jnp.zeros((), jnp.float32)
    (nll, correct, dw), dh = jax.lax.scan(body, (zero, zero, jnp.zeros(w.shape, jnp.float32)), (h, t, m))
    # Rounded where `_chunked_nll` rounds it (its kernel is cast to the activations' dtype whole).
    return (nll, correct), (dh, dw.astype(h.dtype).astype(w.dtype))


def _vocab_chunked_nll_bwd(vocab_chunk, axis, residuals, cotangents):
    return _chunked_nll_bwd(None, residuals, cotangents)


_vocab_chunked_nll.defvjp(_vocab_chunked_nll_fwd, _vocab_chunked_nll_bwd)


def chunked_cross_entropy(hidden: jnp.ndarray, kernel: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                          chunk: int, loss_kernel: str = "xla", vocab_chunk: int = 0,
                          vocab_axis: int = 1) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`cross_entropy_loss_and_accuracy` of `hidden @ kernel` without the whole batch's logits.

    The sequence is cut into chunks of `chunk` positions; each chunk's fp32 logits are made,
    reduced to its weighted loss and correct count, and dropped, so at most one chunk's (batch,
    chunk, vocab) logits exist at once. Accuracy comes from the same pass. When differentiated, the
    same pass also turns each chunk's logits into their gradient and folds it into the gradients of
    `hidden` and `kernel` (a custom VJP, as fused linear cross-entropy kernels do): the logits are
    made once, not again in the backward pass, which then only scales the stored gradients by the
    incoming cotangent. `loss_kernel` (a concrete one, see `resolve_loss_kernel`) computes the
    logits' gradient: XLA ops, or the CPU kernel that does it in one pass; the undifferentiated
    loss always uses XLA ops. `weights` (see `target_weights`) say how each position counts.

    `vocab_chunk` > 0 also cuts the vocabulary: each chunk's logits are made `vocab_chunk` columns
    at a time, twice (the log-normalisers, then the gradients), so at most (batch, chunk,
    vocab_chunk) logits exist and the kernel's gradient is written slice by slice into one fp32
    buffer. The kernel is cast to `hidden`'s dtype one slice at a time (no whole copy); values are
    rounded where the position-only path rounds them, so only fp32 summation order differs. XLA
    ops only (`loss_kernel` must not be cpu_fused). `vocab_axis=0`: `kernel` is given as a
    (vocab, hidden) table, sliced by rows (a tied head: no transposed copy of the table).
    """
    batch, seq, width = hidden.shape
    n = -(-seq // chunk)
    pad = n * chunk - seq
    weights = weights.astype(jnp.float32)
    if pad:  # padded positions weigh 0
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
    by_chunk = lambda x: jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0)
    if vocab_chunk:
        if loss_kernel != "xla":
            raise ConfigError(f"--objectives.loss_vocab_chunk_size={vocab_chunk} needs --objectives.loss_kernel=xla "
                              f"or auto, not {loss_kernel} (which works on whole vocabulary rows)")
        nll, correct = _vocab_chunked_nll(by_chunk(hidden), kernel, by_chunk(targets), by_chunk(weights), vocab_chunk,
                                          vocab_axis)
    else:
        kernel = kernel.T if vocab_axis == 0 else kernel
        nll, correct = _chunked_nll(by_chunk(hidden), kernel.astype(hidden.dtype), by_chunk(targets),
                                    by_chunk(weights), loss_kernel)
    return nll, jax.lax.stop_gradient(correct)


LOSS_KERNELS = ("auto", "xla", "cpu_fused")


@functools.lru_cache(maxsize=None)
def _log_pick(pick: str, platform: str, why: str) -> None:
    logging.info("objectives.loss_kernel=auto picked %s on %s%s", pick, platform, why)


def resolve_loss_kernel(name: str, platform: Optional[str] = None, devices: Optional[int] = None) -> str:
    """The concrete kernel for `--objectives.loss_kernel`; ConfigError when it cannot run here.

    `auto` takes `cpu_fused` on a single CPU device where the kernels build; on several devices
    XLA would gather every device's logits chunk for the (unpartitioned) FFI call, so it stays
    with `xla` there, as on GPU and TPU.
    """
    platform = platform or model_platform.target()
    devices = devices or jax.device_count()
    if name not in LOSS_KERNELS:
        raise ConfigError(f"--objectives.loss_kernel={name!r}: use one of {LOSS_KERNELS}")
    reason = "it runs on the CPU only" if platform != "cpu" else native.unavailable()
    if name == "cpu_fused" and reason:
        raise ConfigError(f"--objectives.loss_kernel=cpu_fused: {reason}")
    if name != "auto":
        return name
    if reason is None and devices > 1:
        reason = f"the CPU kernel is not partitioned over {devices} devices"
    pick = "xla" if reason else "cpu_fused"
    _log_pick(pick, platform, f"; not cpu_fused: {reason}" if reason else "")
    return pick


def clm_loss_kernel(config) -> str:
    """The loss kernel `clm_loss` runs for `--objectives.*`: the vocabulary-chunked loss is XLA ops
    only, so `auto` takes xla there (and `chunked_cross_entropy` refuses cpu_fused)."""
    if config.loss_vocab_chunk_size and config.loss_kernel == "auto":
        return "xla"
    return resolve_loss_kernel(config.loss_kernel)


def default_config() -> ConfigDict:
    """`--objectives.*`: weights and options of the training objectives."""
    return ConfigDict(dict(
        clm_weight=1.5,             # AFP: total = cl_weight * L_cl + clm_weight * L_clm
        cl_weight=1.0,
        pooler="last-1",            # AFP's default: last token after the first decoder block
        temperature=0.05,           # cosine similarity is divided by it
        hard_negative_weight=0.0,   # logit offset of each row's own hard negative (SimCSE's)
        # The CLM loss takes this many positions' logits at a time (chunked_cross_entropy), so the
        # batch's fp32 logits never exist at once; 0 = all at once, from the model's logits (or all
        # positions as one chunk when loss_vocab_chunk_size cuts the vocabulary).
        loss_chunk_size=256,
        # 0 = off. Otherwise each chunk's logits are also made this many vocabulary columns at a
        # time, in two passes (log-normalisers, then gradients), and the head's gradient is written
        # slice by slice: for huge vocabularies (AFP's 256k). Needs loss_kernel xla or auto.
        loss_vocab_chunk_size=0,
        # What computes the chunked loss's gradient w.r.t. the logits (see resolve_loss_kernel):
        # auto, xla, or cpu_fused (one pass in C++; the CPU only). Results equal to 1e-5.
        loss_kernel="auto",
        # How the causal-LM loss and accuracy average over trained tokens: row (each row's mean,
        # then the mean over rows: EasyLM's, COMMIT's reference), token (the mean over the batch's
        # trained tokens: AFP's reference), or auto (the objective's reference).
        loss_average="auto",
        # AFP: reproduce a data-parallel reference run on this many ranks (see `afp_loss`); 1 = the
        # gradient of the global batch's loss. Needs --train_dataset.afp_dataset.clm_groups equal to it.
        reference_ranks=1,
    ))


def clm_loss(model, params, batch: dict, rng, deterministic: bool, config, objective: str = "clm",
             groups: int = 1) -> tuple[jnp.ndarray, dict]:
    """Causal LM on packed rows (all of COMMIT's stages; AFP's CLM term with `objective="afp"`);
    `groups`: see `target_weights`."""
    for name in ("loss_chunk_size", "loss_vocab_chunk_size"):
        if config[name] < 0:
            raise ConfigError(f"--objectives.{name}={config[name]}: use 0 (off) or a positive size")
    weights = target_weights(batch["loss_masks"], resolve_loss_average(config.loss_average, objective), groups)
    vocab_chunk = config.loss_vocab_chunk_size
    chunked = config.loss_chunk_size > 0 or vocab_chunk > 0
    out = model.apply({"params": params}, batch["input_tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], deterministic=deterministic, rngs={"dropout": rng},
                      return_logits=not chunked)
    if chunked:
        kernel, vocab_axis = lm_head_kernel(params, model.config), 1
        if vocab_chunk and model.config.tie_word_embeddings:
            # A tied head's kernel is the table transposed; handing the table back (XLA cancels the
            # two transposes) lets the slices come from its rows, with no transposed fp32 copy of it.
            kernel, vocab_axis = kernel.T, 0
        loss, accuracy = chunked_cross_entropy(out.last_hidden_state, kernel, batch["target_tokens"], weights,
                                               config.loss_chunk_size or batch["target_tokens"].shape[1],
                                               clm_loss_kernel(config), vocab_chunk, vocab_axis)
    else:
        loss, accuracy = cross_entropy_loss_and_accuracy(out.logits, batch["target_tokens"], weights)
    return loss, {"loss": loss, "accuracy": accuracy, "loss_tokens": batch["loss_masks"].sum()}


# ----------------------------------------------------------------------------------------------
# AFP: poolers and the contrastive (InfoNCE) loss
# ----------------------------------------------------------------------------------------------

# Named multi-layer poolers (AFP's `Pooler`): reduction and Hugging Face hidden-state indices,
# where 0 is the embedding output and -1 the last layer after the final norm.
_NAMED_POOLERS = {
    "avg_first_last": ("avg", (1, -1)),   # "first" is block 1, not the embeddings
    "avg_top2": ("avg", (-1, -2)),
    "last_first_last": ("last", (1, -1)),
    "last_top2": ("last", (-1, -2)),
    "avg": ("avg", (-1,)),
    "last": ("last", (-1,)),
}
_LAYER_POOLER = re.compile(r"(last|avg|max)-(-?\d+)")


def parse_pooler(name: str, num_hidden_states: int) -> tuple[str, tuple[int, ...]]:
    """`last-K` / `avg-K` / `max-K` (K indexes the hidden states, 0 = embeddings) or a named pooler
    → (reduction, non-negative hidden-state indices)."""
    match = _LAYER_POOLER.fullmatch(name)
    if match:
        reduction, layers = match.group(1), (int(match.group(2)),)
    elif name in _NAMED_POOLERS:
        reduction, layers = _NAMED_POOLERS[name]
    else:
        raise ConfigError(f"--objectives.pooler={name!r}: use last-K, avg-K, max-K (K = 0..{num_hidden_states - 1}, "
                         f"0 = embeddings) or one of {sorted(_NAMED_POOLERS)}")
    if not all(-num_hidden_states <= k < num_hidden_states for k in layers):
        raise ConfigError(f"--objectives.pooler={name!r}: the model has hidden states 0..{num_hidden_states - 1}")
    return reduction, tuple(k % num_hidden_states for k in layers)


def pooler_depth(pooler: str, num_layers: int) -> int:
    """How many decoder blocks a pooler reads through: its deepest hidden state's index, so 1 for
    `last-1` and `num_layers` (the whole stack and the final norm) for any pooler reading -1."""
    return max(parse_pooler(pooler, num_layers + 1)[1])


def pool(hidden_states: Sequence[jnp.ndarray], mask: jnp.ndarray, pooler: str,
         num_hidden_states: Optional[int] = None) -> jnp.ndarray:
    """Sentence embeddings (batch, hidden) from per-layer states (batch, seq, hidden); `mask` is 1 on
    real tokens. Layers are averaged first; padding never contributes, wherever it is.

    `num_hidden_states` (default: all were given) is the model's count, against which the pooler's
    layer indices resolve; `hidden_states` may then hold only the first `pooler_depth` + 1 of them."""
    reduction, layers = parse_pooler(pooler, num_hidden_states or len(hidden_states))
    h = sum(hidden_states[k].astype(jnp.float32) for k in layers) / len(layers)
    real = mask.astype(bool)
    if reduction == "last":  # the last real token (AFP's `mask.sum() - 1`, which assumes right padding)
        last = jnp.max(jnp.where(real, jnp.arange(mask.shape[1]), 0), axis=1)
        return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    if reduction == "avg":
        weights = real.astype(jnp.float32)[..., None]
        return (h * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    # max: over real tokens only (AFP multiplies by the mask, so its pads count as zeros)
    return jnp.max(jnp.where(real[..., None], h, jnp.finfo(jnp.float32).min), axis=1)


def _cosine_logits(a: jnp.ndarray, b: jnp.ndarray, temperature: float) -> jnp.ndarray:
    """cos(a_i, b_j) / temperature for all i, j (torch's CosineSimilarity, eps 1e-8)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    norms = jnp.linalg.norm(a, axis=-1)[:, None] * jnp.linalg.norm(b, axis=-1)[None, :]
    return (a @ b.T) / jnp.maximum(norms, 1e-8) / temperature


def contrastive_loss(anchors: jnp.ndarray, positives: jnp.ndarray, temperature: float,
                     hard_negatives: Optional[jnp.ndarray] = None,
                     hard_negative_weight: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One-directional InfoNCE (supervised SimCSE): row i's target is positive i; every other
    positive (and every hard negative) in the batch is a negative. Returns (loss, accuracy).

    The arrays hold the whole (global) batch: under `jit` with batch-sharded inputs the (B, B)
    similarity matrix spans all devices, so the negatives come from the global batch.
    """
    if temperature <= 0:
        raise ConfigError(f"--objectives.temperature={temperature}: must be positive")
    logits = _cosine_logits(anchors, positives, temperature)
    if hard_negatives is not None:
        offset = hard_negative_weight * jnp.eye(anchors.shape[0], dtype=jnp.float32)
        logits = jnp.concatenate([logits, _cosine_logits(anchors, hard_negatives, temperature) + offset], axis=1)
    diagonal = jnp.diagonal(logits)
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diagonal)
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(anchors.shape[0]))
    return loss, accuracy


def sentence_embeddings(model, params, tokens: jnp.ndarray, masks: jnp.ndarray, pooler: str, rng,
                        deterministic: bool) -> jnp.ndarray:
    """Pooled embeddings of (batch, sentences, length) right-padded token ids → (batch, sentences, hidden).

    One forward over all sentences, through the deepest block the pooler reads and no further (the
    blocks after it would change nothing pooled); padding is segment 0, so no real token attends to it.
    """
    batch, sentences, length = tokens.shape
    num_layers = model.config.num_hidden_layers
    flat_masks = masks.reshape(batch * sentences, length).astype(jnp.int32)
    out = model.apply({"params": params}, tokens.reshape(batch * sentences, length), segment_ids=flat_masks,
                      deterministic=deterministic, output_hidden_states=True, return_logits=False,
                      num_layers=pooler_depth(pooler, num_layers), rngs={"dropout": rng})
    return pool(out.hidden_states, flat_masks, pooler, num_layers + 1).reshape(batch, sentences, -1)


def scale_gradient(x: jnp.ndarray, factor: float) -> jnp.ndarray:
    """`x` in value, `factor` · its gradient."""
    return factor * x + jax.lax.stop_gradient(x - factor * x)


def afp_loss(model, params, batch: dict, rng, deterministic: bool, config) -> tuple[jnp.ndarray, dict]:
    """AFP: `cl_weight` · InfoNCE over the pairs `cl_tokens[:, 0]` → `cl_tokens[:, 1]` (a third
    column: hard negatives) + `clm_weight` · causal LM on the packed rows. `accuracy` is the CLM's.

    `reference_ranks=W` > 1 gives the gradient of AFP's code on W data-parallel ranks, each holding
    batch/W rows: each rank's contrastive loss is the global one but its gradient reaches only its
    own rows (the all-gather puts back only the local embeddings), and DDP averages the ranks'
    gradients, so the contrastive gradient is 1/W of the global loss's; each rank's CLM loss is
    the token mean over its own rows (clm_groups=W builds them rank by rank), averaged over ranks.
    """
    cl_rng, clm_rng = jax.random.split(rng)
    z = sentence_embeddings(model, params, batch["cl_tokens"], batch["cl_masks"], config.pooler, cl_rng,
                            deterministic)
    hard = z[:, 2] if z.shape[1] > 2 else None
    cl, cl_accuracy = contrastive_loss(z[:, 0], z[:, 1], config.temperature, hard, config.hard_negative_weight)
    ranks = config.reference_ranks
    if ranks != 1:
        cl = scale_gradient(cl, 1.0 / ranks)
    clm, clm_metrics = clm_loss(model, params, batch, clm_rng, deterministic, config, objective="afp", groups=ranks)
    loss = config.cl_weight * cl + config.clm_weight * clm
    return loss, {"loss": loss, "accuracy": clm_metrics["accuracy"], "cl_loss": cl, "cl_accuracy": cl_accuracy,
                  "clm_loss": clm, "clm_accuracy": clm_metrics["accuracy"], "loss_tokens": clm_metrics["loss_tokens"]}


# name -> loss function(model, params, batch, rng, deterministic, config) -> (loss, metrics)
OBJECTIVES = {"clm": clm_loss, "afp": afp_loss}
