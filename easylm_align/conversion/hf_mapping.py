"""How our parameter tree maps to a Hugging Face state dict, for every supported family.

The three Hugging Face families (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`)
share one tensor layout; Qwen2 adds the q/k/v biases (our `attention_bias`). How their configs
differ is in `easylm_align.conversion.families`.

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

import functools
import json
from typing import Any, NamedTuple, Optional

import jax
import ml_dtypes
import numpy as np
from ml_collections import ConfigDict

from easylm_align import model
from easylm_align.conversion import ConversionError
from easylm_align.tree_paths import path_str

DTYPES: dict[str, Any] = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}

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
