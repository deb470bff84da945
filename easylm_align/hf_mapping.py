"""What `convert_to_hf` and `convert_from_hf` share: tensor names, config fields, staged output.

Three Hugging Face families share one decoder and one tensor layout, and differ only in config
fields (`model.LLAMA_PRESETS`): `LlamaForCausalLM` (LLaMA-1/2/3.x: rope_theta, Llama 3.1's
`llama3` or `linear` rope scaling, tied embeddings), `Qwen2ForCausalLM` (Qwen2/2.5: biases on
q/k/v, our `attention_bias`) and `MistralForCausalLM` (v0.1's `sliding_window`). Our config field
`model_type` says which class an export is.

Tensor mapping, our unscanned parameter path ↔ Hugging Face state-dict name
(`T`: the HF `nn.Linear.weight` is the transpose of our `(in, out)` kernel):

    embed_tokens/embedding                  model.embed_tokens.weight
    layers_{i}/attention_norm/scale         model.layers.{i}.input_layernorm.weight
    layers_{i}/attention/wq/kernel       T  model.layers.{i}.self_attn.q_proj.weight
    layers_{i}/attention/wk/kernel       T  model.layers.{i}.self_attn.k_proj.weight
    layers_{i}/attention/wv/kernel       T  model.layers.{i}.self_attn.v_proj.weight
    layers_{i}/attention/wo/kernel       T  model.layers.{i}.self_attn.o_proj.weight
    layers_{i}/attention/w{q,k,v}/bias      model.layers.{i}.self_attn.{q,k,v}_proj.bias  (attention_bias)
    layers_{i}/ffn_norm/scale               model.layers.{i}.post_attention_layernorm.weight
    layers_{i}/feed_forward/w1/kernel    T  model.layers.{i}.mlp.gate_proj.weight
    layers_{i}/feed_forward/w3/kernel    T  model.layers.{i}.mlp.up_proj.weight
    layers_{i}/feed_forward/w2/kernel    T  model.layers.{i}.mlp.down_proj.weight
    norm/scale                              model.norm.weight
    lm_head/kernel                       T  lm_head.weight   (neither side has it when tied)

Rotary embedding: both sides use the half-split layout (dimension j pairs with j + head_dim/2,
Hugging Face's `rotate_half`), so q/k kernels are a plain transpose with no head permutation.
In the scanned layout `layers_{i}/X` is row i of `layers/X` (as `model.unstack_layers`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import jax
import ml_dtypes
import numpy as np
from absl import flags
from absl import logging as absl_logging
from ml_collections import ConfigDict

from easylm_align import model
from easylm_align.errors import UserError
from easylm_align.tree_paths import path_str

DTYPES: dict[str, Any] = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# (our path under layers_{i}, HF name under model.layers.{i}, transposed)
_LAYER_TENSORS = (
    ("attention_norm/scale", "input_layernorm.weight", False),
    ("attention/wq/kernel", "self_attn.q_proj.weight", True),
    ("attention/wk/kernel", "self_attn.k_proj.weight", True),
    ("attention/wv/kernel", "self_attn.v_proj.weight", True),
    ("attention/wo/kernel", "self_attn.o_proj.weight", True),
    ("ffn_norm/scale", "post_attention_layernorm.weight", False),
    ("feed_forward/w1/kernel", "mlp.gate_proj.weight", True),
    ("feed_forward/w3/kernel", "mlp.up_proj.weight", True),
    ("feed_forward/w2/kernel", "mlp.down_proj.weight", True),
)

_BIASES = (("attention/wq/bias", "self_attn.q_proj.bias"), ("attention/wk/bias", "self_attn.k_proj.bias"),
           ("attention/wv/bias", "self_attn.v_proj.bias"))

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


class ConversionError(UserError):
    """A problem with the user's input; the tools print it as one line and exit."""


class TensorSpec(NamedTuple):
    ours: str               # path in the unscanned tree, e.g. 'layers_3/attention/wq/kernel'
    hf: str                 # HF state-dict name
    transpose: bool
    layer: Optional[int]    # decoder layer index, None for embeddings / final norm / head

    @property
    def scanned_path(self) -> str:
        """The path of the array holding this tensor in the scanned layout."""
        return self.ours if self.layer is None else "layers/" + self.ours.split("/", 1)[1]


def tensor_specs(config: ConfigDict) -> list[TensorSpec]:
    """Every tensor of the model, in Hugging Face's order."""
    specs = [TensorSpec("embed_tokens/embedding", "model.embed_tokens.weight", False, None)]
    for i in range(config.num_hidden_layers):
        specs += [TensorSpec(f"layers_{i}/{ours}", f"model.layers.{i}.{hf}", t, i) for ours, hf, t in _LAYER_TENSORS]
        if config.attention_bias:
            specs += [TensorSpec(f"layers_{i}/{ours}", f"model.layers.{i}.{hf}", False, i) for ours, hf in _BIASES]
    specs.append(TensorSpec("norm/scale", "model.norm.weight", False, None))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head/kernel", "lm_head.weight", True, None))
    return specs


def expected_shapes(config: ConfigDict) -> dict[str, tuple[int, ...]]:
    """Unscanned parameter shapes, traced from the model itself (nothing is allocated)."""
    return _traced_shapes(json.dumps(dict(config.to_dict(), scan_layers=False), sort_keys=True))


@functools.lru_cache(maxsize=8)
def _traced_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    flax_model = model.build_model(ConfigDict(json.loads(config_json)))
    tree = jax.eval_shape(lambda: model.init_params(flax_model, jax.random.PRNGKey(0)))
    return {path_str(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_stored_shapes(stored: dict[str, tuple[int, ...]], config: ConfigDict, source: str) -> bool:
    """Compares a checkpoint's array shapes with `config`, in either layout; returns whether it is scanned."""
    scanned = any(p.startswith("layers/") for p in stored)
    shapes = expected_shapes(config)
    want: dict[str, tuple[int, ...]] = {}
    for spec in tensor_specs(config):
        shape = shapes[spec.ours]
        if scanned and spec.layer is not None:
            want[spec.scanned_path] = (config.num_hidden_layers, *shape)
        else:
            want[spec.ours] = shape
    problems = [f"{p} is {stored[p]}, config wants {want[p]}" for p in want if p in stored and stored[p] != want[p]]
    problems += [f"{p} missing" for p in want if p not in stored]
    problems += [f"{p} unexpected" for p in stored if p not in want]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ConversionError(f"checkpoint does not match {source}: {shown}")
    return scanned


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def quiet_orbax_logs() -> None:
    """Warnings only, unless --verbosity is given: Orbax logs every array it reads or writes at INFO."""
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def _check_output(dest: Path, overwrite: bool) -> None:
    """Refuses to replace a non-empty output unless asked; checked before any work is done."""
    if dest.exists() and not overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise ConversionError(f"output {dest} exists and is not empty; pass --overwrite to replace it")
    if not dest.absolute().parent.is_dir():
        raise ConversionError(f"the parent directory of output {dest} does not exist")


@contextlib.contextmanager
def staged_output(dest: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a fresh sibling path to write into (not yet created); renamed to `dest` on success.

    A failure (or a kill) leaves no directory named `dest` that looks complete: the partial work
    sits under a hidden `.NAME.partial-*` sibling, removed on a clean failure.
    """
    dest = dest.absolute()
    _check_output(dest, overwrite)
    tag = uuid.uuid4().hex[:8]
    stage = dest.parent / f".{dest.name}.partial-{tag}"
    try:
        yield stage
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{tag}"
            os.replace(dest, old)
            os.replace(stage, dest)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(stage, dest)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
