"""Training objectives: masked next-token cross entropy (all recipes).

AFP's contrastive objective and poolers live here too (see `contrastive_loss`, `pool`).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from easylm_align import cpu_cross_entropy, cpu_kernels
from easylm_align.errors import ConfigError
from easylm_align.model import lm_head_kernel


def cross_entropy_loss_and_accuracy(logits: jnp.ndarray, targets: jnp.ndarray,
                                    loss_mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Token-weighted mean cross entropy and accuracy over positions where `loss_mask` is 1."""
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_ll = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)
    loss = -(token_ll * mask).sum() / denom
    accuracy = ((jnp.argmax(logits, axis=-1) == targets) * mask).sum() / denom
    return loss, accuracy


def _chunk_logits(h: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)


def _chunk_stats(logits, t, m) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """A chunk's summed masked loss, its correct count, and the log-normaliser of each position."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    correct = ((jnp.argmax(logits, axis=-1) == t) * m).sum()
    return ((lse - target_logit) * m).sum(), correct, lse


def _logit_grads_xla(logits, t, m) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """A chunk's summed masked loss, correct count, and d loss / d logits = (softmax − one-hot) · mask."""
    nll, correct, lse = _chunk_stats(logits, t, m)
    one_hot = jnp.arange(logits.shape[-1]) == t[..., None]
    return nll, correct, (jnp.exp(logits - lse[..., None]) - one_hot) * m[..., None]


def _logit_grads_cpu(logits, t, m) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    nll, correct, grads = cpu_cross_entropy.loss_and_logit_grads(logits, t, m)
    return (nll * m).sum(), (correct * m).sum(), grads


_LOGIT_GRADS = {"xla": _logit_grads_xla, "cpu_fused": _logit_grads_cpu}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_nll(h, w, t, m, loss_kernel) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(summed loss, correct count) over chunks h (n, b, c, d) @ w (d, v); see chunked_cross_entropy."""
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


def chunked_cross_entropy(hidden: jnp.ndarray, kernel: jnp.ndarray, targets: jnp.ndarray, loss_mask: jnp.ndarray,
                          chunk: int, loss_kernel: str = "xla") -> tuple[jnp.ndarray, jnp.ndarray]:
    """`cross_entropy_loss_and_accuracy` of `hidden @ kernel` without the whole batch's logits.

    The sequence is cut into chunks of `chunk` positions; each chunk's fp32 logits are made,
    reduced to its summed loss and correct count, and dropped, so at most one chunk's (batch,
    chunk, vocab) logits exist at once. Accuracy comes from the same pass. When differentiated, the
    same pass also turns each chunk's logits into their gradient and folds it into the gradients of
    `hidden` and `kernel` (a custom VJP, as fused linear cross-entropy kernels do): the logits are
    made once, not again in the backward pass, which then only scales the stored gradients by the
    incoming cotangent. `loss_kernel` (a concrete one, see `resolve_loss_kernel`) computes the
    logits' gradient: XLA ops, or the CPU kernel that does it in one pass; the undifferentiated
    loss always uses XLA ops.
    """
    batch, seq, width = hidden.shape
    n = -(-seq // chunk)
    pad = n * chunk - seq
    mask = loss_mask.astype(jnp.float32)
    if pad:  # padded positions have mask 0
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    by_chunk = lambda x: jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0)
    nll, correct = _chunked_nll(by_chunk(hidden), kernel.astype(hidden.dtype), by_chunk(targets), by_chunk(mask),
                                loss_kernel)
    denom = jnp.maximum(mask.sum(), 1.0)
    return nll / denom, jax.lax.stop_gradient(correct) / denom


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
    platform = platform or jax.default_backend()
    devices = devices or jax.device_count()
    if name not in LOSS_KERNELS:
        raise ConfigError(f"--objectives.loss_kernel={name!r}: use one of {LOSS_KERNELS}")
    reason = "it runs on the CPU only" if platform != "cpu" else cpu_kernels.unavailable()
    if name == "cpu_fused" and reason:
        raise ConfigError(f"--objectives.loss_kernel=cpu_fused: {reason}")
    if name != "auto":
        return name
    if reason is None and devices > 1:
        reason = f"the CPU kernel is not partitioned over {devices} devices"
    pick = "xla" if reason else "cpu_fused"
    _log_pick(pick, platform, f"; not cpu_fused: {reason}" if reason else "")
    return pick


def default_config() -> ConfigDict:
    """`--objectives.*`: weights and options of the training objectives."""
    return ConfigDict(dict(
        clm_weight=1.5,             # AFP: total = cl_weight * L_cl + clm_weight * L_clm
        cl_weight=1.0,
        pooler="last-1",            # AFP's default: last token after the first decoder block
        temperature=0.05,           # cosine similarity is divided by it
        hard_negative_weight=0.0,   # logit offset of each row's own hard negative (SimCSE's)
        # The CLM loss takes this many positions' logits at a time (chunked_cross_entropy), so the
        # batch's fp32 logits never exist at once; 0 = all at once, from the model's logits.
        loss_chunk_size=256,
        # What computes the chunked loss's gradient w.r.t. the logits (see resolve_loss_kernel):
        # auto, xla, or cpu_fused (one pass in C++; the CPU only). Results equal to 1e-5.
        loss_kernel="auto",
    ))


def clm_loss(model, params, batch: dict, rng, deterministic: bool, config) -> tuple[jnp.ndarray, dict]:
    """Causal LM on packed rows (all of COMMIT's stages)."""
    if config.loss_chunk_size < 0:
        raise ConfigError(f"--objectives.loss_chunk_size={config.loss_chunk_size}: use 0 (off) or a positive size")
    chunked = config.loss_chunk_size > 0
    out = model.apply({"params": params}, batch["input_tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], deterministic=deterministic, rngs={"dropout": rng},
                      return_logits=not chunked)
    if chunked:
        loss, accuracy = chunked_cross_entropy(out.last_hidden_state, lm_head_kernel(params, model.config),
                                               batch["target_tokens"], batch["loss_masks"], config.loss_chunk_size,
                                               resolve_loss_kernel(config.loss_kernel))
    else:
        loss, accuracy = cross_entropy_loss_and_accuracy(out.logits, batch["target_tokens"], batch["loss_masks"])
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


def afp_loss(model, params, batch: dict, rng, deterministic: bool, config) -> tuple[jnp.ndarray, dict]:
    """AFP: `cl_weight` · InfoNCE over the pairs `cl_tokens[:, 0]` → `cl_tokens[:, 1]` (a third
    column: hard negatives) + `clm_weight` · causal LM on the packed rows. `accuracy` is the CLM's."""
    cl_rng, clm_rng = jax.random.split(rng)
    z = sentence_embeddings(model, params, batch["cl_tokens"], batch["cl_masks"], config.pooler, cl_rng,
                            deterministic)
    hard = z[:, 2] if z.shape[1] > 2 else None
    cl, cl_accuracy = contrastive_loss(z[:, 0], z[:, 1], config.temperature, hard, config.hard_negative_weight)
    clm, clm_metrics = clm_loss(model, params, batch, clm_rng, deterministic, config)
    loss = config.cl_weight * cl + config.clm_weight * clm
    return loss, {"loss": loss, "accuracy": clm_metrics["accuracy"], "cl_loss": cl, "cl_accuracy": cl_accuracy,
                  "clm_loss": clm, "clm_accuracy": clm_metrics["accuracy"], "loss_tokens": clm_metrics["loss_tokens"]}


# name -> loss function(model, params, batch, rng, deterministic, config) -> (loss, metrics)
OBJECTIVES = {"clm": clm_loss, "afp": afp_loss}
