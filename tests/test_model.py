"""The Flax LLaMA decoder against an independent NumPy reference, and its behavioural contracts.

Everything runs on tiny configurations (vocab 256, hidden 64, 2 layers) in fp32 on the CPU. The
jitted functions are built once per model (module-scoped fixtures) and reused with fixed shapes so
the whole file compiles only a handful of times.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easylm_align import model, objectives
from easylm_align.tokenizer import DEMO_TOKENIZER, Tokenizer
from easylm_align.tree_paths import path_str

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
BATCH, SEQ = 4, 16


def tiny_config(**overrides):
    return model.get_llama_config("debug", json.dumps(dict(TINY, **overrides)))


def random_params(params, seed):
    """Replaces every leaf with random values of a scale that gives non-trivial attention and logits."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path_str(path)
        shape = leaf.shape
        if name.endswith("norm/scale"):
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.endswith("embed_tokens/embedding"):
            value = 0.5 * rng.standard_normal(shape)
        else:  # kernels (in, out), possibly with a leading layer axis
            value = rng.standard_normal(shape) / np.sqrt(shape[-2])
        return jnp.asarray(value, leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, params)


class Tiny:
    """A model, random params and jitted forwards, compiled on first use per shape."""

    def __init__(self, seed=0, dtype="fp32", param_dtype="fp32", params=None, **overrides):
        self.config = tiny_config(**overrides)
        self.model = model.build_model(self.config, dtype, param_dtype)
        if params is None:
            shapes = jax.eval_shape(lambda r: model.init_params(self.model, r), jax.random.PRNGKey(seed))
            params = random_params(shapes, seed)
        self.params = params

        def forward(params, ids, positions, segment_ids, hidden=False):
            out = self.model.apply({"params": params}, ids, positions=positions, segment_ids=segment_ids,
                                   output_hidden_states=hidden)
            return (out.logits, out.hidden_states) if hidden else out.logits

        def train_forward(params, ids, positions, segment_ids, rng):
            return self.model.apply({"params": params}, ids, positions=positions, segment_ids=segment_ids,
                                    deterministic=False, rngs={"dropout": rng}).logits

        def loss(params, batch):
            logits = self.model.apply({"params": params}, batch["input_tokens"], positions=batch["positions"],
                                      segment_ids=batch["segment_ids"]).logits
            weights = objectives.target_weights(batch["loss_masks"], "token")
            loss, _ = objectives.cross_entropy_loss_and_accuracy(logits, batch["target_tokens"], weights)
            return loss, logits

        def step(params, ids, positions, segment_ids, cache):
            out = self.model.apply({"params": params}, ids, positions=positions, segment_ids=segment_ids,
                                   cache=cache)
            return out.logits, out.cache

        self._forward = jax.jit(forward, static_argnames="hidden")
        self._train_forward = jax.jit(train_forward)
        self.loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))  # ((loss, logits), grads)
        self.step = jax.jit(step)

    def __call__(self, ids, positions=None, segment_ids=None, params=None, hidden=False):
        ids = jnp.asarray(ids, jnp.int32)
        positions = default_positions(ids.shape) if positions is None else jnp.asarray(positions, jnp.int32)
        segment_ids = jnp.ones(ids.shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        return self._forward(self.params if params is None else params, ids, positions, segment_ids, hidden=hidden)

    def train(self, ids, rng, positions=None, segment_ids=None, params=None):
        ids = jnp.asarray(ids, jnp.int32)
        positions = default_positions(ids.shape) if positions is None else jnp.asarray(positions, jnp.int32)
        segment_ids = jnp.ones(ids.shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        return self._train_forward(self.params if params is None else params, ids, positions, segment_ids, rng)


def default_positions(shape):
    return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)


def random_tokens(shape, seed=0, vocab=256):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


def packed_row(lengths, total):
    """segment_ids / positions of one row packing examples of `lengths`, padded (segment 0) to `total`."""
    seg, pos = np.zeros(total, np.int32), np.zeros(total, np.int32)
    start = 0
    for i, n in enumerate(lengths):
        seg[start:start + n] = i + 1
        pos[start:start + n] = np.arange(n)
        start += n
    return seg, pos


@pytest.fixture(scope="module")
def gqa():
    return Tiny(seed=0)


# ----------------------------------------------------------------------------------------------
# NumPy reference (float64), written from the LLaMA equations, reading our parameter tree
# ----------------------------------------------------------------------------------------------

def np_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, positions, theta):
    """x (batch, seq, heads, d): dimension j rotates with j + d/2 by angle p * theta^(-2j/d)."""
    d = x.shape[-1]
    half = d // 2
    out = np.empty_like(x, dtype=np.float64)
    for j in range(half):
        angle = positions.astype(np.float64) * theta ** (-2.0 * j / d)  # (batch, seq)
        c, s = np.cos(angle)[:, :, None], np.sin(angle)[:, :, None]
        a, b = x[..., j], x[..., j + half]
        out[..., j] = a * c - b * s
        out[..., j + half] = b * c + a * s
    return out


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_llama(params, config, ids, positions, segment_ids):
    """Logits and hidden states (HF convention) of the decoder; segment 0 keys are never attended."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // heads
    batch, seq = ids.shape
    x = p["embed_tokens"]["embedding"][ids]
    hidden = [x]
    q_idx, k_idx = np.arange(seq)[:, None], np.arange(seq)[None, :]
    allowed = ((q_idx >= k_idx)[None]
               & (segment_ids[:, :, None] == segment_ids[:, None, :])
               & (segment_ids[:, None, :] != 0))  # (batch, q, k)
    for i in range(config.num_hidden_layers):
        layer = p[f"layers_{i}"]
        h = np_rms_norm(x, layer["attention_norm"]["scale"], config.rms_norm_eps)
        att = layer["attention"]
        q = np_rope((h @ att["wq"]["kernel"]).reshape(batch, seq, heads, d), positions, config.rope_theta)
        k = np_rope((h @ att["wk"]["kernel"]).reshape(batch, seq, kv, d), positions, config.rope_theta)
        v = (h @ att["wv"]["kernel"]).reshape(batch, seq, kv, d)
        out = np.zeros((batch, seq, heads, d))
        for head in range(heads):
            g = head // (heads // kv)  # query heads share kv heads in consecutive groups
            scores = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, g]) / np.sqrt(d)
            scores = np.where(allowed, scores, -np.inf)
            scores = scores - np.where(allowed.any(-1), scores.max(-1), 0.0)[..., None]
            probs = np.exp(scores)  # padding queries attend to nothing: their output is 0 here
            probs = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-300)
            out[:, :, head] = np.einsum("bts,bsd->btd", probs, v[:, :, g])
        x = x + out.reshape(batch, seq, heads * d) @ att["wo"]["kernel"]
        h = np_rms_norm(x, layer["ffn_norm"]["scale"], config.rms_norm_eps)
        ff = layer["feed_forward"]
        x = x + (np_silu(h @ ff["w1"]["kernel"]) * (h @ ff["w3"]["kernel"])) @ ff["w2"]["kernel"]
        hidden.append(x)
    x = np_rms_norm(x, p["norm"]["scale"], config.rms_norm_eps)
    hidden[-1] = x
    head_w = p["embed_tokens"]["embedding"].T if config.tie_word_embeddings else p["lm_head"]["kernel"]
    return x @ head_w, hidden


# ----------------------------------------------------------------------------------------------
# Causality and packing
# ----------------------------------------------------------------------------------------------

def test_changing_a_token_changes_only_later_logits(gqa):
    base = random_tokens((SEQ,), seed=1)
    changed_at = [0, 6, SEQ - 1]
    rows = [base]
    for t in changed_at:
        row = base.copy()
        row[t] = (row[t] + 17) % 256
        rows.append(row)
    logits = np.asarray(gqa(np.stack(rows)))
    for r, t in enumerate(changed_at, start=1):
        np.testing.assert_allclose(logits[r, :t], logits[0, :t], rtol=0, atol=1e-6,
                                   err_msg=f"token {t} leaked into earlier logits")
        per_position = np.abs(logits[r, t:] - logits[0, t:]).max(axis=-1)
        assert (per_position > 1e-4).all(), f"changing token {t} did not change logits at/after {t}"


def test_packed_segments_do_not_see_each_other(gqa):
    first, second = 7, SEQ - 7
    seg, pos = packed_row([first, second], SEQ)
    tokens = random_tokens((SEQ,), seed=2)
    other_second = tokens.copy()
    other_second[first:] = random_tokens((second,), seed=3)
    padded = tokens.copy()
    padded[first:] = random_tokens((second,), seed=4)
    pad_seg, pad_pos = packed_row([first], SEQ)
    logits = np.asarray(gqa(np.stack([tokens, other_second, padded, tokens]),
                            positions=np.stack([pos, pos, pad_pos, pos]),
                            segment_ids=np.stack([seg, seg, pad_seg, seg])))
    alone = np.asarray(gqa(tokens[None, first:]))[0]
    np.testing.assert_allclose(logits[0, first:], alone, rtol=1e-5, atol=1e-5)
    # Segment 1 is unchanged by segment 2's tokens and by padding tokens after it.
    np.testing.assert_allclose(logits[1, :first], logits[0, :first], rtol=0, atol=1e-6)
    np.testing.assert_allclose(logits[2, :first], logits[0, :first], rtol=0, atol=1e-6)
    assert np.abs(logits[1, first:] - logits[0, first:]).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Rotary embedding
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("theta", [10000.0, 500000.0, 100.0])
def test_rotary_matches_numpy_reference(theta):
    rng = np.random.default_rng(int(theta))
    d = 32
    x = rng.standard_normal((2, 24, 3, d)).astype(np.float32)
    small = rng.integers(0, 64, size=(2, 24)).astype(np.int32)
    large = rng.integers(0, 4096, size=(2, 24)).astype(np.int32)
    for positions, atol in ((small, 1e-5), (large, 2e-3)):  # fp32 angles lose digits at large p
        cos, sin = model.rotary_cos_sin(jnp.asarray(positions), d, theta, 4096)
        got = np.asarray(model.apply_rotary(jnp.asarray(x), cos, sin))
        np.testing.assert_allclose(got, np_rope(x.astype(np.float64), positions, theta), rtol=0, atol=atol)


def test_rotary_position_outside_the_table_is_nan_not_a_wrong_angle():
    cos, sin = model.rotary_cos_sin(jnp.asarray([[0, 7, 8]], jnp.int32), 4, 10000.0, 8)
    assert np.isfinite(np.asarray(cos[0, :2])).all() and np.isnan(np.asarray(cos[0, 2])).all()
    assert np.isnan(np.asarray(sin[0, 2])).all()


def test_rotary_is_relative_and_norm_preserving():
    rng = np.random.default_rng(0)
    d = 16
    q = rng.standard_normal((1, 1, 1, d)).astype(np.float32)
    k = rng.standard_normal((1, 1, 1, d)).astype(np.float32)

    def rotated(x, p):
        cos, sin = model.rotary_cos_sin(jnp.asarray([[p]], jnp.int32), d, 10000.0, 128)
        return np.asarray(model.apply_rotary(jnp.asarray(x), cos, sin)).ravel()

    dots = [rotated(q, p + 5) @ rotated(k, p) for p in (0, 3, 40)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(rotated(q, 77)), np.linalg.norm(q), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The whole forward against NumPy
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(num_key_value_heads=4),                                       # MHA, untied
    dict(num_key_value_heads=2, tie_word_embeddings=True),            # GQA, tied
    dict(num_key_value_heads=1, rope_theta=500000.0, rms_norm_eps=1e-5),  # MQA, other theta/eps
], ids=["mha", "gqa-tied", "mqa-theta"])
def test_forward_matches_numpy_reference(overrides):
    m = Tiny(seed=3, **overrides)
    assert ("lm_head" in m.params) != m.config.tie_word_embeddings
    ids = random_tokens((2, SEQ), seed=5)
    seg, pos = packed_row([6, 7], SEQ)  # row 1: two packed examples and 3 padding slots
    segment_ids = np.stack([np.ones(SEQ, np.int32), seg])
    positions = np.stack([np.arange(SEQ, dtype=np.int32), pos])
    logits, hidden = m(ids, positions, segment_ids, hidden=True)
    want_logits, want_hidden = np_llama(m.params, m.config, ids, positions, segment_ids)
    real = segment_ids != 0  # padding queries attend to nothing; their outputs are unspecified
    np.testing.assert_allclose(np.asarray(logits)[real], want_logits[real], rtol=1e-5, atol=1e-5)
    assert len(hidden) == m.config.num_hidden_layers + 1
    for got, want in zip(hidden, want_hidden):
        np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-5, atol=1e-5)


def test_hidden_states_contract(gqa):
    ids = random_tokens((BATCH, SEQ), seed=6)
    logits, hidden = gqa(ids, hidden=True)
    assert len(hidden) == gqa.config.num_hidden_layers + 1
    # [0] is the embedding output; the last is normed and is what the LM head reads.
    np.testing.assert_array_equal(np.asarray(hidden[0]), np.asarray(gqa.params["embed_tokens"]["embedding"])[ids])
    last = np.asarray(hidden[-1], np.float64)
    np.testing.assert_allclose(last @ np.asarray(gqa.params["lm_head"]["kernel"], np.float64),
                               np.asarray(logits), rtol=1e-5, atol=1e-5)
    unit = last / np.asarray(gqa.params["norm"]["scale"], np.float64)
    np.testing.assert_allclose(np.sqrt(np.mean(unit ** 2, axis=-1)), 1.0, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Scan and remat
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grad_batch():
    ids = random_tokens((BATCH, SEQ + 1), seed=7)
    seg, pos = packed_row([9, 7], SEQ)
    return {"input_tokens": jnp.asarray(ids[:, :-1]), "target_tokens": jnp.asarray(ids[:, 1:]),
            "loss_masks": jnp.asarray((np.random.default_rng(7).random((BATCH, SEQ)) > 0.3).astype(np.float32)),
            "segment_ids": jnp.asarray(np.stack([seg] * BATCH)), "positions": jnp.asarray(np.stack([pos] * BATCH))}


def test_scan_layers_matches_unscanned(gqa):
    n = gqa.config.num_hidden_layers
    stacked = model.stack_layers(gqa.params, n)
    scanned = Tiny(scan_layers=True, params=stacked)
    # The scanned model's own init has exactly the stacked layout.
    own = jax.eval_shape(lambda r: model.init_params(scanned.model, r), jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(stacked)
    assert jax.tree_util.tree_map(lambda a: a.shape, own) == jax.tree_util.tree_map(lambda a: a.shape, stacked)
    assert stacked["layers"]["attention"]["wq"]["kernel"].shape[0] == n
    roundtrip = model.unstack_layers(stacked, n)
    jax.tree_util.tree_map(np.testing.assert_array_equal, roundtrip, gqa.params)

    ids = random_tokens((BATCH, SEQ), seed=8)
    want_logits, want_hidden = gqa(ids, hidden=True)
    logits, hidden = scanned(ids, hidden=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    assert len(hidden) == len(want_hidden)
    for got, want in zip(hidden, want_hidden):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_remat_does_not_change_outputs_or_grads(gqa, grad_batch):
    n = gqa.config.num_hidden_layers
    (loss, logits), grads = gqa.loss_and_grad(gqa.params, grad_batch)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 1e-3
    remat = Tiny(remat_policy="nothing_saveable", params=gqa.params)
    # Scanned layers are rematerialised through a different path (scan over a remat'ed body).
    stacked = model.stack_layers(gqa.params, n)
    scanned_remat = Tiny(scan_layers=True, remat_policy="dots_saveable", params=stacked)
    for m in (remat, scanned_remat):
        (got_loss, got_logits), got_grads = m.loss_and_grad(m.params, grad_batch)
        np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got_logits), np.asarray(logits), rtol=1e-5, atol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                               model.unstack_layers(got_grads, n), grads)


# ----------------------------------------------------------------------------------------------
# Dropout and forgetful causal masking
# ----------------------------------------------------------------------------------------------

def test_dropout_only_in_training(gqa):
    drop = Tiny(params=gqa.params, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    ids = random_tokens((BATCH, SEQ), seed=9)
    reference = np.asarray(gqa(ids))
    np.testing.assert_array_equal(np.asarray(drop(ids)), reference)  # deterministic=True: dropout off
    key_a, key_b = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    train_a = np.asarray(drop.train(ids, key_a))
    np.testing.assert_array_equal(train_a, np.asarray(drop.train(ids, key_a)))  # same rng, same output
    assert np.abs(train_a - np.asarray(drop.train(ids, key_b))).max() > 1e-3
    assert np.abs(train_a - reference).max() > 1e-3


def test_forgetful_mask_statistics():
    batch, seq = 4, 8192
    ones = jnp.ones((batch, seq), jnp.int32)
    mask = np.asarray(model.forgetful_mask(jax.random.PRNGKey(0), ones, 0.3, 0.3))
    assert mask.shape == (batch, seq) and mask.dtype == bool
    hidden = 1.0 - mask.mean(axis=-1)
    np.testing.assert_allclose(hidden, 0.3, atol=0.03)
    # A ratio range gives each row its own ratio inside it.
    mask = np.asarray(model.forgetful_mask(jax.random.PRNGKey(1), jnp.ones((16, seq), jnp.int32), 0.1, 0.6))
    hidden = 1.0 - mask.mean(axis=-1)
    assert ((hidden > 0.1 - 0.03) & (hidden < 0.6 + 0.03)).all()
    assert hidden.std() > 0.05
    # Ratio 0 hides nothing.
    assert np.asarray(model.forgetful_mask(jax.random.PRNGKey(2), ones, 0.0, 0.0)).all()


def test_forgetful_mask_keeps_first_key_of_each_segment():
    starts = [0, 5, 6, 20, 41]
    seg = np.zeros((3, 64), np.int32)
    for i, s in enumerate(starts):
        seg[:, s:] = i + 1
    seg[2, 50:] = 0  # trailing padding starts a "segment" of its own; harmless either way
    first = np.zeros(64, bool)
    first[starts] = True
    for seed in range(5):
        mask = np.asarray(model.forgetful_mask(jax.random.PRNGKey(seed), jnp.asarray(seg), 1.0, 1.0))
        # Ratio 1 hides every key except the first of each segment.
        np.testing.assert_array_equal(mask[:2], np.stack([first] * 2))
        assert mask[2, starts].all() and not mask[2, 1:5].any()
    for seed in range(20):
        mask = np.asarray(model.forgetful_mask(jax.random.PRNGKey(seed), jnp.asarray(seg), 0.9, 0.99))
        assert mask[:, starts].all()


def test_forgetful_masking_only_in_training(gqa):
    fcm = Tiny(params=gqa.params, fcm_min_ratio=0.5, fcm_max_ratio=0.5)
    seg, pos = packed_row([9, 7], SEQ)
    segment_ids, positions = np.stack([seg] * BATCH), np.stack([pos] * BATCH)
    ids = random_tokens((BATCH, SEQ), seed=10)
    reference = np.asarray(gqa(ids, positions, segment_ids))
    np.testing.assert_array_equal(np.asarray(fcm(ids, positions, segment_ids)), reference)
    train_a = np.asarray(fcm.train(ids, jax.random.PRNGKey(3), positions, segment_ids))
    train_b = np.asarray(fcm.train(ids, jax.random.PRNGKey(4), positions, segment_ids))
    assert np.abs(train_a - reference).max() > 1e-3
    assert np.abs(train_a - train_b).max() > 1e-3
    # The first token of each segment sees only itself, which FCM never hides.
    for slot in (0, 9):
        np.testing.assert_allclose(train_a[:, slot], reference[:, slot], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_kv_cache_decoding_matches_full_forward(gqa, scan):
    n = gqa.config.num_hidden_layers
    m = gqa if not scan else Tiny(scan_layers=True, params=model.stack_layers(gqa.params, n))
    total, prompt, max_len = 12, 5, 16
    ids = random_tokens((2, total), seed=11)
    # Row 1 is left-padded by 3 slots, as the greedy decoder does: segment 0, positions from its first token.
    segment_ids = np.ones((2, total), np.int32)
    segment_ids[1, :3] = 0
    positions = np.stack([np.arange(total), np.concatenate([np.zeros(3), np.arange(total - 3)])]).astype(np.int32)
    want = np.asarray(gqa(ids, positions, segment_ids))
    alone = np.asarray(gqa(ids[1:, 3:]))[0]
    np.testing.assert_allclose(want[1, 3:], alone, rtol=1e-5, atol=1e-5)

    cache = model.KVCache.empty(m.config, 2, max_len)
    logits, cache = m.step(m.params, jnp.asarray(ids[:, :prompt]), jnp.asarray(positions[:, :prompt]),
                           jnp.asarray(segment_ids[:, :prompt]), cache)
    got = [np.asarray(logits)]
    assert int(cache.index) == prompt
    for t in range(prompt, total):
        logits, cache = m.step(m.params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(positions[:, t:t + 1]),
                               jnp.asarray(segment_ids[:, t:t + 1]), cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert int(cache.index) == total
    real = segment_ids != 0
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.segment_ids)[:, :total], segment_ids)
    assert not np.asarray(cache.segment_ids)[:, total:].any()


# ----------------------------------------------------------------------------------------------
# bf16
# ----------------------------------------------------------------------------------------------

def test_bf16_compute_is_close_to_fp32(gqa):
    ids = random_tokens((BATCH, SEQ), seed=12)
    reference = np.asarray(gqa(ids))
    bf16 = Tiny(dtype="bf16", params=gqa.params)
    logits, hidden = bf16(ids, hidden=True)
    assert logits.dtype == jnp.float32 and hidden[1].dtype == jnp.bfloat16
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()
    scale = np.abs(reference).max()
    assert np.abs(logits - reference).max() < 0.05 * scale
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() > 0.9

    # bf16 parameters too (shapes only): init gives bf16 leaves and the logits stay fp32.
    pure = model.build_model(gqa.config, "bf16", "bf16")
    params = jax.eval_shape(lambda r: model.init_params(pure, r), jax.random.PRNGKey(0))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    out = jax.eval_shape(lambda p, x: pure.apply({"params": p}, x).logits, params, jnp.asarray(ids))
    assert out.dtype == jnp.float32 and out.shape == (BATCH, SEQ, gqa.config.vocab_size)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

def test_debug_is_easylms_and_demo_fits_the_demo_tokenizer():
    # EasyLM's LLAMA_STANDARD_CONFIGS['debug'] (young-geng/EasyLM, llama_model.py), written out here.
    easylm_debug = dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                        rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False)
    debug = model.get_llama_config("debug")
    assert {key: debug[key] for key in easylm_debug} == easylm_debug
    demo = model.get_llama_config("demo")
    assert demo.vocab_size == Tokenizer(str(DEMO_TOKENIZER)).vocab_size == 4096
    assert demo.num_hidden_layers == 2
