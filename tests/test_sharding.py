"""Mesh parsing, partition rules on every preset, and mesh-independence of the forward and train step.

The conftest emulates 8 CPU devices, shaped like a TPUv3-8. Preset models are only ever traced with
`jax.eval_shape`; the numeric tests use a tiny LLaMA.
"""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from easylm_align import model, optimizer, sharding, train, train_config
from easylm_align.errors import UserError
from easylm_align.sharding import ShardingError
from easylm_align.tree_paths import path_str

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def test_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py should emulate 8 CPU devices"


# ----------------------------------------------------------------------------------------------
# --mesh_dim
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mesh_dim, want", [
    ("1,-1,1", (1, 8, 1)),
    ("-1,2,2", (2, 2, 2)),
    ("1,4,-1", (1, 4, 2)),
    ("2,2,2", (2, 2, 2)),
    (" 1, 1, 8", (1, 1, 8)),
])
def test_parse_mesh_dim(mesh_dim, want):
    assert sharding.parse_mesh_dim(mesh_dim, 8) == want


@pytest.mark.parametrize("mesh_dim", [
    "a,b,c", "", "1,8", "1,1,1,8", "1,-1,-1", "0,8,1", "1,-2,-4", "1,2.0,4",  # malformed
    "1,3,-1",  # 8 devices do not split by 3
    "2,2,1", "2,2,4",  # product is not the device count
])
def test_parse_mesh_dim_rejects(mesh_dim):
    with pytest.raises(ShardingError, match="--mesh_dim"):
        sharding.parse_mesh_dim(mesh_dim, 8)
    assert issubclass(ShardingError, UserError)  # train.main reports UserErrors in one line


def test_make_mesh():
    mesh = sharding.make_mesh("2,2,-1")
    assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == {"dp": 2, "fsdp": 2, "mp": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    single = sharding.make_mesh("1,1,1", devices=jax.devices()[:1])
    assert single.devices.size == 1


# ----------------------------------------------------------------------------------------------
# Partition rules on every preset (shapes only)
# ----------------------------------------------------------------------------------------------

# What every parameter of docs/DESIGN.md's tree should get, by the end of its path.
EXPECTED_SPECS = {
    "embed_tokens/embedding": ("mp", "fsdp"),
    "attention/wq/kernel": ("fsdp", "mp"),
    "attention/wk/kernel": ("fsdp", "mp"),
    "attention/wv/kernel": ("fsdp", "mp"),
    "attention/wo/kernel": ("mp", "fsdp"),
    "attention/wq/bias": ("mp",),  # Qwen2's
    "attention/wk/bias": ("mp",),
    "attention/wv/bias": ("mp",),
    "feed_forward/w1/kernel": ("fsdp", "mp"),
    "feed_forward/w3/kernel": ("fsdp", "mp"),
    "feed_forward/w2/kernel": ("mp", "fsdp"),
    "attention_norm/scale": (None,),
    "ffn_norm/scale": (None,),
    "norm/scale": (None,),
    "lm_head/kernel": ("fsdp", "mp"),
}


def expected_spec(name):
    matches = [spec for key, spec in EXPECTED_SPECS.items() if name == key or name.endswith("/" + key)]
    assert len(matches) == 1, f"unexpected parameter {name}"
    return matches[0]


UNSCANNED_LAYERS = 2  # every layer has the same shapes; tracing 80 unrolled layers only costs time


@pytest.fixture(scope="module")
def preset_shapes():
    shapes = {}
    for name in model.LLAMA_PRESETS:
        for scan in (False, True):
            fields = {"scan_layers": scan} if scan else {"scan_layers": False, "num_hidden_layers": UNSCANNED_LAYERS}
            m = model.build_model(model.get_llama_config(name, json.dumps(fields)))
            shapes[name, scan] = jax.eval_shape(lambda r, m=m: model.init_params(m, r), jax.random.PRNGKey(0))
    return shapes


@pytest.fixture(scope="module")
def mesh_124():
    return sharding.make_mesh("1,2,4")


@pytest.mark.parametrize("name", sorted(model.LLAMA_PRESETS))
def test_every_preset_parameter_matches_its_rule(name, preset_shapes, mesh_124):
    config = model.get_llama_config(name)
    flat = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(preset_shapes[name, False])[0]}
    per_layer = 9 + 3 * config.attention_bias  # Qwen2's q/k/v biases
    assert len(flat) == per_layer * UNSCANNED_LAYERS + 2 + (not config.tie_word_embeddings)
    specs = sharding.param_partition_specs(preset_shapes[name, False], mesh_124)  # strict: every leaf has a rule
    flat_specs = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))[0]}
    assert flat_specs.keys() == flat.keys()
    for path, spec in flat_specs.items():
        assert len(spec) == flat[path].ndim
        assert tuple(spec) == expected_spec(path), path  # every preset's dims divide (fsdp=2, mp=4)

    # Scanned layout: the same rule with a leading (replicated) layer axis.
    scanned = sharding.param_partition_specs(preset_shapes[name, True], mesh_124)
    for path, spec in ((path_str(p), s) for p, s in jax.tree_util.tree_flatten_with_path(
            scanned, is_leaf=lambda x: isinstance(x, P))[0]):
        if path.startswith("layers/"):
            unscanned = flat_specs["layers_0/" + path[len("layers/"):]]
            assert tuple(spec) == (None, *unscanned), path
        else:
            assert spec == flat_specs[path], path


def test_unknown_parameter_has_no_rule(mesh_124):
    tree = {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((8, 8), jnp.float32)},
            "adapter": {"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32)}}
    with pytest.raises(ShardingError, match="adapter/kernel"):
        sharding.param_partition_specs(tree, mesh_124)
    # Train state is lenient: leaves no rule matches (counters) are replicated.
    assert sharding.partition_specs(tree, mesh_124, strict=False)["adapter"]["kernel"] == P()


def test_non_divisible_dims_are_replicated(mesh_124, caplog):
    config = model.get_llama_config("debug", json.dumps(dict(TINY, vocab_size=250, intermediate_size=90)))
    m = model.build_model(config)
    shapes = jax.eval_shape(lambda r: model.init_params(m, r), jax.random.PRNGKey(0))
    with caplog.at_level(logging.WARNING):
        specs = sharding.param_partition_specs(shapes, mesh_124)
    assert specs["embed_tokens"]["embedding"] == P(None, "fsdp")   # 250 % mp=4
    assert specs["lm_head"]["kernel"] == P("fsdp", None)
    ff = specs["layers_0"]["feed_forward"]
    assert ff["w1"]["kernel"] == P("fsdp", None) and ff["w3"]["kernel"] == P("fsdp", None)  # 90 % 4
    assert ff["w2"]["kernel"] == P(None, "fsdp")
    assert specs["layers_0"]["attention"]["wq"]["kernel"] == P("fsdp", "mp")  # 64 divides: untouched
    assert "embed_tokens/embedding" in caplog.text and "feed_forward/w2/kernel" in caplog.text
    # The fitted shardings really place arrays of those shapes.
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    placed = jax.device_put(params, sharding.param_shardings(shapes, mesh_124))
    assert placed["embed_tokens"]["embedding"].sharding.spec == P(None, "fsdp")
    # Scanned: the leading layer axis stays replicated, the rest is fitted the same way.
    scanned_m = model.build_model(model.get_llama_config(
        "debug", json.dumps(dict(TINY, vocab_size=250, intermediate_size=90, scan_layers=True))))
    scanned = sharding.param_partition_specs(
        jax.eval_shape(lambda r: model.init_params(scanned_m, r), jax.random.PRNGKey(0)), mesh_124)
    assert scanned["layers"]["feed_forward"]["w2"]["kernel"] == P(None, None, "fsdp")


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------

def test_check_batch_divisible_names_the_flag():
    mesh = sharding.make_mesh("2,2,2")  # data-parallel size 4
    sharding.check_batch_divisible(8, mesh, "--train_dataset.json_dataset.batch_size")
    with pytest.raises(ShardingError, match=r"--train_dataset\.json_dataset\.batch_size=6"):
        sharding.check_batch_divisible(6, mesh, "--train_dataset.json_dataset.batch_size")
    with pytest.raises(ShardingError, match=r"--eval_dataset\.json_dataset\.batch_size"):
        sharding.check_batch_divisible(2, mesh, "--eval_dataset.json_dataset.batch_size")
    sharding.check_batch_divisible(3, sharding.make_mesh("1,1,8"), "--x")  # pure model parallel: anything


def test_host_batch_is_sharded_over_data_axes():
    mesh = sharding.make_mesh("2,2,2")
    batch = {"input_tokens": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    placed = sharding.host_batch_to_global(batch, mesh)["input_tokens"]
    assert placed.sharding.spec == P(("dp", "fsdp"))
    np.testing.assert_array_equal(np.asarray(placed), batch["input_tokens"])
    assert {s.data.shape for s in placed.addressable_shards} == {(2, 4)}


def test_each_device_takes_its_own_rows_of_the_global_batch_in_any_device_order():
    # Devices in an order where no block of consecutive device ids holds consecutive rows (as a
    # host's devices may lie on a pod): each device must still hold exactly the rows its index names.
    devices = np.asarray(jax.devices())[[5, 2, 7, 0, 3, 6, 1, 4]]
    mesh = sharding.make_mesh("4,1,2", list(devices))
    batch = {"input_tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    placed = sharding.host_batch_to_global(batch, mesh)["input_tokens"]
    np.testing.assert_array_equal(np.asarray(placed), batch["input_tokens"])
    for shard in placed.addressable_shards:
        np.testing.assert_array_equal(shard.data, batch["input_tokens"][shard.index])
    assert placed.sharding.devices_indices_map((8, 3))[jax.devices()[5]][0] == slice(0, 2)


# ----------------------------------------------------------------------------------------------
# The same numbers on every mesh
# ----------------------------------------------------------------------------------------------

class _NoCheckpoint:
    def latest_step(self):
        return None


def trainer_on(mesh_dim):
    """A Trainer for the tiny model, without tokenizer or data: the pieces `Trainer.__init__` builds
    from the same flags. A 1-device mesh for '1,1,1', otherwise all 8 devices."""
    cfg = train_config.default_config()
    cfg.mesh_dim = mesh_dim
    cfg.update_llama_config = json.dumps(dict(TINY, resid_pdrop=0.1, fcm_min_ratio=0.1, fcm_max_ratio=0.3))
    opt = cfg.optimizer.adamw_optimizer
    opt.init_lr, opt.lr, opt.lr_warmup_steps, opt.lr_decay_steps = 1e-3, 1e-2, 2, 10  # step 0 moves weights
    trainer = train.Trainer.__new__(train.Trainer)
    trainer._abstract = None  # what __init__ would set
    trainer.cfg = cfg
    devices = jax.devices()[:1] if mesh_dim == "1,1,1" else None
    trainer.mesh = sharding.make_mesh(cfg.mesh_dim, devices)
    trainer.llama_config = model.get_llama_config(cfg.load_llama_config, cfg.update_llama_config,
                                                  cfg.llama.to_dict())
    trainer.model = model.build_model(trainer.llama_config, cfg.dtype, cfg.param_dtype)
    trainer.tx, trainer.current_lr = optimizer.build(cfg.optimizer)
    return trainer


def make_batch(batch_size=8, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY["vocab_size"], size=(batch_size, seq + 1)).astype(np.int32)
    segment_ids = np.zeros((batch_size, seq), np.int32)
    positions = np.zeros((batch_size, seq), np.int32)
    for row in range(batch_size):  # two packed examples, then padding
        a, b = rng.integers(3, 9), rng.integers(3, 8)
        segment_ids[row, :a], segment_ids[row, a:a + b] = 1, 2
        positions[row, :a], positions[row, a:a + b] = np.arange(a), np.arange(b)
    return {"input_tokens": tokens[:, :-1], "target_tokens": tokens[:, 1:],
            "loss_masks": (segment_ids != 0).astype(np.float32), "segment_ids": segment_ids,
            "positions": positions}


def run_on_mesh(mesh_dim, steps=2):
    """Initial params, forward logits and `steps` train steps, wired the way Trainer.run wires them."""
    trainer = trainer_on(mesh_dim)
    mesh = trainer.mesh
    params, state = trainer._build_state(_NoCheckpoint())  # sets trainer.param_sh / state_sh
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    train_step = jax.jit(trainer._train_step, in_shardings=(trainer.param_sh, trainer.state_sh, batch_sh),
                         out_shardings=(trainer.param_sh, trainer.state_sh, repl), donate_argnums=(0, 1))
    forward = jax.jit(lambda p, b: trainer.model.apply(
        {"params": p}, b["input_tokens"], positions=b["positions"], segment_ids=b["segment_ids"]).logits,
        in_shardings=(trainer.param_sh, batch_sh), out_shardings=repl)
    out = {"mesh": mesh, "init": jax.device_get(params), "param_sh": trainer.param_sh, "state_sh": trainer.state_sh,
           "init_shardings": jax.tree_util.tree_map(lambda x: x.sharding, params),
           "state_shardings": jax.tree_util.tree_map(lambda x: x.sharding, state), "steps": []}
    batch = sharding.host_batch_to_global(make_batch(), mesh)
    out["logits"] = np.asarray(forward(params, batch))
    for step in range(steps):
        params, state, metrics = train_step(params, state, sharding.host_batch_to_global(make_batch(seed=step), mesh))
        out["steps"].append({"params": jax.device_get(params), "metrics": jax.device_get(metrics)})
    out["final_shardings"] = jax.tree_util.tree_map(lambda x: x.sharding, params)
    out["step"] = int(state["step"])
    return out


@pytest.fixture(scope="module")
def single_device():
    return run_on_mesh("1,1,1")


def assert_trees_close(got, want, atol):
    flat_got = dict((path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(got)[0])
    flat_want = dict((path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(want)[0])
    assert flat_got.keys() == flat_want.keys()
    for name in flat_want:
        np.testing.assert_allclose(flat_got[name], flat_want[name], rtol=1e-5, atol=atol, err_msg=name)


def test_single_device_run_learns(single_device):
    metrics = [s["metrics"] for s in single_device["steps"]]
    assert all(np.isfinite(m["loss"]) and m["gradient_norm"] > 0 for m in metrics)
    assert single_device["step"] == 2
    moved = max(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(single_device["steps"][0]["params"]),
        jax.tree_util.tree_leaves(single_device["init"])))
    assert moved > 1e-4


@pytest.mark.parametrize("mesh_dim", ["1,4,2", "2,2,2"])
def test_same_numbers_on_every_mesh(mesh_dim, single_device):
    run = run_on_mesh(mesh_dim)
    mesh = run["mesh"]
    assert mesh.devices.size == 8
    # Params and optimizer state live where the rules say, before and after the step.
    for shardings in (run["init_shardings"], run["final_shardings"]):
        for got, want in zip(jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(run["param_sh"])):
            assert got.is_equivalent_to(want, 2), (got, want)
    emb = run["final_shardings"]["embed_tokens"]["embedding"]
    assert isinstance(emb, NamedSharding) and emb.spec == P("mp", "fsdp")
    mu = optax.tree_utils.tree_get(run["state_shardings"]["opt_state"], "mu")["layers_0"]["attention"]["wq"]["kernel"]
    assert mu.spec == P("fsdp", "mp")

    # The same initial params (sharded init), forward, and train steps as on one device.
    assert_trees_close(run["init"], single_device["init"], atol=0)
    np.testing.assert_allclose(run["logits"], single_device["logits"], rtol=1e-5, atol=1e-5)
    for got, want in zip(run["steps"], single_device["steps"]):
        for key in ("loss", "accuracy", "gradient_norm", "learning_rate", "loss_tokens"):
            np.testing.assert_allclose(got["metrics"][key], want["metrics"][key], rtol=1e-5, atol=1e-6, err_msg=key)
        # Adam divides each gradient element by its own scale, so an element whose gradient is near
        # zero moves by a visibly different fraction of the learning rate when the mesh sums in
        # another order; the loss and the gradient norm are held to 1e-5 above.
        assert_trees_close(got["params"], want["params"], atol=3e-5)
