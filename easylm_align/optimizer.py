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

`variant` picks where ε goes. `adamw_torch` (the default; `torch.optim.AdamW`, optax):
`lr·m̂/(√v̂ + ε)` with decay `lr·wd·p`. `adamw_hf` (Hugging Face's own `AdamW`, the Trainer's
default `--optim` up to transformers 4.x, which AFP ran): ε is added to √v before the bias
correction, `lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · m/(√v + ε)`, and the decay `lr·wd·p` is taken from the weights
after that step. Early in training, while √v is near ε, the two differ visibly.
`trainable` (a regular expression searched in each parameter's path, or a shortcut from
TRAINABLE_SHORTCUTS) trains only the parameters it matches. The others are frozen: they get no
update and no weight decay, and the optimizer holds no moments (nor accumulated gradients) for
them, so an embeddings-only stage keeps a fraction of a full run's optimizer memory. Gradient
clipping sees the trainable gradients only.
"""

from __future__ import annotations

import re
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
        trainable="",  # '' trains everything; else a regex over parameter paths or a TRAINABLE_SHORTCUTS name
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
            # A regular expression (re.search) over parameter paths such as
            # `layers_0/ffn_norm/scale`: matching parameters are not decayed. Empty (EasyLM's, whose
            # LLaMA excludes nothing): every parameter is decayed; `norm/scale$` spares the RMSNorm scales.
            weight_decay_exclude="",
            bf16_momentum=False,
            fused=True,
            variant="adamw_torch",  # or "adamw_hf" (ε before the bias correction; module docstring)
        )),
        # Zero the gradient of the input embedding's EOS row, as AFP's `padding_idx` (= EOS) does.
        freeze_eos_embedding=False,
    ))


def lr_schedule(config: ConfigDict) -> optax.Schedule:
    """Linear warmup from init_lr to lr over lr_warmup_steps, then cosine to end_lr at lr_decay_steps."""
    c = config.adamw_optimizer
    if c.lr_decay_steps <= c.lr_warmup_steps:
        raise ConfigError(f"--optimizer.adamw_optimizer.lr_decay_steps={c.lr_decay_steps} must be larger than "
                         f"lr_warmup_steps={c.lr_warmup_steps}")
    return optax.warmup_cosine_decay_schedule(init_value=c.init_lr, peak_value=c.lr, warmup_steps=c.lr_warmup_steps,
                                              decay_steps=c.lr_decay_steps, end_value=c.end_lr)


def decay_mask(exclude: str) -> Callable[[Any], Any]:
    """The weight decay mask for `--optimizer.adamw_optimizer.weight_decay_exclude`: parameters whose
    path the expression matches anywhere (EasyLM's rule) are not decayed; an empty one decays all."""
    try:
        pattern = re.compile(exclude) if exclude else None
    except re.error as e:
        raise ConfigError(f"--optimizer.adamw_optimizer.weight_decay_exclude={exclude!r}: not a regular expression "
                          f"({e})") from None
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: pattern is None or pattern.search(path_str(path)) is None, params)


def build(config: ConfigDict) -> tuple[optax.GradientTransformation, Callable[[Any], jnp.ndarray]]:
    """Returns the optimizer and a function from its state to the current learning rate."""
    if config.type != "adamw":
        raise ConfigError(f"--optimizer.type={config.type!r}: only 'adamw' is implemented")
    if config.accumulate_gradient_steps < 1:
        raise ConfigError("--optimizer.accumulate_gradient_steps must be >= 1")
    c = config.adamw_optimizer
    schedule = lr_schedule(config)
    mu_dtype = jnp.bfloat16 if c.bf16_momentum else None
    mask = decay_mask(c.weight_decay_exclude)
    if c.variant not in VARIANTS:
        raise ConfigError(f"--optimizer.adamw_optimizer.variant={c.variant!r}: use one of {VARIANTS}")
    if c.fused:
        tx = clipped_adamw(schedule, c.b1, c.b2, c.eps, c.weight_decay, c.clip_gradient, mu_dtype, c.variant, mask)
    else:
        clip = optax.clip_by_global_norm(c.clip_gradient) if c.clip_gradient > 0 else optax.identity()
        if c.variant == "adamw_hf":  # optax has no such AdamW: its clip, then ours unclipped
            adamw = clipped_adamw(schedule, c.b1, c.b2, c.eps, c.weight_decay, 0.0, mu_dtype, c.variant, mask)
        else:
            adamw = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask,
                                mu_dtype=mu_dtype)
        tx = optax.chain(clip, adamw)
    k = config.accumulate_gradient_steps
    if k > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=k)
    if config.trainable:
        # Frozen leaves are MaskedNodes inside the trained branch: no moments, no accumulators.
        tx = optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, trainable_labels(config.trainable))

    def current_lr(opt_state: Any) -> jnp.ndarray:
        # Adam's and the schedule's counters both count weight updates; either will do. (MultiSteps'
        # own counters are named mini_step and gradient_step.)
        return schedule(optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1])

    return tx, current_lr


VARIANTS = ("adamw_torch", "adamw_hf")


def zero_embedding_row(grads: Any, row: int) -> Any:
    """`grads` with the input embedding's row `row` zeroed (torch's `padding_idx`): that row keeps
    its value under AdamW (zero moments, zero step); weight decay, if any, still applies, as there."""
    def leaf(path, g):
        return g.at[row].set(0) if path_str(path) == "embed_tokens/embedding" else g
    return jax.tree_util.tree_map_with_path(leaf, grads)


# Named parameter sets for --optimizer.trainable (regexes over tree_paths.path_str names).
TRAINABLE_SHORTCUTS = {
    "embeddings": r"^(embed_tokens/embedding|lm_head/kernel)$",  # input embeddings and LM head
    "embed_tokens": r"^embed_tokens/embedding$",
    "lm_head": r"^lm_head/kernel$",
    "norms": r"norm/scale$",
}
TRAIN, FROZEN = "train", "frozen"


def trainable_pattern(trainable: str) -> re.Pattern:
    """The regex `--optimizer.trainable` names; a shortcut, or several joined by ',', expands."""
    names = [n.strip() for n in trainable.split(",")]
    if all(n in TRAINABLE_SHORTCUTS for n in names):
        trainable = "|".join(f"(?:{TRAINABLE_SHORTCUTS[n]})" for n in names)
    try:
        return re.compile(trainable)
    except re.error as e:
        raise ConfigError(f"--optimizer.trainable={trainable!r} is not a regular expression ({e}) nor one of "
                          f"the shortcuts {sorted(TRAINABLE_SHORTCUTS)}") from None


def trainable_mask(params: Any, trainable: str) -> Any:
    """True for each leaf `--optimizer.trainable` trains ('' trains all); an error if it matches none."""
    if not trainable:
        return jax.tree_util.tree_map(lambda _: True, params)
    pattern = trainable_pattern(trainable)
    mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(pattern.search(path_str(path))), params)
    if not any(jax.tree_util.tree_leaves(mask)):
        names = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise ConfigError(f"--optimizer.trainable={trainable!r} matches no parameter (paths look like "
                          f"{names[0]!r}; shortcuts: {sorted(TRAINABLE_SHORTCUTS)})")
    return mask


def stop_frozen_gradients(params: Any, trainable: str) -> Any:
    """`params` with frozen leaves behind stop_gradient, so their weight gradients are never computed."""
    if not trainable:
        return params
    return jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                                  trainable_mask(params, trainable))


def trainable_labels(trainable: str) -> Callable[[Any], Any]:
    return lambda params: jax.tree_util.tree_map(lambda t: TRAIN if t else FROZEN, trainable_mask(params, trainable))


class ClippedAdamWState(NamedTuple):
    count: jnp.ndarray  # weight updates so far (the schedule's step)
    mu: Any
    nu: Any


def clipped_adamw(schedule: optax.Schedule, b1: float, b2: float, eps: float, weight_decay: float,
                  clip_gradient: float, mu_dtype: Any = None,
                  variant: str = "adamw_torch",
                  mask: Callable[[Any], Any] = decay_mask("")) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled decay where `mask(params)` is True) in one pass per leaf.

    Matches optax's definitions: clip scales by max/norm only when norm >= max; the moments are
    bias-corrected; the step uses the fp32 first moment before it is stored in `mu_dtype`; the
    learning rate is `schedule(count)` before the count is incremented. `variant="adamw_hf"` places
    ε and the decay as Hugging Face's AdamW (module docstring).
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
            if variant == "adamw_hf":
                update = -(lr * jnp.sqrt(nu_correction) / mu_correction) * (mu / (jnp.sqrt(nu) + eps))
                if decay and weight_decay:  # from the stepped weights, p + update
                    update = update - lr * weight_decay * (p + update)
                return update, mu.astype(mu_dtype or mu.dtype), nu
            step = (mu / mu_correction) / (jnp.sqrt(nu / nu_correction) + eps)
            if decay and weight_decay:
                step = step + weight_decay * p
            return -lr * step, mu.astype(mu_dtype or mu.dtype), nu

        out = jax.tree_util.tree_map(leaf, grads, state.mu, state.nu, params, mask(params))
        pick = lambda i: jax.tree_util.tree_map(lambda _, o: o[i], grads, out)
        return pick(0), ClippedAdamWState(count, pick(1), pick(2))

    return optax.GradientTransformation(init, update)
