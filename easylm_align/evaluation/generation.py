"""Batched greedy decoding with the KV cache.

A batch of prompts is left-padded to a bucketed length, so every row's last prompt token sits in
the same slot and all rows then decode in lockstep, writing one cache slot per step. Padding slots
carry segment id 0, which no query attends to, and positions count from each row's first real
token, so a padded row attends to what it would alone, at the same positions.

One jitted function decodes a batch: a prefill call writes the cache for all prompt tokens but the
last (with no logits, which at prompt length would cost batch x length x vocab floats), then a
`lax.while_loop` feeds one token per step (starting with the last prompt token) until every row
has produced a stop token (a newline piece or EOS) or `max_new_tokens` tokens. jit retraces only
for a new (batch, bucket) shape; buckets are powers of two, so a whole evaluation compiles a
handful of times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from easylm_align.errors import ConfigError
from easylm_align.model import KVCache, LlamaForCausalLM
from easylm_align.sharding import BATCH_AXES, data_parallel_size
from easylm_align.tokenizer import Tokenizer

_NO_TOKEN = -1  # fills the output after a row has stopped


def newline_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids whose piece produces a newline (`Tokenizer.newline_ids`, for every tokenizer kind)."""
    return tokenizer.newline_ids()


def bucket_length(length: int, min_bucket: int, max_length: int) -> int:
    """The smallest power of two >= length (at least `min_bucket`), capped at `max_length`."""
    bucket = max(min_bucket, 1 << max(length - 1, 0).bit_length())
    return min(bucket, max_length)


@dataclass
class Generation:
    token_ids: list[list[int]]  # generated ids per row, up to and including the stop token
    texts: list[str]            # decoded without EOS; cut before the first newline when stopping there


class GreedyDecoder:
    """Greedy decoding for one model; reuse it so the compiled functions are reused.

    `params` are passed per call (they may be sharded on `mesh`); the decoder owns no weights.
    """

    def __init__(self, model: LlamaForCausalLM, tokenizer: Tokenizer, max_new_tokens: int = 32,
                 mesh: Optional[Mesh] = None, stop_at_newline: bool = True, min_bucket: int = 64):
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.max_new_tokens = max_new_tokens
        self.min_bucket = max(min_bucket, 2)  # the prefill takes all but one token of the bucket
        self.newline_ids = newline_token_ids(tokenizer) if stop_at_newline else []
        self.stop_ids = sorted(set(self.newline_ids) | ({tokenizer.eos_id} if tokenizer.eos_id >= 0 else set()))
        # Room for the prompt plus the generated tokens within the model's positions.
        self.max_prompt_length = model.config.max_position_embeddings - max_new_tokens
        if self.max_prompt_length < 2:
            raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt within "
                             f"max_position_embeddings={model.config.max_position_embeddings}")
        self.num_compilations = 0  # traces of the decode function, i.e. one per (batch, bucket)
        self._decode = jax.jit(self._decode_batch)

    # -- device side ---------------------------------------------------------------------------

    def _cache_sharding(self, batch: int) -> Optional[KVCache]:
        if self.mesh is None:
            return None
        cfg = self.model.config
        batch_axes = BATCH_AXES if batch % data_parallel_size(self.mesh) == 0 else None
        heads_axis = "mp" if cfg.num_key_value_heads % self.mesh.shape["mp"] == 0 else None
        kv = NamedSharding(self.mesh, P(None, batch_axes, None, heads_axis, None))
        return KVCache(kv, kv, NamedSharding(self.mesh, P(batch_axes, None)), NamedSharding(self.mesh, P()))

    def _decode_batch(self, params: Any, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                      active: jax.Array) -> jax.Array:
        self.num_compilations += 1
        batch, prompt_len = tokens.shape
        cache = KVCache.empty(self.model.config, batch, prompt_len + self.max_new_tokens, self.model.dtype)
        sharding = self._cache_sharding(batch)
        if sharding is not None:
            cache = jax.lax.with_sharding_constraint(cache, sharding)

        def apply(*args, **kwargs):
            return self.model.apply({"params": params}, *args, **kwargs)

        # Prefill all but the last prompt token: only the cache is needed from it.
        cache = apply(tokens[:, :-1], positions=positions[:, :-1], segment_ids=segment_ids[:, :-1],
                      cache=cache, return_logits=False).cache
        stop_ids = jnp.asarray(self.stop_ids, jnp.int32)
        ones = jnp.ones((batch, 1), jnp.int32)

        def cond(state):
            step, _, _, _, _, done = state
            return (step < self.max_new_tokens) & ~jnp.all(done)

        def body(state):
            step, token, position, cache, out, done = state
            result = apply(token[:, None], positions=position[:, None], segment_ids=ones, cache=cache)
            nxt = jnp.argmax(result.logits[:, 0], axis=-1).astype(jnp.int32)
            out = out.at[:, step].set(jnp.where(done, _NO_TOKEN, nxt))
            done = done | jnp.isin(nxt, stop_ids)
            return step + 1, jnp.where(done, 0, nxt), position + 1, result.cache, out, done

        out = jnp.full((batch, self.max_new_tokens), _NO_TOKEN, jnp.int32)
        state = (jnp.zeros((), jnp.int32), tokens[:, -1], positions[:, -1], cache, out, ~active)
        return jax.lax.while_loop(cond, body, state)[4]

    # -- host side -----------------------------------------------------------------------------

    def _place(self, array: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        sharded = array.shape[0] % data_parallel_size(self.mesh) == 0
        spec = P(BATCH_AXES, *([None] * (array.ndim - 1))) if sharded else P()
        return jax.device_put(array, NamedSharding(self.mesh, spec))

    def generate(self, params: Any, prompts: Sequence[Sequence[int]], batch_size: Optional[int] = None
                 ) -> Generation:
        """Decodes one batch of token-id prompts (at most `batch_size`; missing rows are padding).

        Prompts longer than `max_prompt_length` keep their last tokens (the harness truncates the
        same way). Passing a fixed `batch_size` keeps the compiled shapes fixed for a short last batch.
        """
        if not prompts:
            return Generation([], [])
        batch = batch_size or len(prompts)
        if len(prompts) > batch:
            raise ValueError(f"{len(prompts)} prompts do not fit in a batch of {batch}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        prompts = [list(p)[-self.max_prompt_length:] for p in prompts]
        length = bucket_length(max(len(p) for p in prompts), self.min_bucket, self.max_prompt_length)
        tokens = np.full((batch, length), max(self.tokenizer.pad_id, 0), np.int32)
        positions = np.zeros((batch, length), np.int32)
        segment_ids = np.zeros((batch, length), np.int32)
        active = np.zeros((batch,), bool)
        for row, prompt in enumerate(prompts):
            n = len(prompt)
            tokens[row, length - n:] = prompt
            positions[row, length - n:] = np.arange(n)
            segment_ids[row, length - n:] = 1
            active[row] = True

        out = self._decode(params, *(self._place(x) for x in (tokens, positions, segment_ids, active)))
        out = np.asarray(multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else out)

        token_ids, texts = [], []
        for row in range(len(prompts)):
            ids = [int(t) for t in out[row] if t != _NO_TOKEN]
            token_ids.append(ids)
            if ids and ids[-1] == self.tokenizer.eos_id:
                ids = ids[:-1]
            text = self.tokenizer.decode(ids)
            texts.append(text.split("\n", 1)[0] if self.newline_ids else text)
        return Generation(token_ids, texts)
