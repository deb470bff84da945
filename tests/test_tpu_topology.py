"""`--dry_run_topology`: the train step compiled by XLA's TPU compiler for a slice this host does not have.

The compile itself needs libtpu (`pip install "jax[tpu]"`), which the test environment does not
install; those tests run where it is installed and skip, saying so, elsewhere. They run the real
command line in a subprocess, so libtpu never loads into the test process.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from easylm_align import train, train_config
from easylm_align.errors import ConfigError
from easylm_align.model import attention

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'jax[tpu]')")
TINY = '{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}'


def dry_run_config(**flags):
    cfg = train_config.default_config()
    cfg.update_from_flattened_dict({"update_llama_config": TINY, "mesh_dim": "1,1,-1", **flags})
    return cfg


def test_auto_attention_passes_over_splash_for_a_length_it_cannot_take():
    # Model init and short evaluation rows on a TPU reach attention with such lengths.
    options = lambda length: attention.Options(0.0, False, jnp.bfloat16, seq_length=length)
    assert attention.resolve("auto", options(8), "tpu") == "xla"
    assert attention.resolve("auto", options(256), "tpu") == "splash"
    with pytest.raises(ConfigError, match="divisible by 128"):
        attention.resolve("splash", options(200), "tpu")


def test_topology_needs_dry_run_and_a_known_slice():
    with pytest.raises(ConfigError, match=r"--dry_run_topology=v4-8: it only compiles; add --dry_run=True"):
        train.Trainer(dry_run_config(dry_run_topology="v4-8"))
    with pytest.raises(ConfigError, match=r"--dry_run_topology='v4-7': use one of v2-8, v3-8, v4-8"):
        train.Trainer(dry_run_config(dry_run=True, dry_run_topology="v4-7"))


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed here")
def test_without_libtpu_the_error_says_what_to_install():
    with pytest.raises(ConfigError, match=r"--dry_run_topology=v3-8: compiling for a TPU needs libtpu; install it "
                                          r"with pip install 'jax\[tpu\]==\S+' \(no TPU is needed\)"):
        train.Trainer(dry_run_config(dry_run=True, dry_run_topology="v3-8"))


def run_train(*flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "easylm_align.train", "--dry_run=True", *flags],
                          capture_output=True, text=True, env=env, timeout=600)


@needs_libtpu
def test_tiny_model_compiles_for_a_v4_8_with_the_tpu_kernels():
    tiny_auto = json.dumps(dict(json.loads(TINY), scan_layers="auto"))  # the large presets' layout rule
    done = run_train("--dry_run_topology=v4-8", f"--update_llama_config={tiny_auto}", "--mesh_dim=1,-1,1",
                     "--train_dataset.json_dataset.seq_length=256", "--train_dataset.json_dataset.batch_size=8")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["platform"], report["devices"], report["device_kind"]) == ("tpu", 4, "TPU v4")
    assert report["mesh"] == {"dp": 1, "fsdp": 4, "mp": 1} and report["device_memory_gib"] == 32
    # No dropout or forgetful masking and a length splash takes: the TPU's own kernel, not the CPU's.
    assert (report["attention"], report["loss_kernel"]) == ("splash", "xla")
    assert report["scan_layers"] is False  # "auto" unrolls the blocks for a TPU
    assert report["memory_gib_per_device"]["peak"] > 0  # the TPU compiler's own figure


@needs_libtpu
def test_a_step_larger_than_the_device_is_refused_in_one_line():
    big = '{"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 1, "num_attention_heads": 64}'
    done = run_train("--dry_run_topology=v2-8", f"--update_llama_config={big}", "--mesh_dim=-1,1,1")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --dry_run: the train step does not fit a TPU v2: RESOURCE_EXHAUSTED"), last
    assert "Traceback" not in done.stderr

