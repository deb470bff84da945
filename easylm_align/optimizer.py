"""AdamW with linear warmup and cosine decay, gradient clipping and accumulation (optax).

The flags are EasyLM's (`--optimizer.adamw_optimizer.lr=2e-5` …). With
`accumulate_gradient_steps=k` every train step consumes one batch and the weights change every
k-th step (optax.MultiSteps averages the k gradients), so k steps of batch b equal one step of
batch k·b. Schedule steps count weight updates.

By default (`adamw_optimizer.fused=True`) clipping and AdamW are one transformation whose update
is a single elementwise function per parameter: the clip factor is a scalar folded into it. The
same arithmetic as `optax.chain(optax.clip_by_global_norm, optax.adamw)` (tested equal), but XLA
then updates the moments in their donated buffers instead of materialising a clipped copy of
every gradient first, one parameter-sized tree less at the peak (3.1 GiB per device for the
seed's 7B command; docs/PERFORMANCE.md). `fused=False` runs the optax chain itself.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from easylm_align.errors import ConfigError
from easylm_align.tree_paths import path_str


def default_config() -> ConfigDict:
    return ConfigDict(dict(
        type="adamw",
        accumulate_gradient_steps=1,
        adamw_optimizer=ConfigDict(dict(
            init_lr=0.0,
            lr=2e-3,
            end_lr=1e-4,
            lr_warmup_steps=20,
            lr_decay_steps=300,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_gradient=1.0,
            weight_decay=0.1,
            bf16_momentum=False,
            fused=True,
        )),
    ))


def lr_schedule(config: ConfigDict) -> optax.Schedule:
    """Linear warmup from init_lr to lr over lr_warmup_steps, then cosine to end_lr at lr_decay_steps."""
    c = config.adamw_optimizer
    if c.lr_decay_steps <= c.lr_warmup_steps:
        raise ConfigError(f"--optimizer.adamw_optimizer.lr_decay_steps={c.lr_decay_steps} must be larger than "
                         f"lr_warmup_steps={c.lr_warmup_steps}")
    return optax.warmup_cosine_decay_schedule(init_value=c.init_lr, peak_value=c.lr, warmup_steps=c.lr_warmup_steps,
                                              decay_steps=c.lr_decay_steps, end_value=c.end_lr)


def decay_mask(params: Any) -> Any:
    """Weight decay applies to weight matrices and embeddings, never to RMSNorm scales nor biases (Qwen2's)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not path_str(path).endswith(("norm/scale", "/bias")), params)


def build(config: ConfigDict) -> tuple[optax.GradientTransformation, Callable[[Any], jnp.ndarray]]:
    """Returns the optimizer and a function from its state to the current learning rate."""
    if config.type != "adamw":
        raise ConfigError(f"--optimizer.type={config.type!r}: only 'adamw' is implemented")
    if config.accumulate_gradient_steps < 1:
        raise ConfigError("--optimizer.accumulate_gradient_steps must be >= 1")
    c = config.adamw_optimizer
    schedule = lr_schedule(config)
    mu_dtype = jnp.bfloat16 if c.bf16_momentum else None
    if c.fused:
        tx = clipped_adamw(schedule, c.b1, c.b2, c.eps, c.weight_decay, c.clip_gradient, mu_dtype)
    else:
        tx = optax.chain(
            optax.clip_by_global_norm(c.clip_gradient) if c.clip_gradient > 0 else optax.identity(),
            optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask,
                        mu_dtype=mu_dtype),
        )
    k = config.accumulate_gradient_steps
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k)

    def current_lr(opt_state: Any) -> jnp.ndarray:
        inner = opt_state.inner_opt_state if k > 1 else opt_state
        # Adam's and the schedule's counters both count weight updates; either will do.
        return schedule(optax.tree_utils.tree_get_all_with_path(inner, "count")[0][1])

    return tx, current_lr


class ClippedAdamWState(NamedTuple):
    count: jnp.ndarray  # weight updates so far (the schedule's step)
    mu: Any
    nu: Any


def clipped_adamw(schedule: optax.Schedule, b1: float, b2: float, eps: float, weight_decay: float,
                  clip_gradient: float, mu_dtype: Any = None) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled decay, masked by `decay_mask`) in one pass per leaf.

    Matches optax's definitions: clip scales by max/norm only when norm >= max; the moments are
    bias-corrected; the step uses the fp32 first moment before it is stored in `mu_dtype`; the
    learning rate is `schedule(count)` before the count is incremented.
    """
    def init(params: Any) -> ClippedAdamWState:
        mu = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
        return ClippedAdamWState(jnp.zeros([], jnp.int32), mu, jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(grads: Any, state: ClippedAdamWState, params: Any) -> tuple[Any, ClippedAdamWState]:
        scale = jnp.ones([], jnp.float32)
        if clip_gradient > 0:
            norm = optax.tree.norm(grads)
            scale = jnp.where(norm < clip_gradient, 1.0, clip_gradient / norm)
        count = optax.safe_increment(state.count)
        lr = schedule(state.count)
        mu_correction, nu_correction = 1 - b1 ** count, 1 - b2 ** count

        def leaf(g, mu, nu, p, decay):
            g = g * scale.astype(g.dtype)
            mu = (1 - b1) * g + b1 * mu  # as optax: b1·mu rounds in mu's dtype, the sum is fp32
            nu = (1 - b2) * jnp.square(g) + b2 * nu
            step = (mu / mu_correction) / (jnp.sqrt(nu / nu_correction) + eps)
            if decay and weight_decay:
                step = step + weight_decay * p
            return -lr * step, mu.astype(mu_dtype or mu.dtype), nu

        out = jax.tree_util.tree_map(leaf, grads, state.mu, state.nu, params, decay_mask(params))
        pick = lambda i: jax.tree_util.tree_map(lambda _, o: o[i], grads, out)
        return pick(0), ClippedAdamWState(count, pick(1), pick(2))

    return optax.GradientTransformation(init, update)
