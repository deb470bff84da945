"""`--objectives.loss_kernel=cpu_fused`: the softmax cross entropy of a block of logits rows and
its gradient, in one pass (`kernels/cpu_cross_entropy.cc`, built by `native`).

As XLA ops on the CPU the vocabulary-wide reductions and the gradient ran as separate
single-threaded loops over the fp32 logits; they took a tenth of the train step
(docs/PERFORMANCE.md). The matmuls around it stay XLA's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from easylm_align.model.kernels import native

_TARGET = "easylm_cpu_cross_entropy"


def loss_and_logit_grads(logits: jnp.ndarray, targets: jnp.ndarray,
                         mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """logits (..., vocab) fp32, targets and mask (...) → per row the negative log-likelihood
    (unmasked; NaN for a target outside the vocabulary), 1.0 where the first arg-max is the
    target (else 0.0), and the logits' gradient (softmax − one-hot) · mask, which takes the
    logits' buffer."""
    native.require()
    flat = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
    rows = jax.ShapeDtypeStruct(flat.shape[:1], jnp.float32)
    grads, nll, correct = jax.ffi.ffi_call(_TARGET, (jax.ShapeDtypeStruct(flat.shape, jnp.float32), rows, rows),
                                           input_output_aliases={0: 0})(
        flat, targets.reshape(-1).astype(jnp.int32), mask.reshape(-1).astype(jnp.float32))
    return nll.reshape(targets.shape), correct.reshape(targets.shape), grads.reshape(logits.shape)
