"""Host count and mesh changes: the same batches, losses and checkpoints whatever runs the steps.

Two real processes × 4 CPU devices, joined by `jax.distributed` (coordinator on 127.0.0.1, gloo
collectives), train the steps one process × 8 devices trains, with dropout on; checkpoints written
on mesh 1,4,2 (by one process and by two) resume on other meshes, on one device, and on another
number of processes.

Tolerances: learning rates, data statistics and the data position must be equal, and restored
parameters equal to the saved ones, bit for bit. Sums across devices are taken in an order that
depends on the mesh and on the collectives (gloo across processes), so losses, accuracies and
gradient norms may differ by LOSS_RTOL (a few float32 ulps) and trained parameters by PARAM_ATOL
(a few ulps of weights of size ~0.1). Measured here: every loss bitwise equal but one (1 ulp, on
mesh 8,1,1); parameters of the two-process run at most 2 ulps (4e-9) off in ~1% of the weights.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import safetensors.numpy

from conftest import REPO_ROOT
from easylm_align import checkpoint, integrity, model, train, train_config
from easylm_align.data import pipeline
from easylm_align.conversion.to_hf import export
from easylm_align.conversion.hf_mapping import tensor_specs
from easylm_align.sharding import path_str
from easylm_align.tokenizer import ASSETS

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": 1, "vocab_size": 4096, "resid_pdrop": 0.1, "embd_pdrop": 0.1}
MESH, STEPS, SAVED = "1,4,2", 4, 2  # the checkpoint of step SAVED is resumed to STEPS
PROCESS_TIMEOUT = 300  # seconds; a process still running then is killed and the test fails
LOSS_RTOL, PARAM_ATOL = 1e-6, 1e-7
EXACT, CLOSE = ("learning_rate", "data/examples", "data/epoch"), ("loss", "accuracy", "gradient_norm")


def run_flags(out_dir, mesh=MESH, steps=STEPS) -> dict:
    """The run's flags by dotted name: given to the trainer in-process and on command lines alike."""
    return {"update_llama_config": json.dumps(TINY), "mesh_dim": mesh, "total_steps": steps, "log_freq": 1,
            "save_milestone_freq": SAVED, "logger.output_dir": str(out_dir), "logger.tensorboard": False,
            "train_dataset.json_dataset.seq_length": 16, "train_dataset.json_dataset.batch_size": 8}


def config(out_dir, mesh=MESH, steps=STEPS):
    cfg = train_config.default_config()
    cfg.update_from_flattened_dict(run_flags(out_dir, mesh, steps))
    return cfg


def command(out_dir, mesh=MESH, steps=STEPS, **extra) -> list[str]:
    flags = {**run_flags(out_dir, mesh, steps), **extra}
    return [sys.executable, "-m", "easylm_align.train", *(f"--{k}={v}" for k, v in flags.items())]


def cpu_env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


class Processes:
    """Commands started together in the background; `wait` bounds them in time, and if one fails
    or time runs out, kills the rest and fails the test with their logs."""

    def __init__(self, commands: list[list[str]], env: dict, log_dir):
        self.log_paths = [log_dir / f"process_{i}.log" for i in range(len(commands))]
        self.deadline = time.monotonic() + PROCESS_TIMEOUT
        self.procs = []
        for cmd, path in zip(commands, self.log_paths):
            with open(path, "w") as log:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

    def wait(self) -> None:
        try:
            while any(p.poll() is None for p in self.procs) and time.monotonic() < self.deadline:
                if any(p.poll() not in (None, 0) for p in self.procs):
                    break  # the others would wait for the failed one in a collective
                time.sleep(0.2)
        finally:
            self.kill()
        codes = [p.returncode for p in self.procs]
        if codes != [0] * len(codes):
            tails = "\n".join(f"--- process {i} (exit {c}):\n{path.read_text()[-3000:]}"
                              for i, (c, path) in enumerate(zip(codes, self.log_paths)))
            pytest.fail(f"exit codes {codes} (negative: killed after {PROCESS_TIMEOUT} s or as another failed)\n{tails}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out_dir) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


def step_dir(out_dir, step: int):
    return out_dir / "checkpoints" / f"{checkpoint.STEP_PREFIX}_{step}"


def flat_params(path) -> dict[str, np.ndarray]:
    tree = checkpoint.load_params_numpy(str(path))
    return {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_params(got: dict, want: dict, atol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)


def assert_same_steps(got: dict, want: dict, steps) -> None:
    for step in steps:
        for key in EXACT:
            assert got[step][key] == want[step][key], (step, key)
        for key in CLOSE:
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=LOSS_RTOL, err_msg=f"step {step} {key}")


def rewrite_position(out_dir, position) -> None:
    """Replaces the data position of the checkpoint of step SAVED by `position(saved one)`."""
    meta_file = step_dir(out_dir, SAVED) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, dataset=position(meta["dataset"]))))
    integrity.seal(step_dir(out_dir, SAVED))  # as that format's trainer would have sealed it


def resume_dir(source, parent, name: str):
    """A new run directory holding only the source run's checkpoint of step SAVED (and its metrics)."""
    out = parent / name
    shutil.copytree(step_dir(source, SAVED), step_dir(out, SAVED))
    return out


# The subprocess runs start first and train while this process does its own runs (CI has 2 cores).

@pytest.fixture(scope="module")
def two_hosts_running(tmp_path_factory):
    """Steps 1-2 on two processes × 4 devices, mesh 1,4,2."""
    out = tmp_path_factory.mktemp("two_hosts")
    port = free_port()
    procs = Processes([command(out, steps=SAVED, **{
        "jax_distributed.initialize_jax_distributed": True, "jax_distributed.coordinator_address": f"127.0.0.1:{port}",
        "jax_distributed.num_processes": 2, "jax_distributed.process_id": i}) for i in range(2)], cpu_env(4), out)
    yield out, procs
    procs.kill()


@pytest.fixture(scope="module")
def one_host(tmp_path_factory, two_hosts_running):
    """The uninterrupted run: one process, 8 devices, mesh 1,4,2; checkpoints of steps 2 and 4 kept."""
    out = tmp_path_factory.mktemp("one_host")
    train.Trainer(config(out)).run()
    return out


@pytest.fixture(scope="module")
def two_hosts(two_hosts_running, one_host):
    out, procs = two_hosts_running
    procs.wait()
    return out


@pytest.fixture(scope="module")
def one_device_running(tmp_path_factory, one_host):
    """The one-host checkpoint of step 2 resumed by a process with one device (mesh 1,1,1)."""
    out = resume_dir(one_host, tmp_path_factory.mktemp("one_device"), "run")
    procs = Processes([command(out, mesh="1,1,1")], cpu_env(1), out.parent)
    yield out, procs
    procs.kill()


def test_two_hosts_train_exactly_as_one(one_host, two_hosts):
    assert_same_steps(metrics(two_hosts), metrics(one_host), range(1, SAVED + 1))
    assert_same_params(flat_params(step_dir(two_hosts, SAVED)), flat_params(step_dir(one_host, SAVED)), PARAM_ATOL)
    # One data position for all hosts, saved once, the same as one host's.
    saved = checkpoint.read_meta(step_dir(two_hosts, SAVED))["dataset"]
    assert saved == checkpoint.read_meta(step_dir(one_host, SAVED))["dataset"]
    assert saved["next_record"] > 0


def export_matches(ckpt, tmp_path) -> None:
    """convert_to_hf writes every tensor of the checkpoint, as stored."""
    out = export(str(ckpt), str(tmp_path / f"hf_{ckpt.parent.parent.name}"), str(ASSETS / "demo_tokenizer.model"),
                 dtype="fp32")
    exported = {}
    for shard in out.glob("*.safetensors"):
        exported.update(safetensors.numpy.load_file(str(shard)))
    params = flat_params(ckpt)
    config = model.get_llama_config("demo", json.dumps(TINY))
    for spec in tensor_specs(config):
        want = params[spec.ours].T if spec.transpose else params[spec.ours]
        np.testing.assert_array_equal(exported[spec.hf], want, err_msg=spec.hf)


@pytest.mark.parametrize("mesh, source", [("2,2,2", "two_hosts"), ("1,1,8", "one_host"), ("8,1,1", "old_one_host")])
def test_resume_on_another_mesh_and_host_count(mesh, source, one_host, one_device_running, request, tmp_path):
    """2,2,2 resumes the two-process checkpoint in one process; 8,1,1 a checkpoint in the format
    that saved one data position per host, written by one host (`{"0": position}`)."""
    origin = request.getfixturevalue("one_host" if source == "old_one_host" else source)
    out = resume_dir(origin, tmp_path, mesh)
    if source == "old_one_host":
        rewrite_position(out, lambda position: {"0": position})
    cfg = config(out, mesh)
    trainer = train.Trainer(cfg)
    params, _ = trainer._build_state(checkpoint.TrainCheckpointer(out, 0, 0))
    restored = {path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert_same_params(restored, flat_params(step_dir(origin, SAVED)))
    del params
    train.Trainer(cfg).run()
    assert_same_steps(metrics(out), metrics(one_host), range(SAVED + 1, STEPS + 1))
    assert_same_params(flat_params(step_dir(out, STEPS)), flat_params(step_dir(one_host, STEPS)), PARAM_ATOL)
    export_matches(step_dir(out, STEPS), tmp_path)


def test_resume_on_one_device(one_device_running, one_host, tmp_path):
    out, procs = one_device_running
    procs.wait()
    assert_same_steps(metrics(out), metrics(one_host), range(SAVED + 1, STEPS + 1))
    assert_same_params(flat_params(step_dir(out, STEPS)), flat_params(step_dir(one_host, STEPS)), PARAM_ATOL)
    export_matches(step_dir(out, STEPS), tmp_path)


def test_a_position_saved_per_host_by_several_hosts_is_refused(two_hosts, tmp_path):
    """The former layout saved one position per host; with two hosts no exact resume exists."""
    out = resume_dir(two_hosts, tmp_path, "old_two_hosts")
    rewrite_position(out, lambda position: {"0": position, "1": position})
    where = re.escape(str(step_dir(out, SAVED)))
    with pytest.raises(pipeline.DataError, match=rf"checkpoint {where}: .* by 2 hosts.* cannot be resumed exactly"
                                                 rf".*--load_checkpoint=trainstate::{where}$"):
        train.Trainer(config(out)).run()
    assert (step_dir(out, SAVED) / "params").is_dir()  # nothing lost
    assert not step_dir(out, STEPS).exists()
