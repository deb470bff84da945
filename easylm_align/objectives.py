"""Training objectives: masked next-token cross entropy (all recipes).

AFP's contrastive objective and poolers live here too (see `contrastive_loss`, `pool`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict


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


def default_config() -> ConfigDict:
    """`--objectives.*`: weights and options of the training objectives."""
    return ConfigDict(dict(clm_weight=1.0))


def clm_loss(model, params, batch: dict, rng, deterministic: bool, config) -> tuple[jnp.ndarray, dict]:
    """Causal LM on packed rows (all of COMMIT's stages)."""
    out = model.apply({"params": params}, batch["input_tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], deterministic=deterministic, rngs={"dropout": rng})
    loss, accuracy = cross_entropy_loss_and_accuracy(out.logits, batch["target_tokens"], batch["loss_masks"])
    return loss, {"loss": loss, "accuracy": accuracy, "loss_tokens": batch["loss_masks"].sum()}


# name -> loss function(model, params, batch, rng, deterministic, config) -> (loss, metrics)
OBJECTIVES = {"clm": clm_loss}
