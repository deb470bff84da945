"""--optimizer.trainable: frozen parameters stay bit-identical and hold no optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easylm_align import checkpoint, optimizer, sharding, train
from easylm_align.errors import ConfigError
from easylm_align.tree_paths import path_str
from test_train import make_config, read_metrics


def _params(rng):
    return {"embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
            "layers_0": {"attention": {"wq": {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}},
                         "ffn_norm": {"scale": jnp.ones((8,), jnp.float32)}},
            "lm_head": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}}


def _state_paths(state):
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_trained_subset_steps_as_adamw_on_that_subset_alone(fused, accumulate):
    cfg = optimizer.default_config()
    cfg.trainable, cfg.accumulate_gradient_steps = "embeddings", accumulate
    cfg.adamw_optimizer.update(dict(lr=1e-2, lr_warmup_steps=1, lr_decay_steps=10, clip_gradient=1.0, fused=fused))
    tx, _ = optimizer.build(cfg)
    # Reference: optax's own clip + adamw run on the trainable leaves only, batches averaged by hand.
    c = cfg.adamw_optimizer
    reference = optax.chain(optax.clip_by_global_norm(c.clip_gradient),
                            optax.adamw(optimizer.lr_schedule(cfg), b1=c.b1, b2=c.b2, eps=c.eps,
                                        weight_decay=c.weight_decay))
    rng = np.random.default_rng(0)
    params = _params(rng)
    sub = {k: params[k] for k in ("embed_tokens", "lm_head")}
    state, ref_state = tx.init(params), reference.init(sub)
    paths = _state_paths(state)
    assert not [p for p in paths if "layers_0" in p], paths  # no moments, no accumulators for frozen leaves
    assert any(p.endswith("mu/embed_tokens/embedding") for p in paths)
    for _ in range(3):
        grads = [jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), params)
                 for _ in range(accumulate)]
        for g in grads:
            updates, state = jax.jit(tx.update)(g, state, params)
            params = optax.apply_updates(params, updates)
        mean = jax.tree_util.tree_map(lambda *gs: sum(gs) / len(gs), *[{k: g[k] for k in sub} for g in grads])
        ref_updates, ref_state = reference.update(mean, ref_state, sub)
        sub = optax.apply_updates(sub, ref_updates)
    for k in sub:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params[k], sub[k])
    frozen = _params(np.random.default_rng(0))["layers_0"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params["layers_0"], frozen)


def test_regex_and_shortcuts_select_paths():
    params = _params(np.random.default_rng(0))
    leaves = lambda t: {path_str(p) for p, v in jax.tree_util.tree_leaves_with_path(
        optimizer.trainable_mask(params, t)) if v}
    assert leaves("embeddings") == {"embed_tokens/embedding", "lm_head/kernel"}
    assert leaves("lm_head,norms") == {"lm_head/kernel", "layers_0/ffn_norm/scale"}
    assert leaves(r"attention/wq") == {"layers_0/attention/wq/kernel"}
    with pytest.raises(ConfigError, match="matches no parameter"):
        optimizer.trainable_mask(params, "embedings")
    with pytest.raises(ConfigError, match="not a regular expression"):
        optimizer.trainable_mask(params, "lm_head(")


def test_embeddings_stage_freezes_resumes_and_loads_into_a_full_run(tmp_path):
    """Sharded over 8 devices, accumulating 2 batches: frozen weights bit-identical, embeddings move,
    a cut-and-resumed stage repeats the uninterrupted one, and its params start a full run."""
    common = dict(optimizer__trainable="embeddings", optimizer__accumulate_gradient_steps=2, mesh_dim="1,2,4",
                  save_model_freq=2, optimizer__adamw_optimizer__lr_warmup_steps=1)
    trainer = train.Trainer(make_config(tmp_path / "full", total_steps=4, **common))
    trainer.run()
    with sharding.activation_rules(trainer.mesh):  # the run's own (jitted, sharded) initialisation
        init = trainer.initial_state()[0]
    done = checkpoint.load_params_numpy(str(tmp_path / "full/checkpoints/streaming_params_4"))
    flat_init = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(init)}
    flat_done = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(done)}
    assert flat_init.keys() == flat_done.keys()
    for name, before in flat_init.items():
        if name in ("embed_tokens/embedding", "lm_head/kernel"):
            assert np.abs(flat_done[name] - before).max() > 1e-6, name
        else:
            assert flat_done[name].tobytes() == before.tobytes(), name

    train.Trainer(make_config(tmp_path / "cut", total_steps=2, **common)).run()
    train.Trainer(make_config(tmp_path / "cut", total_steps=4, **common)).run()
    for a, b in zip(read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")):
        assert (a["step"], a["loss"], a["gradient_norm"]) == (b["step"], b["loss"], b["gradient_norm"])

    full = train.Trainer(make_config(tmp_path / "next", total_steps=1, mesh_dim="1,2,4",
                                     load_checkpoint=f"params::{tmp_path}/full/checkpoints/streaming_params_4"))
    full.run()
    assert read_metrics(tmp_path / "next")[0]["step"] == 1
    # Its optimizer state (embeddings only) cannot continue a full run: one line naming params::.
    cfg = make_config(tmp_path / "wrong", total_steps=5, mesh_dim="1,2,4",
                      load_checkpoint=f"trainstate::{tmp_path}/full/checkpoints/streaming_params_4")
    with pytest.raises(checkpoint.CheckpointError, match=r"--optimizer.trainable='embeddings'.*params::PATH"):
        train.Trainer(cfg).run()
