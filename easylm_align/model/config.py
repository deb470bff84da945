"""LLaMA-family model configuration: the fields, their defaults, the named presets and validation.

A model family is a set of field values, never another copy of the decoder: Llama 3.x
(`rope_theta` 500000, Llama 3.1's `llama3` rotary scaling, tied embeddings), Qwen2/2.5
(`attention_bias`) and Mistral (`sliding_window`) are presets here; `model_type` only says which
Hugging Face class an export is (`easylm_align.conversion.families`). The fields are Hugging Face's
`LlamaConfig` names plus EasyLM's training fields (dropout, FCM, remat, scan) and this project's
attention backend choice (`easylm_align.model.attention`).
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from easylm_align.errors import ConfigError
from easylm_align.model import attention
from easylm_align.model.platform import target as target_platform

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
    # True: one scanned block over stacked weights; False: one block per layer (EasyLM's layout);
    # "auto": scanned, except when compiling for a TPU (`auto_scan_layers`), settled by get_llama_config.
    "scan_layers": False,
    "attention": "auto",            # easylm_align.attention.BACKENDS
    "attention_block_size": 64,     # query/key block of attention=blockwise, query block of chunked
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _llama(h, i, layers, heads, kv=None, max_pos=2048, eps=1e-6, **extra):
    return dict(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv or heads, max_position_embeddings=max_pos, rms_norm_eps=eps, **extra)


# The large presets rematerialise each block in the backward pass (EasyLM's remat_block) and scan
# their layers except on a TPU (`auto_scan_layers`): with 64-token attention blocks (the default) the
# seed's 7B command then needs 13.99 GiB per device instead of 83.6 on the CPU compiler's estimate,
# and the 8B's fits a v4-8 with 4.39 GiB to spare (docs/PERFORMANCE.md).
# Checkpoints load into either layer layout (`checkpoint.load_params`).
_LARGE = dict(scan_layers="auto", remat_policy="nothing_saveable")

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


def get_llama_config(name: str, update_json: str = "", overrides: Optional[dict] = None,
                     platform: Optional[str] = None) -> ConfigDict:
    """Resolves a named preset, then `--update_llama_config` JSON, then `--llama.FIELD` overrides;
    `scan_layers="auto"` becomes the layout for `platform` (default: the one being compiled for)."""
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
    if cfg["scan_layers"] == "auto":
        cfg["scan_layers"] = auto_scan_layers(platform or target_platform())
    return ConfigDict(cfg)


def auto_scan_layers(platform: str) -> bool:
    """What `scan_layers="auto"` is on `platform`: scanned, except on a TPU. With fp32 weights its
    compiler converts the whole stacked weight array to bf16 once for the scan's products and keeps
    that copy through the forward and backward loops (3.56 GiB a chip for the 8B on a v4-8), while
    unrolled blocks convert their own weights as they run. Elsewhere a scanned step compiles in a
    fraction of the time, and the CPU compiler's memory estimate of an unrolled one is not usable."""
    return platform != "tpu"


def _merge(cfg: dict, updates: dict, source: str) -> None:
    for key, value in updates.items():
        if key not in cfg:
            near = difflib.get_close_matches(key, list(cfg), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{source}: unknown LLaMA config field {key!r}{hint}")
        if key == "scan_layers":  # the one field with a choice besides its type's values
            if not (isinstance(value, bool) or value == "auto"):
                raise ConfigError(f'{source}: scan_layers must be true, false or "auto", got {value!r}')
            cfg[key] = value
        else:
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


def get_dtype(name: str, flag: str) -> Any:
    if name not in DTYPES:
        raise ConfigError(f"{flag}={name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
