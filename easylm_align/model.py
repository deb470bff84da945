"""The LLaMA decoder in Flax linen.

LLaMA-1/2 (Touvron et al., 2023): RMSNorm, rotary position embedding, multi-head or grouped-query
attention, SwiGLU MLP, untied (or optionally tied) LM head. Today's LLaMA-family checkpoints are
the same decoder with other config fields, never another copy of it: Llama 3.x (rope_theta 500000,
Llama 3.1's `llama3` rotary scaling, tied embeddings), Qwen2/2.5 (`attention_bias`: q/k/v biases)
and Mistral (`sliding_window`); `model_type` only says which Hugging Face class an export is.
On top of that, what the recipes need:

* segment ids, so examples packed into one row do not attend to each other;
* forgetful causal masking (FCM, Liu et al., 2022), used by COMMIT's training runs;
* the hidden states of every layer, which AFP's poolers read, and a pass through only the first
  blocks (`num_layers`), for a pooler that reads no further;
* a functional KV cache for batched greedy decoding in evaluation.

The parameter layout and the rotary layout are documented in docs/DESIGN.md. The model never
mentions devices: sharding is applied from outside by `easylm_align.sharding`.
"""

from __future__ import annotations

import difflib
import functools
import json
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from easylm_align import attention
from easylm_align.errors import ConfigError
from easylm_align.linear import linear
from easylm_align.swiglu import swiglu

DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16,
          "bfloat16": jnp.bfloat16, "fp16": jnp.float16, "float16": jnp.float16}

_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    # Rotary frequency scaling (Hugging Face's `rope_scaling`): "none", "linear" (every frequency
    # divided by the factor) or "llama3" (Llama 3.1: low frequencies divided by the factor, high ones
    # kept, a smooth ramp between, set by the two frequency factors and the original context).
    "rope_scaling_type": "none",
    "rope_scaling_factor": 1.0,
    "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0,
    "rope_original_max_position_embeddings": 8192,
    "attention_bias": False,        # biases on the q, k and v projections (Qwen2), none on the output
    "sliding_window": 0,            # a query sees at most this many keys, itself included (Mistral); 0: all
    "model_type": "llama",          # the Hugging Face family it exports as: llama, qwen2 or mistral
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "fcm_min_ratio": 0.0,
    "fcm_max_ratio": 0.0,
    "remat_policy": "none",
    "scan_layers": False,
    "attention": "auto",            # easylm_align.attention.BACKENDS
    "attention_block_size": 64,     # query/key block of attention=blockwise, query block of chunked
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _llama(h, i, layers, heads, kv=None, max_pos=2048, eps=1e-6, **extra):
    return dict(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv or heads, max_position_embeddings=max_pos, rms_norm_eps=eps, **extra)


# The large presets scan their layers and rematerialise each block in the backward pass (as EasyLM's
# remat_block and MaxText do): with 64-token attention blocks (the default) the seed's 7B command
# then needs 13.99 GiB per device instead of 83.6 (docs/PERFORMANCE.md).
# Checkpoints load into either layer layout (`checkpoint.load_params`).
_LARGE = dict(scan_layers=True, remat_policy="nothing_saveable")

# Today's LLaMA-family checkpoints differ from LLaMA-2 only in these fields (families are configs).
_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling_type="llama3", rope_scaling_factor=8.0,
                    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192,
                    vocab_size=128256, bos_token_id=128000, eos_token_id=128001)
_LLAMA3_2_ROPE = dict(_LLAMA3_ROPE, rope_scaling_factor=32.0)
_QWEN2 = dict(model_type="qwen2", rope_theta=1000000.0, attention_bias=True, vocab_size=151936, bos_token_id=151643,
              eos_token_id=151643)

# Named configurations for --load_llama_config. LLaMA-1 sizes and `debug` are EasyLM's (`debug`:
# 2 layers with LLaMA's 32,000-token vocabulary, for smoke tests with a real LLaMA tokenizer);
# `demo` is the trainer's default, sized to the demo tokenizer shipped in the package (4,096 pieces).
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "debug": _llama(128, 256, 2, 4),
    "demo": _llama(128, 352, 2, 4, kv=2, max_pos=1024, vocab_size=4096),
    "1b": _llama(2048, 5504, 22, 16, **_LARGE),
    "3b": _llama(3200, 8640, 26, 32, **_LARGE),
    "7b": _llama(4096, 11008, 32, 32, **_LARGE),
    "13b": _llama(5120, 13824, 40, 40, **_LARGE),
    "30b": _llama(6656, 17920, 60, 52, **_LARGE),
    "65b": _llama(8192, 22016, 80, 64, **_LARGE),
    "llama2_7b": _llama(4096, 11008, 32, 32, max_pos=4096, eps=1e-5, **_LARGE),
    "llama2_13b": _llama(5120, 13824, 40, 40, max_pos=4096, eps=1e-5, **_LARGE),
    "llama2_70b": _llama(8192, 28672, 80, 64, kv=8, max_pos=4096, eps=1e-5, **_LARGE),
    "llama3_1_8b": _llama(4096, 14336, 32, 32, kv=8, max_pos=131072, eps=1e-5, **_LLAMA3_ROPE, **_LARGE),
    "llama3_1_70b": _llama(8192, 28672, 80, 64, kv=8, max_pos=131072, eps=1e-5, **_LLAMA3_ROPE, **_LARGE),
    "llama3_2_1b": _llama(2048, 8192, 16, 32, kv=8, max_pos=131072, eps=1e-5, tie_word_embeddings=True,
                          **_LLAMA3_2_ROPE, **_LARGE),
    "llama3_2_3b": _llama(3072, 8192, 28, 24, kv=8, max_pos=131072, eps=1e-5, tie_word_embeddings=True,
                          **_LLAMA3_2_ROPE, **_LARGE),
    "qwen2_5_0_5b": _llama(896, 4864, 24, 14, kv=2, max_pos=32768, tie_word_embeddings=True, **_QWEN2, **_LARGE),
    "qwen2_5_1_5b": _llama(1536, 8960, 28, 12, kv=2, max_pos=32768, tie_word_embeddings=True, **_QWEN2, **_LARGE),
    "qwen2_5_7b": _llama(3584, 18944, 28, 28, kv=4, max_pos=32768, **dict(_QWEN2, vocab_size=152064), **_LARGE),
    "mistral_7b_v0_3": _llama(4096, 14336, 32, 32, kv=8, max_pos=32768, eps=1e-5, rope_theta=1000000.0,
                              vocab_size=32768, model_type="mistral", **_LARGE),
    # A LLaMA of facebook/xglm-564m's sizes (AFP's own model; XGLM itself is not a LLaMA): its
    # 256,008-token vocabulary, tied to the LM head, is a third of the parameters.
    "xglm_564m_sized": _llama(1024, 4096, 24, 16, vocab_size=256008, tie_word_embeddings=True, **_LARGE),
}


def default_llama_overrides() -> ConfigDict:
    """The `--llama.FIELD=value` flag group: every field unset (None) unless given on the command line."""
    return ConfigDict({key: placeholder(type(value)) for key, value in _DEFAULTS.items()})


def get_llama_config(name: str, update_json: str = "", overrides: Optional[dict] = None) -> ConfigDict:
    """Resolves a named preset, then `--update_llama_config` JSON, then `--llama.FIELD` overrides."""
    if name not in LLAMA_PRESETS:
        raise ConfigError(f"--load_llama_config={name!r} is not a known config; "
                         f"choose one of {sorted(LLAMA_PRESETS)}")
    cfg = dict(_DEFAULTS, **LLAMA_PRESETS[name])
    if update_json:
        try:
            updates = json.loads(update_json)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"--update_llama_config is not valid JSON ({e}): {update_json[:200]!r}") from None
        if not isinstance(updates, dict):
            raise ConfigError(f"--update_llama_config must be a JSON object, got {update_json!r}")
        _merge(cfg, updates, "--update_llama_config")
    _merge(cfg, {k: v for k, v in (overrides or {}).items() if v is not None}, "--llama")
    try:
        _validate(cfg)
    except ValueError as e:  # name the flags that made the config
        raise ConfigError(f"--load_llama_config={name!r} with --update_llama_config / --llama.*: {e}") from None
    return ConfigDict(cfg)


def _merge(cfg: dict, updates: dict, source: str) -> None:
    for key, value in updates.items():
        if key not in cfg:
            near = difflib.get_close_matches(key, list(cfg), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{source}: unknown LLaMA config field {key!r}{hint}")
        cfg[key] = _typed(value, type(cfg[key]), f"{source}: {key}")


def _typed(value: Any, kind: type, name: str) -> Any:
    """`value` as the field's type; a value of another JSON type is an error, not a silent conversion."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    if kind is float and not np.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return value


def _validate(cfg: dict) -> None:
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be positive")
    for key in ("rms_norm_eps", "rope_theta"):
        if cfg[key] <= 0:
            raise ConfigError(f"{key}={cfg[key]} must be positive")
    for key in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
        if not 0.0 <= cfg[key] < 1.0:
            raise ConfigError(f"{key}={cfg[key]} must be in [0, 1)")
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if cfg["hidden_size"] % heads:
        raise ConfigError(f"hidden_size={cfg['hidden_size']} is not divisible by num_attention_heads={heads}")
    if heads % kv:
        raise ConfigError(f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv}")
    if (cfg["hidden_size"] // heads) % 2:
        raise ConfigError("head_dim (hidden_size / num_attention_heads) must be even for rotary embedding")
    if not 0.0 <= cfg["fcm_min_ratio"] <= cfg["fcm_max_ratio"] <= 1.0:
        raise ConfigError("need 0 <= fcm_min_ratio <= fcm_max_ratio <= 1")
    if cfg["remat_policy"] != "none" and not hasattr(jax.checkpoint_policies, cfg["remat_policy"]):
        raise ConfigError(f"remat_policy={cfg['remat_policy']!r}: use 'none' or a jax.checkpoint_policies name")
    if cfg["attention"] not in attention.BACKENDS:
        raise ConfigError(f"attention={cfg['attention']!r}: use one of {', '.join(attention.BACKENDS)}")
    if cfg["attention_block_size"] < 1:
        raise ConfigError("attention_block_size must be >= 1")
    if cfg["rope_scaling_type"] not in ROPE_SCALING_TYPES:
        raise ConfigError(f"rope_scaling_type={cfg['rope_scaling_type']!r}: use one of {', '.join(ROPE_SCALING_TYPES)}")
    if cfg["rope_scaling_type"] != "none" and cfg["rope_scaling_factor"] <= 0:
        raise ConfigError(f"rope_scaling_factor={cfg['rope_scaling_factor']} must be positive")
    if cfg["rope_scaling_type"] == "llama3" and not (
            0 < cfg["rope_low_freq_factor"] < cfg["rope_high_freq_factor"] and cfg["rope_original_max_position_embeddings"] > 0):
        raise ConfigError("rope_scaling_type=llama3 needs 0 < rope_low_freq_factor < rope_high_freq_factor "
                          "and a positive rope_original_max_position_embeddings")
    if cfg["model_type"] not in MODEL_TYPES:
        raise ConfigError(f"model_type={cfg['model_type']!r}: use one of {', '.join(MODEL_TYPES)}")
    if cfg["sliding_window"] < 0:
        raise ConfigError(f"sliding_window={cfg['sliding_window']} must be >= 0 (0: no window)")


ROPE_SCALING_TYPES = ("none", "linear", "llama3")
MODEL_TYPES = ("llama", "qwen2", "mistral")


def head_dim(config: ConfigDict) -> int:
    return config.hidden_size // config.num_attention_heads


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)  # the statistic is always taken in fp32
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


class Rope(NamedTuple):
    """What fixes the rotary frequencies (hashable, so the tables are cached per model)."""
    theta: float
    scaling: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    @classmethod
    def of(cls, config: ConfigDict) -> "Rope":
        return cls(float(config.rope_theta), config.rope_scaling_type, float(config.rope_scaling_factor),
                   float(config.rope_low_freq_factor), float(config.rope_high_freq_factor),
                   int(config.rope_original_max_position_embeddings))


def inverse_frequencies(rope: Rope, dim: int) -> np.ndarray:
    """fp32 inverse frequencies of the dim/2 rotary pairs, scaled as `rope.scaling` says.

    llama3 (Meta's `apply_scaling` of Llama 3.1): a pair whose wavelength exceeds
    original/low_freq_factor is slowed by `factor`, one shorter than original/high_freq_factor is
    kept, and in between the two are mixed with weight s = (original/wavelength - low)/(high - low).
    """
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    if rope.scaling == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.scaling == "llama3":
        wavelength = np.float32(2 * np.pi) / inv_freq
        low_wavelength = rope.original_max_positions / rope.low_freq_factor
        high_wavelength = rope.original_max_positions / rope.high_freq_factor
        slowed = np.where(wavelength > low_wavelength, inv_freq / np.float32(rope.factor), inv_freq)
        s = (rope.original_max_positions / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        mixed = (1 - s) * slowed / np.float32(rope.factor) + s * slowed
        medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
        return np.where(medium, mixed, slowed).astype(np.float32)
    return inv_freq


def rotary_cos_sin(positions: jnp.ndarray, dim: int, rope: Rope | float,
                   table_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin of shape positions.shape + (dim,), half-split layout, for positions in [0, table_size).

    Looked up in tables made once, in NumPy, when the model is traced: computed in the graph,
    XLA fuses cos and sin into every consumer of the rotated q and k (each key slice of
    `chunked` attention, the transposes of the backward pass) and so recomputes them per
    element, a tenth of the CPU train step (docs/PERFORMANCE.md). A position outside the table
    gives NaN (gather's fill value), so a mistake surfaces as a non-finite loss.
    """
    rope = rope if isinstance(rope, Rope) else Rope(float(rope))
    cos, sin = _rotary_tables(table_size, dim, rope)
    return jnp.take(cos, positions, axis=0), jnp.take(sin, positions, axis=0)


@functools.lru_cache(maxsize=8)
def _rotary_tables(size: int, dim: int, rope: Rope) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = inverse_frequencies(rope, dim)
    freqs = np.arange(size, dtype=np.float32)[:, None] * inv_freq  # the fp32 angles the graph computed
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x of shape (batch, seq, heads, head_dim); dimension j pairs with j + head_dim/2."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class KVCache(NamedTuple):
    """Decoding cache for all layers. `segment_ids` marks filled key slots (0 = empty or padding)."""
    keys: jnp.ndarray          # (layers, batch, max_len, kv_heads, head_dim)
    values: jnp.ndarray        # (layers, batch, max_len, kv_heads, head_dim)
    segment_ids: jnp.ndarray   # (batch, max_len)
    index: jnp.ndarray         # () next slot to write

    @classmethod
    def empty(cls, config: ConfigDict, batch: int, max_len: int, dtype: Any = jnp.float32) -> "KVCache":
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, head_dim(config))
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


class Attention(nn.Module):
    config: ConfigDict
    deterministic: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, mask: attention.MaskInfo, layer_cache=None, cache_index=None):
        cfg = self.config
        hd, heads, kv = head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
        # nn.Dense's parameters ({name}/kernel, {name}/bias) and arithmetic, with linear.py's weight gradient
        def project(inputs, n, name, bias=False):
            if not bias:
                return linear(inputs.astype(self.dtype), kernel(self, (inputs.shape[-1], n), name))
            w, b = Kernel((inputs.shape[-1], n), cfg.initializer_range, self.param_dtype, use_bias=True, name=name)()
            return linear(inputs.astype(self.dtype), w.astype(self.dtype)) + b.astype(self.dtype)

        batch, seq = x.shape[:2]
        bias = cfg.attention_bias
        q = apply_rotary(project(x, heads * hd, "wq", bias).reshape(batch, seq, heads, hd), cos, sin)
        k = apply_rotary(project(x, kv * hd, "wk", bias).reshape(batch, seq, kv, hd), cos, sin)
        v = project(x, kv * hd, "wv", bias).reshape(batch, seq, kv, hd)
        new_cache = None
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            new_cache = (k, v)
        dropout = not self.deterministic and cfg.attn_pdrop > 0
        backend = "einsum" if layer_cache is not None else attention.resolve(cfg.attention, run_options(
            cfg, self.deterministic, self.dtype, seq))
        out = attention.attend(q, k.astype(self.dtype), v.astype(self.dtype), mask, backend=backend,
                               dropout_rate=cfg.attn_pdrop, dropout_rng=self.make_rng("dropout") if dropout else None,
                               block_size=cfg.attention_block_size, window=cfg.sliding_window)
        return project(out.reshape(batch, seq, heads * hd), cfg.hidden_size, "wo"), new_cache


class Kernel(nn.Module):
    """A dense layer's weight (and with `use_bias` its bias), stored as `nn.Dense` stores them
    ({name}/kernel, {name}/bias), for layers that multiply by it themselves."""
    shape: tuple[int, int]
    init_std: float
    param_dtype: Any
    use_bias: bool = False

    @nn.compact
    def __call__(self):
        w = self.param("kernel", nn.initializers.normal(self.init_std), self.shape, self.param_dtype)
        if not self.use_bias:
            return w
        return w, self.param("bias", nn.initializers.zeros, self.shape[1:], self.param_dtype)


def kernel(module: nn.Module, shape: tuple[int, int], name: str) -> jnp.ndarray:
    """`module`'s bias-free weight `name`, created as `Kernel` and cast to the module's compute dtype."""
    return Kernel(shape, module.config.initializer_range, module.param_dtype, name=name)().astype(module.dtype)


class FeedForward(nn.Module):
    """SwiGLU, w2(silu(x·w1) ∘ (x·w3)), with the hand-written backward pass of `swiglu`."""
    config: ConfigDict
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h, i = cfg.hidden_size, cfg.intermediate_size
        return swiglu(x.astype(self.dtype), kernel(self, (h, i), "w1"), kernel(self, (h, i), "w3"),
                      kernel(self, (i, h), "w2"))


# Logical axes of the residual stream between blocks; easylm_align.sharding maps them to the mesh.
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")


class DecoderLayer(nn.Module):
    """One pre-norm block. Written as a scan body: (carry, per-layer input) -> (carry, per-layer output)."""
    config: ConfigDict
    deterministic: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h, cos, sin, mask, cache_index, layer_cache):
        cfg = self.config
        h = nn.with_logical_constraint(h, RESIDUAL_AXES)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        dropout = nn.Dropout(cfg.resid_pdrop)
        attn_out, new_cache = Attention(cfg, self.deterministic, self.dtype, self.param_dtype, name="attention")(
            norm("attention_norm")(h), cos, sin, mask, layer_cache, cache_index)
        h = h + dropout(attn_out, deterministic=self.deterministic)
        ff_out = FeedForward(cfg, self.dtype, self.param_dtype, name="feed_forward")(norm("ffn_norm")(h))
        h = nn.with_logical_constraint(h + dropout(ff_out, deterministic=self.deterministic), RESIDUAL_AXES)
        return h, (new_cache, h)


class LlamaOutput(NamedTuple):
    logits: Optional[jnp.ndarray]                     # (batch, seq, vocab), float32
    hidden_states: Optional[tuple[jnp.ndarray, ...]]  # num_layers + 1 entries, as Hugging Face's
    cache: Optional[KVCache]
    last_hidden_state: Optional[jnp.ndarray] = None   # (batch, seq, hidden) after the final norm


def run_options(cfg: ConfigDict, deterministic: bool, dtype: Any,
                seq_length: Optional[int] = None) -> attention.Options:
    """What attention must support in this call (dropout and FCM only act when training; a sliding
    window only when the sequence, if known, is longer than it)."""
    window = cfg.sliding_window > 0 and (seq_length is None or seq_length > cfg.sliding_window)
    return attention.Options(0.0 if deterministic else cfg.attn_pdrop,
                             not deterministic and cfg.fcm_max_ratio > 0, dtype, window)


def forgetful_mask(rng, segment_ids: jnp.ndarray, min_ratio: float, max_ratio: float) -> jnp.ndarray:
    """FCM key mask (batch, k): each row draws r ~ U[min, max] and hides that fraction of keys.

    The first key of every segment stays visible, so no query is left with nothing to attend to.
    """
    ratio_rng, key_rng = jax.random.split(rng)
    batch, seq = segment_ids.shape
    ratio = jax.random.uniform(ratio_rng, (batch, 1), minval=min_ratio, maxval=max_ratio)
    keep = jax.random.uniform(key_rng, (batch, seq)) >= ratio
    first = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return keep | first


class LlamaForCausalLM(nn.Module):
    config: ConfigDict
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
                 segment_ids: Optional[jnp.ndarray] = None, deterministic: bool = True,
                 cache: Optional[KVCache] = None, output_hidden_states: bool = False,
                 return_logits: bool = True, num_layers: Optional[int] = None) -> LlamaOutput:
        """`num_layers` < the model's runs only the first `num_layers` blocks (what a pooler reading
        early hidden states needs): the outputs are then only `hidden_states`, num_layers + 1 entries,
        none normed; what those blocks compute is what they compute in the whole model."""
        cfg = self.config
        depth = cfg.num_hidden_layers if num_layers is None else num_layers
        truncated = depth < cfg.num_hidden_layers
        if not 0 <= depth <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers={num_layers}: the model has {cfg.num_hidden_layers} layers")
        if truncated and (return_logits or cache is not None):
            raise ValueError("a truncated pass (num_layers < num_hidden_layers) has no logits and no cache")
        batch, seq = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(cfg.initializer_range), name="embed_tokens")
        # Rows are looked up in the parameters' dtype, then cast: nn.Embed's own call casts the whole
        # table first, which holds a compute-dtype copy of it and sums the lookup's gradient in that
        # dtype. Summed in fp32 as under PyTorch's autocast; 1.9 GiB less for AFP's 256k vocabulary.
        h = jnp.take(embed.embedding, input_ids, axis=0).astype(self.dtype)
        h = nn.Dropout(cfg.embd_pdrop)(h, deterministic=deterministic)
        # Positions count within a row (or the cache), so the tables need no more rows than that: a
        # table of max_position_embeddings rows would be 128 MiB of constants for Llama 3's 131,072.
        longest = seq if cache is None else max(seq, cache.segment_ids.shape[1])
        cos, sin = rotary_cos_sin(positions, head_dim(cfg), Rope.of(cfg), longest)

        q_slots = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        key_keep = None
        if not deterministic and cfg.fcm_max_ratio > 0:
            key_keep = forgetful_mask(self.make_rng("dropout"), segment_ids, cfg.fcm_min_ratio, cfg.fcm_max_ratio)
        if cache is None:
            mask = attention.MaskInfo(q_slots, q_slots, segment_ids, segment_ids, key_keep)
            cache_index, layer_caches = None, None
        else:
            cache_index = cache.index
            k_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache_index))
            k_slots = jnp.broadcast_to(jnp.arange(k_segments.shape[1], dtype=jnp.int32), k_segments.shape)
            mask = attention.MaskInfo(q_slots + cache_index, k_slots, segment_ids, k_segments)
            layer_caches = (cache.keys, cache.values)

        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(DecoderLayer, policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                                 prevent_cse=not cfg.scan_layers)
        layer_kwargs = dict(config=cfg, deterministic=deterministic, dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.scan_layers and depth:
            scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0), length=depth)
            if truncated:  # the scan reads the first `depth` slices of the stacked parameters, no more
                scanned = nn.map_variables(scanned, "params", trans_in_fn=functools.partial(_first_layers, depth))
            h_last, (new_layer_caches, per_layer) = scanned(**layer_kwargs, name="layers")(
                h, cos, sin, mask, cache_index, layer_caches)
            layer_outputs = [per_layer[i] for i in range(depth)] if output_hidden_states else []
        else:
            layer_outputs, new_k, new_v = [], [], []
            h_last = h
            for i in range(depth):
                layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
                h_last, (layer_new_cache, _) = layer_cls(**layer_kwargs, name=f"layers_{i}")(
                    h_last, cos, sin, mask, cache_index, layer_cache)
                layer_outputs.append(h_last)
                if layer_new_cache is not None:
                    new_k.append(layer_new_cache[0])
                    new_v.append(layer_new_cache[1])
            new_layer_caches = (jnp.stack(new_k), jnp.stack(new_v)) if cache is not None else None
        if truncated:  # the final norm and the head come after the last block
            return LlamaOutput(None, (h, *layer_outputs) if output_hidden_states else None, None)

        h_final = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(h_last)
        logits = None
        if return_logits:
            if cfg.tie_word_embeddings:
                logits = embed.attend(h_final)
            else:
                logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=nn.initializers.normal(cfg.initializer_range), name="lm_head")(h_final)
            logits = logits.astype(jnp.float32)
        hidden_states = None
        if output_hidden_states:  # Hugging Face convention: embeddings, then each layer, the last one normed
            hidden_states = (h, *layer_outputs[:-1], h_final)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_layer_caches[0], new_layer_caches[1], k_segments, cache.index + seq)
        return LlamaOutput(logits, hidden_states, new_cache, h_final)


def _first_layers(depth: int, variables: dict) -> dict:
    """The stacked `layers` variables cut to their first `depth` layers."""
    return jax.tree_util.tree_map(lambda x: x[:depth], variables)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def build_model(config: ConfigDict, dtype: str = "fp32", param_dtype: str = "fp32") -> LlamaForCausalLM:
    return LlamaForCausalLM(config, dtype=get_dtype(dtype, "--dtype"), param_dtype=get_dtype(param_dtype, "--param_dtype"))


def get_dtype(name: str, flag: str) -> Any:
    if name not in DTYPES:
        raise ConfigError(f"{flag}={name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def init_params(model: LlamaForCausalLM, rng: jax.Array) -> dict:
    dummy = jnp.zeros((1, 8), jnp.int32)
    return model.init({"params": rng}, dummy)["params"]


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned layout (`layers` with a leading layer axis) → `layers_{i}` subtrees. No-op if unscanned."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
    return out


def stack_layers(params: dict, num_layers: int) -> dict:
    """`layers_{i}` subtrees → the scanned layout. No-op if already scanned."""
    if "layers" in params:
        return params
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)])
    return out


def lm_head_kernel(params: dict, config: ConfigDict) -> jnp.ndarray:
    """The (hidden, vocab) output projection: the LM head, or the embedding when they are tied."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def matmul_param_count(config: ConfigDict) -> int:
    """The weights each token multiplies (N of the FLOP count): per layer the q/k/v/o projections
    hidden·d·(2·H + 2·KV) and the SwiGLU MLP 3·hidden·intermediate, plus the LM head hidden·vocab
    (tied or not). The embedding is a lookup and the norms are elementwise, so neither counts."""
    per_layer = (config.hidden_size * head_dim(config) * 2 * (config.num_attention_heads + config.num_key_value_heads)
                 + 3 * config.hidden_size * config.intermediate_size)
    return config.num_hidden_layers * per_layer + config.hidden_size * config.vocab_size


def flops_per_token(config: ConfigDict, seq_length: int) -> float:
    """Model FLOPs per trained token: 6·N + 6·L·H·d·T (forward + backward, no rematerialisation).

    A multiply-add is 2 FLOPs and the backward pass costs twice the forward, hence 6 per weight of
    N = `matmul_param_count`. Attention: per layer, q·kᵀ and the weighted sum of v each take H·d
    multiply-adds per visible key, and under the causal mask a token sees T/2 keys on average, so
    2·(2·H·d·T/2) = 2·H·d·T forward FLOPs per layer, 6·H·d·T with the backward pass.
    """
    causal_attention = config.num_hidden_layers * config.num_attention_heads * head_dim(config) * seq_length
    return 6.0 * matmul_param_count(config) + 6.0 * causal_attention
