"""TPU slices a `--dry_run` compiles for on a host without a TPU (`--dry_run_topology`).

With libtpu installed (`pip install "jax[tpu]"`, which runs on any x86-64 Linux host), XLA's TPU
compiler builds a program for a slice described by its topology alone: no TPU is needed to compile,
only to run (JAX's ahead-of-time compilation; MaxText's `train_compile` does the same). The compiled
train step's `memory_analysis()` is then the TPU compiler's own figure, where the CPU compiler's
(8 emulated devices) is only an estimate: the two fuse, hoist and assign buffers differently.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import jax

from easylm_align.errors import ConfigError


class Slice(NamedTuple):
    topology: str  # libtpu's topology name: generation and chip grid
    chip_config: str  # "megacore": the two TensorCores of a chip are one device
    chips_per_host: tuple[int, int, int]
    memory_gib: float  # high-bandwidth memory of one JAX device


SLICES = {
    "v2-8": Slice("v2:2x2", "default", (2, 2, 1), 8),
    "v3-8": Slice("v3:2x2", "default", (2, 2, 1), 16),
    "v4-8": Slice("v4:2x2x1", "megacore", (2, 2, 1), 32),
    "v4-16": Slice("v4:2x2x2", "megacore", (2, 2, 1), 32),
    "v4-32": Slice("v4:2x2x4", "megacore", (2, 2, 1), 32),
    "v5e-8": Slice("v5e:2x4", "default", (2, 4, 1), 16),
    "v5p-8": Slice("v5p:2x2x1", "megacore", (2, 2, 1), 95),
    "v6e-8": Slice("v6e:2x4", "default", (2, 4, 1), 32),
}


def get_slice(name: str) -> Slice:
    if name not in SLICES:
        raise ConfigError(f"--dry_run_topology={name!r}: use one of {', '.join(SLICES)}")
    return SLICES[name]


def devices(name: str) -> Sequence[jax.Device]:
    """The devices of slice `name`, for a mesh to compile on (they cannot run anything)."""
    spec = get_slice(name)
    # Off a TPU VM, libtpu would otherwise ask the cloud metadata server which TPU this host is; and
    # a compile holds no TPU, so it need not wait for another process's lock on libtpu.
    for variable, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", name),
                            ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(variable, value)
    from jax.experimental import topologies
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology,
                                                    chip_config_name=spec.chip_config,
                                                    chips_per_host_bounds=spec.chips_per_host, num_slices=1)
    except RuntimeError as e:
        if "TPU support not installed" not in str(e):
            raise
        raise ConfigError(f"--dry_run_topology={name}: compiling for a TPU needs libtpu; install it with "
                          f"pip install 'jax[tpu]=={jax.__version__}' (no TPU is needed)") from None
    return description.devices
