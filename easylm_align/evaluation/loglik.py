"""Log-likelihood of continuations with our JAX LLaMA: the model side of `icl_tasks`.

`LoglikScorer(model, tokenizer, params, mesh)` is an `icl_tasks.Scorer`: called on
(context, continuation) pairs, it returns log p(continuation | context) summed over the
continuation's tokens (natural log). Tokenization follows AFP's scoring:

* `context + continuation` is tokenized whole, and the continuation's tokens are those after the
  longest common prefix with the context's own tokenization (`tokenizer.split_tokens`), so a
  token spanning the seam (" Yes" glued to a space) belongs to the continuation;
* BOS is prepended (`add_bos`), as AFP's Hugging Face tokenizer does;
* the literal `eos_text` ("</s>", AFP's demonstration connector) becomes the EOS id, as Hugging
  Face tokenizers read special tokens inside text; plain SentencePiece would spell it out.

Sequences are sorted by length, right-padded to power-of-two buckets and scored `batch_size` at a
time by one jitted function (compiled once per bucket), sharded over the mesh's (dp, fsdp) axes.
Sequences longer than the model's positions keep their last tokens.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from easylm_align.tokenizer import split_tokens
from easylm_align.errors import ConfigError
from easylm_align.evaluation.generation import bucket_length
from easylm_align.model import LlamaForCausalLM
from easylm_align.sharding import activation_rules, batch_sharding, data_parallel_size, replicated
from easylm_align.tokenizer import Tokenizer


class LoglikScorer:
    """Scores continuations; reuse one instance so the compiled functions are reused."""

    def __init__(self, model: LlamaForCausalLM, tokenizer: Tokenizer, params: Any, mesh: Optional[Mesh] = None,
                 batch_size: int = 8, add_bos: bool = True, eos_text: str = "</s>", min_bucket: int = 64):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be positive")
        if mesh is not None and batch_size % data_parallel_size(mesh):
            raise ConfigError(f"batch_size={batch_size} is not divisible by the data-parallel size "
                             f"dp*fsdp={data_parallel_size(mesh)} of mesh {dict(mesh.shape)}")
        self.model, self.tokenizer, self.params, self.mesh = model, tokenizer, params, mesh
        self.batch_size, self.add_bos, self.eos_text, self.min_bucket = batch_size, add_bos, eos_text, min_bucket
        self.max_length = model.config.max_position_embeddings
        out = None if mesh is None else replicated(mesh)
        self._score = jax.jit(self._score_batch, out_shardings=out)
        self.num_compilations = 0

    def encode(self, context: str, continuation: str) -> tuple[list[int], int]:
        """Token ids of the whole sequence and how many of them are context."""
        *demos, last = context.split(self.eos_text) if self.eos_text else [context]
        ids = [self.tokenizer.bos_id] if self.add_bos else []
        for piece in demos:
            ids += self.tokenizer.encode(piece) + [self.tokenizer.eos_id]
        tail, n_context = split_tokens(self.tokenizer, last + continuation, len(last))
        return ids + tail, len(ids) + n_context

    def _score_batch(self, params: Any, tokens: jax.Array, segment_ids: jax.Array, targets: jax.Array,
                     target_mask: jax.Array) -> jax.Array:
        self.num_compilations += 1
        logits = self.model.apply({"params": params}, tokens, segment_ids=segment_ids).logits
        # log_softmax at the targets only: no second (batch, length, vocab) array
        target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        token_logprobs = target_logits - jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(token_logprobs * target_mask, axis=-1)

    def _place(self, array: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        sharding = batch_sharding(self.mesh)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def score_tokens(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[float]:
        """Summed log-probabilities of each `(ids, n_context)` sequence's tokens after the context."""
        scores = [0.0] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            longest = min(max(len(sequences[i][0]) for i in rows), self.max_length)
            length = bucket_length(longest, self.min_bucket, self.max_length)
            shape = (self.batch_size, length)
            tokens, segment_ids = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
            targets, mask = np.zeros(shape, np.int32), np.zeros(shape, np.float32)
            for row, i in enumerate(rows):
                ids, n_context = sequences[i]
                cut = max(len(ids) - self.max_length, 0)  # keep the end: the continuation
                ids, n_context = list(ids[cut:]), max(n_context - cut, 1)  # the first token has no prediction
                n = len(ids)
                tokens[row, :n], segment_ids[row, :n] = ids, 1
                targets[row, :n - 1] = ids[1:]
                mask[row, n_context - 1:n - 1] = 1.0  # position t predicts token t + 1
            # On a mesh, the activation rules let a per-device kernel (splash on a TPU) find its axes.
            with activation_rules(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                out = self._score(self.params, *(self._place(x) for x in (tokens, segment_ids, targets, mask)))
            for i, value in zip(rows, np.asarray(out)):
                scores[i] = float(value)
        return scores

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return self.score_tokens([self.encode(context, continuation) for context, continuation in pairs])
