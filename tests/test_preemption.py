"""Reliability of a run: SIGTERM/SIGINT save and exit 75, kills during async saves, the non-finite
policy, and unwritable or full output directories."""

import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT
from easylm_align import checkpoint, preemption, sharding, train
from test_train import TINY, make_config, read_metrics

ONE_LAYER = json.dumps({**json.loads(TINY), "num_hidden_layers": 1})  # compiles fastest
DROPOUT_FCM = json.dumps({**json.loads(ONE_LAYER), "resid_pdrop": 0.1, "attn_pdrop": 0.1, "fcm_max_ratio": 0.2})


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for this module's subprocesses: only the first compiles."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def train_args(out_dir, steps, *extra):
    return ["--update_llama_config=" + DROPOUT_FCM, f"--total_steps={steps}", "--log_freq=1",
            f"--logger.output_dir={out_dir}", "--logger.tensorboard=False",
            "--train_dataset.json_dataset.seq_length=32", "--train_dataset.json_dataset.batch_size=8", *extra]


def start_train(args, env):
    return subprocess.Popen([sys.executable, "-m", "easylm_align.train", *args], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})


def signal_after_steps(proc, out_dir, steps, sig):
    """Sends `sig` once `steps` steps are logged; returns (exit code, stdout, stderr)."""
    deadline = time.monotonic() + 300
    metrics = out_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Frozen first, so that the run cannot finish before the signal is handled; it arrives on SIGCONT.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def stopped_step(stdout):
    """The step and checkpoint the 'preempted:' line names."""
    line = next(line for line in stdout.splitlines() if line.startswith("preempted:"))
    path = line.split("checkpoint saved in ")[1].split(";")[0]
    return int(line.split("stopped after step ")[1].split(";")[0]), path


def flat(tree):
    return {sharding.path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sigterm_saves_the_step_it_stopped_at_and_the_rerun_resumes_exactly(tmp_path, compile_cache):
    steps, cut, ref = 12, tmp_path / "cut", tmp_path / "ref"
    code, stdout, stderr = signal_after_steps(start_train(train_args(cut, steps), compile_cache), cut, 2,
                                              signal.SIGTERM)
    assert code == preemption.EXIT_PREEMPTED, stderr[-3000:]
    stopped, path = stopped_step(stdout)
    assert 2 <= stopped < steps and path == str(cut / f"checkpoints/streaming_params_{stopped}")
    assert checkpoint.read_meta(path)["step"] == stopped
    assert [r["step"] for r in read_metrics(cut)] == list(range(1, stopped + 1))  # nothing trained is lost
    preempted_params = checkpoint.load_params_numpy(path)

    rerun = start_train(train_args(cut, steps), compile_cache)  # the same command
    assert rerun.wait(timeout=300) == 0, rerun.communicate()[1][-3000:]
    # Uninterrupted, saving every `stopped` steps while the next steps run (the arrays are donated to them).
    full = start_train(train_args(ref, steps, f"--save_milestone_freq={stopped}"), compile_cache)
    assert full.wait(timeout=300) == 0, full.communicate()[1][-3000:]
    for a, b in zip(read_metrics(ref), read_metrics(cut), strict=True):
        for key in ("step", "loss", "accuracy", "gradient_norm", "learning_rate"):
            assert a[key] == b[key], (a["step"], key)
    saved_while_training = flat(checkpoint.load_params_numpy(str(ref / f"checkpoints/streaming_params_{stopped}")))
    for name, value in flat(preempted_params).items():
        np.testing.assert_array_equal(saved_while_training[name], value, err_msg=name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigint_under_jax_distributed_stops_at_the_sync_point(tmp_path, compile_cache):
    """With jax.distributed, JAX's preemption service picks the step (every host stops there)."""
    distributed = ["--jax_distributed.initialize_jax_distributed=True", "--jax_distributed.num_processes=1",
                   "--jax_distributed.process_id=0", f"--jax_distributed.coordinator_address=127.0.0.1:{free_port()}"]
    proc = start_train(train_args(tmp_path, 400, *distributed), compile_cache)
    code, stdout, stderr = signal_after_steps(proc, tmp_path, 2, signal.SIGINT)
    assert code == preemption.EXIT_PREEMPTED, stderr[-3000:]
    stopped, path = stopped_step(stdout)
    assert "SIGINT received" in stderr and stopped < 400
    assert checkpoint.read_meta(path)["step"] == stopped == read_metrics(tmp_path)[-1]["step"]


KILLED_MID_SAVE = """
import os, signal, sys
import numpy as np
from easylm_align import checkpoint
ckpt = checkpoint.TrainCheckpointer(sys.argv[1], 1, 0)
state = {"step": np.int32(0)}
ckpt.save(1, {"w": np.full(16_000_000, 1.0, np.float32)}, state, {"step": 1})
ckpt.wait()
# 64 MB that do not compress: Orbax is still writing them when save() has returned.
ckpt.save(2, {"w": np.random.default_rng(0).random(16_000_000, np.float32)}, state, {"step": 2})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_during_an_async_save_leaves_the_previous_checkpoint(tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["streaming_params_1", "streaming_params_2.orbax-checkpoint-tmp"]  # killed mid-write
    ckpt = checkpoint.TrainCheckpointer(tmp_path, 1, 0)
    assert ckpt.latest_step() == 1
    target = {"w": jax.ShapeDtypeStruct((16_000_000,), np.float32)}
    params, state, meta = ckpt.restore_latest(target, {"step": jax.ShapeDtypeStruct((), np.int32)})
    assert meta == {"step": 1} and np.all(np.asarray(params["w"]) == 1.0)
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["streaming_params_1"]


def test_a_failed_save_names_itself_and_keeps_the_previous_checkpoint(tmp_path):
    """A file-size limit makes the write fail as a full disk does (EFBIG instead of ENOSPC)."""
    ckpt = checkpoint.TrainCheckpointer(tmp_path, 1, 0)
    state, weights = {"step": np.int32(0)}, np.random.default_rng(0).normal(size=(2, 1_000_000)).astype(np.float32)
    ckpt.save(1, {"w": weights[0]}, state, {"step": 1})
    ckpt.wait()
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
        ckpt.save(2, {"w": weights[1]}, state, {"step": 2})  # incompressible: the data file exceeds the limit
        with pytest.raises(checkpoint.CheckpointSaveError) as info:
            ckpt.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    message = str(info.value)
    assert f"writing checkpoint {tmp_path / 'checkpoints/streaming_params_2'} failed" in message
    assert "File too large" in message and "streaming_params_1 is intact" in message
    again = checkpoint.TrainCheckpointer(tmp_path, 1, 0)
    assert again.latest_step() == 1
    params, _, _ = again.restore_latest({"w": jax.ShapeDtypeStruct((1_000_000,), np.float32)},
                                        {"step": jax.ShapeDtypeStruct((), np.int32)})
    np.testing.assert_array_equal(np.asarray(params["w"]), weights[0])
    again.close()


def test_nonfinite_skip_leaves_weights_and_optimizer_unchanged_and_counts(tmp_path):
    # Warmup from 0: step 1 changes nothing, step 2 (lr 2.5e29) makes the weights so large that the
    # loss or gradient of step 3 overflows; under `skip` every later step is skipped, never applied.
    cfg = make_config(tmp_path, total_steps=4, update_llama_config=ONE_LAYER, save_milestone_freq=2,
                      nonfinite_policy="skip", optimizer__adamw_optimizer__lr=1e30,
                      optimizer__adamw_optimizer__lr_warmup_steps=4, optimizer__adamw_optimizer__clip_gradient=0.0,
                      optimizer__adamw_optimizer__weight_decay=0.0)
    t = train.Trainer(cfg)
    t.run()  # no TrainingDiverged: skipping is the policy
    rows = read_metrics(tmp_path)
    finite = [math.isfinite(r["loss"]) and math.isfinite(r["gradient_norm"]) for r in rows]
    assert finite[:2] == [True, True] and not any(finite[2:]), rows
    assert [r["nonfinite_skips"] for r in rows] == [0, 0, 1, 2]
    params_t, state_t = t._abstract_state()
    saved = {s: checkpoint.load_train_state(str(tmp_path / f"checkpoints/streaming_params_{s}"), params_t, state_t)
             for s in (2, 4)}
    (p2, s2, _), (p4, s4, _) = saved[2], saved[4]
    for name, value in flat((p2, s2["opt_state"])).items():
        np.testing.assert_array_equal(flat((p4, s4["opt_state"]))[name], value, err_msg=name)
    assert int(s4["step"]) == 4 and int(s4["nonfinite_skips"]) == 2
    assert not np.array_equal(np.asarray(s2["rng"]), np.asarray(s4["rng"]))  # the RNG moved on


def test_unwritable_output_dir_is_named_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError) as info:
        train.Trainer(make_config(tmp_path / "a_file/out")).run()
    assert f"--logger.output_dir={tmp_path / 'a_file/out'}: cannot write there" in str(info.value)
    assert "Not a directory" in str(info.value)
