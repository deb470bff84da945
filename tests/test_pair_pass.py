"""AFP's pair pass runs only through the deepest block its pooler reads (issue 21, section 7).

Each result is compared with the whole model's pass, which is what the pair pass computed before:
the hidden states, the pooled embeddings, and the AFP loss and its gradient must be bit-identical,
for the scanned and the unscanned layer layout. The saving is checked on XLA's own FLOP count.
"""

import json

import jax
import numpy as np
import pytest
from jax.extend import core

from easylm_align import model, objectives, train
from easylm_align.data import pipeline

LAYERS = 3


def tiny_llama(scan: bool, dropout: float = 0.0):
    cfg = model.get_llama_config("demo", json.dumps({
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": LAYERS, "max_position_embeddings": 64, "scan_layers": scan,
        "resid_pdrop": dropout, "attn_pdrop": dropout, "embd_pdrop": dropout}))
    llama = model.build_model(cfg)
    return llama, model.init_params(llama, jax.random.PRNGKey(0))


def afp_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"cl_tokens": rng.integers(3, 4096, (4, 2, 12)).astype(np.int32),
            "cl_masks": (np.arange(12) < rng.integers(1, 13, (4, 2, 1))).astype(np.int32),
            "input_tokens": rng.integers(3, 4096, (2, 16)).astype(np.int32),
            "target_tokens": rng.integers(3, 4096, (2, 16)).astype(np.int32),
            "loss_masks": (rng.random((2, 16)) < 0.8).astype(np.float32),
            "segment_ids": np.ones((2, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1))}


def whole_model_embeddings(llama, params, tokens, masks, pooler, rng, deterministic):
    """The pair pass as it was: every block, all hidden states, then the pooler."""
    batch, sentences, length = tokens.shape
    flat_masks = masks.reshape(batch * sentences, length)
    states = llama.apply({"params": params}, tokens.reshape(batch * sentences, length), segment_ids=flat_masks,
                         deterministic=deterministic, output_hidden_states=True, return_logits=False,
                         rngs={"dropout": rng}).hidden_states
    assert len(states) == LAYERS + 1
    return objectives.pool(states, flat_masks, pooler).reshape(batch, sentences, -1)


def whole_model_afp_loss(llama, params, batch, rng, deterministic, config):
    """`afp_loss` with the pair pass of `whole_model_embeddings` (same RNG use)."""
    cl_rng, clm_rng = jax.random.split(rng)
    z = whole_model_embeddings(llama, params, batch["cl_tokens"], batch["cl_masks"], config.pooler, cl_rng,
                               deterministic)
    cl, _ = objectives.contrastive_loss(z[:, 0], z[:, 1], config.temperature)
    clm, _ = objectives.clm_loss(llama, params, batch, clm_rng, deterministic, config, objective="afp")
    return config.cl_weight * cl + config.clm_weight * clm


def assert_trees_equal(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_a_truncated_pass_computes_what_the_whole_model_computes(scan):
    """The first K blocks' outputs are bit-identical to the whole model's, with dropout drawing the
    same masks (the scan splits its RNG per layer); nothing normed, no logits."""
    llama, params = tiny_llama(scan, dropout=0.1)
    ids = np.random.default_rng(1).integers(3, 4096, (2, 10)).astype(np.int32)
    run = jax.jit(lambda p, det, k: llama.apply({"params": p}, ids, deterministic=det, output_hidden_states=True,
                                                return_logits=False, num_layers=k, rngs={"dropout": jax.random.PRNGKey(3)}),
                  static_argnums=(1, 2))
    for deterministic in (True, False):
        whole = run(params, deterministic, None).hidden_states
        for depth in range(LAYERS):
            out = run(params, deterministic, depth)
            assert out.logits is None and out.last_hidden_state is None and len(out.hidden_states) == depth + 1
            assert_trees_equal(out.hidden_states, whole[:depth + 1])
    assert not np.array_equal(run(params, False, 2).hidden_states[2], run(params, True, 2).hidden_states[2])
    with pytest.raises(ValueError, match="num_layers"):
        llama.apply({"params": params}, ids, return_logits=False, num_layers=LAYERS + 1)
    with pytest.raises(ValueError, match="logits"):
        llama.apply({"params": params}, ids, num_layers=1)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_pair_pass_embeddings_loss_and_gradients_are_unchanged(scan):
    """For poolers reading 0, 1, 2 and all 3 blocks: the embeddings, the AFP loss and every parameter's
    gradient equal the whole-model pair pass's exactly; the blocks past the pooler get no gradient
    from the pairs."""
    llama, params = tiny_llama(scan)
    batch = afp_batch()
    rng = jax.random.PRNGKey(7)
    poolers = ("last-1", "max-0", "avg-2", "avg_first_last", "last_top2")
    assert [objectives.pooler_depth(p, LAYERS) for p in poolers] == [1, 0, 2, 3, 3]

    @jax.jit
    def embeddings(p):
        return [(objectives.sentence_embeddings(llama, p, batch["cl_tokens"], batch["cl_masks"], pooler, rng, True),
                 whole_model_embeddings(llama, p, batch["cl_tokens"], batch["cl_masks"], pooler, rng, True))
                for pooler in poolers]

    for pooler, (new, old) in zip(poolers, embeddings(params)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=pooler)

    for pooler in ("last-1", "avg-2"):
        cfg = objectives.default_config()
        cfg.pooler = pooler
        new = jax.jit(jax.value_and_grad(lambda p: objectives.afp_loss(llama, p, batch, rng, True, cfg)[0]))(params)
        old = jax.jit(jax.value_and_grad(lambda p: whole_model_afp_loss(llama, p, batch, rng, True, cfg)))(params)
        assert float(new[0]) == float(old[0]), pooler
        assert_trees_equal(new[1], old[1])

    # What the pairs alone send to each block: nothing past block 1 under last-1.
    pair_grads = jax.jit(jax.grad(lambda p: objectives.sentence_embeddings(
        llama, p, batch["cl_tokens"], batch["cl_masks"], "last-1", rng, True).sum()))(params)
    layers = model.unstack_layers(pair_grads, LAYERS)
    assert any(np.abs(x).max() > 0 for x in jax.tree_util.tree_leaves(layers["layers_0"]))
    for i in range(1, LAYERS):
        assert all(not np.any(x) for x in jax.tree_util.tree_leaves(layers[f"layers_{i}"])), i


def matmul_flops(jaxpr) -> float:
    """FLOPs of every matrix product in a jaxpr, 2 per multiply-add, a scan's body counted once per
    iteration (XLA's cost analysis counts a loop's body once, so it cannot see a scan's length)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contracted])
            continue
        inner = [matmul_flops(getattr(x, "jaxpr", x)) for v in eqn.params.values()
                 for x in (v if isinstance(v, (tuple, list)) else (v,)) if isinstance(x, (core.Jaxpr, core.ClosedJaxpr))]
        if inner:
            trips = eqn.params["length"] if eqn.primitive.name == "scan" else 1
            total += trips * (max(inner) if eqn.primitive.name == "cond" else sum(inner))
    return total


def afp_trainer(tmp_path, pooler: str, scan: bool) -> train.Trainer:
    """AFP's trainer for an 8-layer model whose blocks dominate (hidden 256, vocabulary 4096) on
    2 pairs of 64-token sentences and 2 CLM rows of 64: pairs are two thirds of the tokens, as in
    AFP's run."""
    cfg = train.default_config()
    cfg.update_from_flattened_dict({
        "update_llama_config": json.dumps({"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
                                           "num_key_value_heads": 4, "num_hidden_layers": 8, "vocab_size": 4096,
                                           "scan_layers": scan}),
        "dry_run": True, "mesh_dim": "1,-1,1", "objective": "afp", "objectives.pooler": pooler,
        "objectives.loss_kernel": "xla", "logger.output_dir": str(tmp_path),
        "train_dataset.type": "afp", "train_dataset.afp_dataset.batch_size": 2,
        "train_dataset.afp_dataset.pair_length": 64, "train_dataset.afp_dataset.seq_length": 64})
    return train.Trainer(cfg)


def abstract_step_inputs(trainer: train.Trainer) -> tuple:
    """The train step's (params, state, batch) as shapes on one device (the mesh is the suite's 8)."""
    one_device = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    params, state = trainer._abstract_state()
    spec = pipeline.abstract_batch(trainer.cfg.train_dataset, "--train_dataset")
    return one_device(params), one_device(state), {k: jax.ShapeDtypeStruct(*v) for k, v in spec.items()}


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_last_1_train_step_needs_at_most_60_percent_of_last_8_flops(tmp_path, scan):
    """Counted in the traced train step (a scan's body once per layer); where XLA's cost analysis
    counts every block (unscanned), on the compiled step too."""
    steps = [(t._train_step, abstract_step_inputs(t)) for t in
             (afp_trainer(tmp_path, pooler, scan) for pooler in ("last-1", "last-8"))]
    last_1, last_8 = (matmul_flops(jax.make_jaxpr(step)(*inputs).jaxpr) for step, inputs in steps)
    assert last_1 <= 0.6 * last_8, (last_1, last_8)
    if not scan:
        last_1, last_8 = (jax.jit(step).lower(*inputs).compile().cost_analysis()["flops"] for step, inputs in steps)
        assert last_1 <= 0.6 * last_8, (last_1, last_8)


def test_bf16_embedding_gradient_is_summed_in_fp32():
    """A token used 512 times: its row's gradient is the fp32 sum of 512 bf16 cotangents (NumPy),
    not that sum rounded to bf16 (what casting the table before the lookup gave)."""
    cfg = model.get_llama_config("demo", json.dumps({"hidden_size": 32, "intermediate_size": 64,
                                                     "num_attention_heads": 4, "num_key_value_heads": 2}))
    llama = model.LlamaForCausalLM(cfg, dtype=jax.numpy.bfloat16)
    params = model.init_params(llama, jax.random.PRNGKey(0))
    ids = np.full((1, 512), 7, np.int32)
    weights = np.random.default_rng(0).standard_normal((1, 512, 32)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda p: (llama.apply({"params": p}, ids, return_logits=False, num_layers=0,
                                                   output_hidden_states=True).hidden_states[0]
                                       * weights.astype(jax.numpy.bfloat16)).sum()))(params)
    expected = weights.astype(jax.numpy.bfloat16).astype(np.float32).sum(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(grad["embed_tokens"]["embedding"][7]), expected, rtol=1e-6, atol=1e-6)
