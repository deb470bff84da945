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

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from easylm_align.model import attention
from easylm_align.model.config import get_dtype, head_dim
from easylm_align.model.layers import FeedForward, Kernel, RMSNorm, Rope, apply_rotary, kernel, rotary_cos_sin
from easylm_align.model.linear import linear


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
                             not deterministic and cfg.fcm_max_ratio > 0, dtype, window, seq_length)


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


def build_model(config: ConfigDict, dtype: str = "fp32", param_dtype: str = "fp32") -> LlamaForCausalLM:
    return LlamaForCausalLM(config, dtype=get_dtype(dtype, "--dtype"), param_dtype=get_dtype(param_dtype, "--param_dtype"))


def init_params(model: LlamaForCausalLM, rng: jax.Array) -> dict:
    dummy = jnp.zeros((1, attention.SPLASH_MULTIPLE), jnp.int32)  # a length splash accepts too
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
