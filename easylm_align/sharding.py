"""The device mesh and the partition rules, declared once.

The mesh has three axes, as in EasyLM: `dp` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded, ZeRO-3 style) and `mp` (tensor/model parallel, Megatron
style). Rules map parameter paths to mesh axes; the model itself never mentions devices. The batch
is sharded over (dp, fsdp). Where users outgrow one host, `jax.distributed` joins the hosts;
every host builds the same global batch and places only its own devices' rows of it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from easylm_align.errors import UserError
from easylm_align.tree_paths import path_str

MESH_AXES = ("dp", "fsdp", "mp")
BATCH_AXES = ("dp", "fsdp")

# (regex on the '/'-joined parameter path, spec for the unscanned parameter). First match wins.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("mp", "fsdp")),
    (r"attention/(wq|wk|wv)/kernel$", P("fsdp", "mp")),
    (r"attention/(wq|wk|wv)/bias$", P("mp")),
    (r"attention/wo/kernel$", P("mp", "fsdp")),
    (r"feed_forward/(w1|w3)/kernel$", P("fsdp", "mp")),
    (r"feed_forward/w2/kernel$", P("mp", "fsdp")),
    (r"norm/scale$", P(None)),
    (r"lm_head/kernel$", P("fsdp", "mp")),
)


# Logical activation axes (named in model/llama.py) → mesh axes. Between decoder blocks the residual
# stream is sharded over the batch axes and, along the sequence, over `mp`, so it is not
# replicated on every model-parallel device (XLA gathers the sequence for the mp-sharded matmuls).
ACTIVATION_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", "mp"),
    ("activation_embed", None),
    ("activation_heads", "mp"),  # attention heads, where a kernel runs per device (splash)
)


class ShardingError(UserError):
    pass


def parse_mesh_dim(mesh_dim: str, num_devices: int) -> tuple[int, int, int]:
    """'dp,fsdp,mp' with at most one -1, inferred from the device count."""
    try:
        dims = [int(x) for x in mesh_dim.split(",")]
    except ValueError:
        raise ShardingError(f"--mesh_dim={mesh_dim!r}: expected three integers 'dp,fsdp,mp', e.g. 1,1,-1") from None
    if len(dims) != 3 or dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
        raise ShardingError(f"--mesh_dim={mesh_dim!r}: expected three positive integers 'dp,fsdp,mp' "
                            "with at most one -1")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if num_devices % known:
            raise ShardingError(f"--mesh_dim={mesh_dim!r}: {num_devices} devices are not divisible by {known}")
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise ShardingError(f"--mesh_dim={mesh_dim!r} has {math.prod(dims)} slots but there are "
                            f"{num_devices} devices; make the product match or use -1 for one axis")
    return tuple(dims)


def make_mesh(mesh_dim: str = "1,-1,1", devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_dim(mesh_dim, len(devices))
    try:  # topology-aware placement when the devices allow it (TPU slices)
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - CPU or unusual topologies: plain order is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, path: str) -> P:
    """Drops mesh axes that do not divide a dimension (it is then replicated along them)."""
    if len(shape) == len(spec) + 1:  # scanned layers carry a leading layer axis
        spec = P(None, *spec)
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = mesh.shape[axis] if axis is not None else 1
        if axis is not None and dim % size:
            logging.warning("%s: dimension %d is not divisible by mesh axis %s=%d; replicating it",
                            path, dim, axis, size)
            axis = None
        fitted.append(axis)
    return P(*fitted)


@contextlib.contextmanager
def activation_rules(mesh: Mesh) -> Iterator[None]:
    """Inside: the model's logical activation constraints resolve to `mesh` (outside they are no-ops)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(ACTIVATION_RULES):
        yield


def partition_specs(tree: Any, mesh: Mesh, strict: bool = True) -> Any:
    """PartitionSpecs for a tree (arrays or ShapeDtypeStructs) from PARTITION_RULES.

    Optimizer states mirror the parameter tree, so their leaves' paths end with a parameter's path
    and get its rule; leaves no rule matches (step counters) are replicated unless `strict`.
    """
    def spec_for(path, leaf):
        name = path_str(path)
        if leaf.ndim:
            for pattern, spec in PARTITION_RULES:
                if re.search(pattern, name):
                    return _fit(spec, tuple(leaf.shape), mesh, name)
        if strict:
            raise ShardingError(f"no partition rule matches parameter {name!r}")
        return P()
    return jax.tree_util.tree_map_with_path(spec_for, tree)


def param_partition_specs(params: Any, mesh: Mesh) -> Any:
    return partition_specs(params, mesh, strict=True)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_partition_specs(params, mesh))


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """Shardings for optimizer/train state: as the matching parameter, else replicated."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), partition_specs(tree, mesh, strict=False))


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their target sharding: restore and init write shards in place."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["dp"] * mesh.shape["fsdp"]


def check_batch_divisible(batch_size: int, mesh: Mesh, flag: str) -> None:
    parts = data_parallel_size(mesh)
    if batch_size % parts:
        raise ShardingError(f"{flag}={batch_size} is not divisible by the data-parallel size dp*fsdp={parts} "
                            f"of mesh {dict(mesh.shape)}")


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places the global batch, which every host holds whole (data/pipeline.py), on the mesh.

    Each of this host's devices takes exactly the rows the batch sharding gives it, so no order of
    hosts or devices is assumed (a host's devices need not hold contiguous rows) and the rows a
    device trains on are the same for any number of hosts.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=np.asarray(v): v[index])
            for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------

def default_distributed_config() -> ConfigDict:
    """`--jax_distributed.*`: arguments of jax.distributed.initialize (TPU pods need none of them)."""
    return ConfigDict(dict(
        initialize_jax_distributed=False,
        coordinator_address="",
        num_processes=-1,
        process_id=-1,
        local_device_ids="",
    ))


def initialize_distributed(config: ConfigDict) -> None:
    if not config.initialize_jax_distributed:
        return
    kwargs: dict[str, Any] = {}
    if config.coordinator_address:
        kwargs["coordinator_address"] = config.coordinator_address
    if config.num_processes >= 0:
        kwargs["num_processes"] = config.num_processes
    if config.process_id >= 0:
        kwargs["process_id"] = config.process_id
    if config.local_device_ids:
        kwargs["local_device_ids"] = [int(x) for x in config.local_device_ids.split(",")]
    jax.distributed.initialize(**kwargs)
