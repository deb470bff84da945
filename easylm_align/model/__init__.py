"""The LLaMA-family decoder, its configuration and its compute kernels.

* `config`: the fields, presets (`--load_llama_config`) and their validation; families are presets.
* `layers`: RMSNorm, rotary embedding, the SwiGLU MLP; `linear` and `swiglu` are their
  hand-written backward passes.
* `attention`: the attention backends (`--llama.attention`), one interface, each tested equal to
  the plain einsum path.
* `llama`: the decoder (`LlamaForCausalLM`) and the helpers around its parameters.
* `kernels`: the CPU kernels in C++ (`kernels/*.cc`), built on first use by `kernels.native`.
* `memory`: what a compiled step needs per device (`--dry_run`).

What the rest of the project uses is re-exported here, so `from easylm_align import model` and
`model.build_model(...)` read as before the package existed.
"""

from easylm_align.model.config import (DTYPES, LLAMA_PRESETS, MODEL_TYPES, ROPE_SCALING_TYPES,
                                       default_llama_overrides, get_dtype, get_llama_config, head_dim)
from easylm_align.model.layers import Rope, apply_rotary, inverse_frequencies, rotary_cos_sin
from easylm_align.model.llama import (RESIDUAL_AXES, KVCache, LlamaForCausalLM, LlamaOutput, build_model,
                                      flops_per_token, forgetful_mask, init_params, lm_head_kernel,
                                      matmul_param_count, param_count, run_options, stack_layers, unstack_layers)

__all__ = ["DTYPES", "LLAMA_PRESETS", "MODEL_TYPES", "ROPE_SCALING_TYPES", "default_llama_overrides", "get_dtype",
           "get_llama_config", "head_dim", "Rope", "apply_rotary", "inverse_frequencies", "rotary_cos_sin",
           "RESIDUAL_AXES", "KVCache", "LlamaForCausalLM", "LlamaOutput", "build_model", "flops_per_token",
           "forgetful_mask", "init_params", "lm_head_kernel", "matmul_param_count", "param_count", "run_options",
           "stack_layers", "unstack_layers"]
