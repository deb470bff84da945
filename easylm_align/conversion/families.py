"""The Hugging Face config of each supported family, to and from our config fields.

`LlamaForCausalLM` (LLaMA-1/2/3.x), `Qwen2ForCausalLM` (Qwen2/2.5) and `MistralForCausalLM` share one
decoder (`easylm_align.model`); what tells them apart is here: the class an export names, the
defaults each class's config.json leaves out, the fields only one class writes, and what a
checkpoint may ask for that our decoder cannot run (refused by the field's name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ml_collections import ConfigDict

from easylm_align import model
from easylm_align.conversion import ConversionError

TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# The config fields a Hugging Face config.json carries: they define the exported model.
HF_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling_type",
             "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
             "rope_original_max_position_embeddings", "attention_bias", "sliding_window",
             "tie_word_embeddings", "bos_token_id", "eos_token_id")
# model_type → the transformers class an export is.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# The fields that fix the shapes of one decoder layer: what makes a preset "match" an HF model.
_LAYER_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads")
# transformers.LlamaConfig's defaults, for keys a config.json leaves out (Qwen2Config's and
# MistralConfig's differ in a few, below).
_HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                    rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
_FAMILY_DEFAULTS = {
    "llama": {},
    "qwen2": dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768, bos_token_id=None,
                  eos_token_id=None),
    "mistral": dict(intermediate_size=14336, max_position_embeddings=4096 * 32, rms_norm_eps=1e-6),
}
# Fields of checkpoints our decoder cannot run, by the config key that asks for them.
_UNSUPPORTED_KEYS = {
    "num_local_experts": "mixture of experts", "num_experts": "mixture of experts",
    "n_routed_experts": "mixture of experts", "moe_intermediate_size": "mixture of experts",
    "use_qk_norm": "q/k norms", "qk_layernorm": "q/k norms",
}


def _rope_scaling(config: ConfigDict) -> Optional[dict]:
    if config.rope_scaling_type == "none":
        return None
    scaling = {"rope_type": config.rope_scaling_type,
               "factor": config.rope_scaling_factor}
    if config.rope_scaling_type == "llama3":
        scaling.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                       original_max_position_embeddings=config.rope_original_max_position_embeddings)
    return scaling


def _family_fields(config: ConfigDict) -> dict:
    """What each class's config.json adds; refuses a config the class cannot express."""
    kind = config.model_type
    if config.attention_bias != (kind == "qwen2"):
        raise ConversionError(f"model_type={kind!r} {'needs' if kind == 'qwen2' else 'has no'} q/k/v biases "
                              f"(attention_bias={config.attention_bias}); set model_type to match")
    if config.sliding_window and kind != "mistral":
        raise ConversionError(f"model_type={kind!r} has no sliding window (sliding_window={config.sliding_window}); "
                              "use model_type='mistral'")
    if kind == "llama":
        return {"head_dim": model.head_dim(config), "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    if kind == "qwen2":
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.num_hidden_layers}
    return {"head_dim": model.head_dim(config), "sliding_window": config.sliding_window or None}


def hf_config(config: ConfigDict, dtype: str, pad_token_id: int) -> dict:
    """config.json for the family's class, readable by transformers 4.x and 5.x alike."""
    return {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": _rope_scaling(config),
        "attention_dropout": 0.0,
        **_family_fields(config),
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
        "use_cache": True,
    }


def read_hf_config(hf_dir: Path) -> dict:
    """config.json of a Hugging Face LLaMA-family directory, or a ConversionError saying why it is not one."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} is not a Hugging Face model directory: it has no config.json")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    if hf.get("model_type") not in ARCHITECTURES:
        raise ConversionError(f"{hf_dir} holds a {hf.get('model_type')!r} model; supported model_type values: "
                              f"{', '.join(ARCHITECTURES)}")
    return hf


def _rope_fields(rope: dict) -> tuple[dict, Optional[str]]:
    """Our rope_scaling_* fields from HF's rope_scaling / rope_parameters, or the reason they are unsupported."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_scaling_type": "none"}, None
    if kind not in ("linear", "llama3"):
        return {}, f"rope_scaling rope_type={kind!r}"
    fields = {"rope_scaling_type": kind, "rope_scaling_factor": float(rope.get("factor", 1.0))}
    if kind == "llama3":
        try:
            fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                          rope_high_freq_factor=float(rope["high_freq_factor"]),
                          rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        except KeyError as e:
            return {}, f"rope_scaling (llama3) without {e.args[0]}"
    return fields, None


def llama_fields_from_hf(hf: dict) -> dict:
    """Our config fields (HF_FIELDS) from an HF LLaMA, Qwen2 or Mistral config.json; refuses what our
    model lacks, naming the field that asks for it."""
    kind = hf.get("model_type", "llama")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5.x / 4.x
    rope_fields, rope_problem = _rope_fields(rope)
    window = hf.get("sliding_window") if kind == "mistral" else None
    unsupported = [
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r}"),
        (kind != "qwen2" and bool(hf.get("attention_bias")), "attention_bias (a bias on o_proj too)"),
        (bool(hf.get("mlp_bias")), "mlp_bias"),
        (rope_problem is not None, rope_problem),
        (kind == "qwen2" and bool(hf.get("use_sliding_window")), "use_sliding_window (Qwen2's per-layer window)"),
        (len(set(hf.get("layer_types") or ["full_attention"]) - {"full_attention", "sliding_attention"}) > 0
         or len(set(hf.get("layer_types") or [])) > 1, "layer_types (a mix of attention kinds)"),
    ]
    unsupported += [(bool(hf.get(key)), f"{key} ({what})") for key, what in _UNSUPPORTED_KEYS.items()]
    defaults = dict(_HF_DEFAULTS, **_FAMILY_DEFAULTS[kind])
    fields = {key: hf.get(key, default) for key, default in defaults.items()}
    fields["num_key_value_heads"] = hf.get("num_key_value_heads") or fields["num_attention_heads"]
    fields["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", _HF_DEFAULTS["rope_theta"])))
    fields.update(rope_fields, model_type=kind, attention_bias=kind == "qwen2", sliding_window=int(window or 0))
    head_dim = hf.get("head_dim")
    unsupported.append((head_dim is not None and head_dim * fields["num_attention_heads"] != fields["hidden_size"],
                        f"head_dim={head_dim} != hidden_size / num_attention_heads"))
    found = [name for bad, name in unsupported if bad]
    if found:
        raise ConversionError(f"this {kind} checkpoint needs what our model does not support: {', '.join(found)}")
    for key in ("bos_token_id", "eos_token_id"):
        value = fields[key]
        if isinstance(value, list):  # several stop ids: the first is the end-of-sequence token
            value = value[0] if value else None
        if value is None:  # keep our default rather than store a null id
            del fields[key]
        else:
            fields[key] = int(value)
    return fields


def suggest_flags(fields: dict) -> tuple[str, dict]:
    """The preset whose layer shapes match `fields` (fewest other differences), or 'debug', and the
    `--update_llama_config` fields that turn it into `fields`."""
    def differences(name: str) -> dict:
        base = model.get_llama_config(name)
        return {key: value for key, value in fields.items() if base[key] != value}

    matching = [name for name in model.LLAMA_PRESETS
                if not set(_LAYER_SHAPE_FIELDS) & set(differences(name))]
    name = min(matching, key=lambda n: len(differences(n)), default="debug")
    return name, differences(name)
