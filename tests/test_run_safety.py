"""No silent wrong results (issue 20 §1-2): one trainer per output directory, a resume refused when
results-relevant flags changed, and checkpoints verified against the checksums recorded when saved.

Each case drives the trainer's command line on real files (a running trainer, a lock left by a
dead process, a flipped or truncated checkpoint file) and checks the one-line message and that
what was saved before (checkpoints, metrics) is intact. docs/RELIABILITY.md lists the cases."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT
from easylm_align import checkpoint, integrity, run_config, run_lock, train
from easylm_align.conversion.to_hf import export
from easylm_align.errors import ConfigError
from easylm_align.evaluation import runtime
from easylm_align.conversion import ConversionError
from easylm_align.tokenizer import ASSETS
from test_preemption import DROPOUT_FCM, compile_cache, signal_after_steps, stopped_step, train_args  # noqa: F401
from test_train import make_config, read_metrics


def run_train(args, env):
    return subprocess.run([sys.executable, "-m", "easylm_align.train", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def error_line(result) -> str:
    """The trainer's one-line error: the last line of stderr, which must start with 'error: '."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    return lines[-1]


def snapshot(out_dir) -> dict:
    """Everything a refusal must leave as it was: metrics and every checkpoint file's bytes."""
    files = {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted((out_dir / "checkpoints").rglob("*"))
             if p.is_file()}
    return {"metrics": (out_dir / "metrics.jsonl").read_text(), "files": files}


def wait_for_rows(proc, out_dir, rows):
    deadline = time.monotonic() + 300
    while not ((out_dir / "metrics.jsonl").exists() and len(read_metrics(out_dir)) >= rows):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_one_trainer_per_directory_a_stale_lock_and_a_changed_flag(tmp_path, compile_cache):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "easylm_align.train",
                              *train_args(out, 100_000, "--save_model_freq=2")], cwd=REPO_ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **compile_cache})
    try:
        wait_for_rows(first, out, 2)
        # A second trainer, with other flags, while the first trains: refused, naming the first.
        second = run_train(train_args(out, 100_000, "--train_dataset.json_dataset.seq_length=16"), compile_cache)
        assert error_line(second).startswith(
            f"error: --logger.output_dir={out} is in use by another trainer (pid {first.pid} on host "
            f"{socket.gethostname()}, started "), second.stderr[-2000:]
        assert first.poll() is None  # the first goes on
    finally:
        code, stdout, stderr = signal_after_steps(first, out, 0, signal.SIGTERM)
    assert code == 75, stderr[-3000:]
    stopped, path = stopped_step(stdout)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, stopped + 1))  # no row duplicated
    assert not (out / "trainer.lock").exists()
    before = snapshot(out)

    # A lock left by a process that died is replaced; then a changed flag refuses the resume.
    (out / "trainer.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                                  "start_time": "1", "started": "earlier"}))
    changed = run_train(train_args(out, stopped + 1, "--train_dataset.json_dataset.seq_length=16",
                                   "--optimizer.adamw_optimizer.lr=0.001"), compile_cache)
    assert "which is no longer running" in changed.stderr
    assert error_line(changed) == (
        f"error: --logger.output_dir={out} holds a run with other settings (checkpoint {path}): "
        "--optimizer.adamw_optimizer.lr: saved 0.002, now 0.001; --train_dataset.json_dataset.seq_length: saved 32, "
        "now 16. Start a new run with another --logger.output_dir, or continue this one with the new values by "
        "adding --resume_despite_changes=optimizer.adamw_optimizer.lr,train_dataset.json_dataset.seq_length")
    assert snapshot(out) == before and not (out / "trainer.lock").exists()

    # Accepting the changes by name resumes, and says from where.
    accepted = run_train(train_args(out, stopped + 1, "--train_dataset.json_dataset.seq_length=16",
                                    "--optimizer.adamw_optimizer.lr=0.001",
                                    "--resume_despite_changes=optimizer,train_dataset.json_dataset.seq_length"),
                         compile_cache)
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert f"resuming from step {stopped} of {out}\n" in accepted.stdout
    assert [r["step"] for r in read_metrics(out)] == list(range(1, stopped + 2))
    assert before["metrics"] in (out / "metrics.jsonl").read_text()


def flip(path, offset, count=4096):
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(b ^ 0xFF for b in data[offset:offset + count])
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def largest_params_file(ckpt):
    return max((p for p in (ckpt / "params").rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)


def damaged_copies(source, parent) -> dict:
    """Copies of a checkpoint, each with one fault: {name: (copy, file damaged)}."""
    faults = {"flipped": lambda c: largest_params_file(c), "truncated_data": lambda c: largest_params_file(c),
              "truncated_meta": lambda c: c / "meta/metadata", "truncated_METADATA": lambda c: c / "params/_METADATA"}
    copies = {}
    for name, which in faults.items():
        copy = parent / name
        shutil.copytree(source, copy)
        victim = which(copy)
        flip(victim, victim.stat().st_size // 4) if name == "flipped" else truncate(victim)
        copies[name] = (copy, str(victim.relative_to(copy)))
    return copies


def test_damaged_checkpoints_are_named_and_resume_falls_back_to_an_intact_one(tmp_path, compile_cache):
    out = tmp_path / "run"
    first = run_train(train_args(out, 4, "--save_milestone_freq=2"), compile_cache)
    assert first.returncode == 0, first.stderr[-3000:]
    original = read_metrics(out)
    step2, step4 = checkpoint.step_path(out, 2), checkpoint.step_path(out, 4)
    integrity.verify(step4)

    # Every reading path refuses each fault in one line naming the checkpoint and the file.
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                      checkpoint.load_params_numpy(str(step2)))
    for name, (copy, victim) in damaged_copies(step4, tmp_path / "copies").items():
        problem = "differs from its checksum when saved" if name == "flipped" else "bytes, "
        expected = f"checkpoint {copy} is damaged: {victim} "
        eval_cfg = run_config.default_config()
        eval_cfg.update_llama_config, eval_cfg.load_checkpoint = DROPOUT_FCM, f"params::{copy}"
        for read in (lambda: checkpoint.load_params_numpy(str(copy)),  # tools' reader
                     lambda: checkpoint.load_params(str(copy), abstract),  # the trainer's params::
                     lambda: runtime.load_model(eval_cfg),  # evaluate and evaluate_icl
                     lambda: export(str(copy), str(tmp_path / "hf"), str(ASSETS / "demo_tokenizer.model"))):
            with pytest.raises((checkpoint.CheckpointError, ConversionError)) as info:
                read()
            message = str(info.value)
            assert message.startswith(expected) and problem in message and "\n" not in message, message
        assert not (tmp_path / "hf").exists()
        # Without checksums (a checkpoint from before them), a fault that Orbax meets is still one line.
        (copy / integrity.MANIFEST).unlink()
        if name != "flipped":  # flipped bytes without checksums are what the checksums are for
            with pytest.raises(checkpoint.CheckpointError, match=rf"^checkpoint {copy} cannot be read \(") as info:
                checkpoint.load_params_numpy(str(copy)) if name != "truncated_meta" else checkpoint.read_meta(copy)
            assert "\n" not in str(info.value)

    # 4 KiB flipped in the newest checkpoint of the run: named, set aside, resumed from step 2.
    before = snapshot(out)
    flip(largest_params_file(step4), 0)
    resumed = run_train(train_args(out, 4, "--save_milestone_freq=2"), compile_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    aside = out / checkpoint.SET_ASIDE / step4.name
    lines = [line for line in resumed.stderr.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"checkpoint {step4} is damaged: {largest_params_file(aside).relative_to(aside)} differs from its checksum "
        f"when saved; moved to {aside}; resuming from the newest intact checkpoint {step2}"), resumed.stderr[-3000:]
    assert f"resuming from step 2 of {out}\n" in resumed.stdout
    assert "Metadata file does not exist" not in resumed.stderr  # Orbax's warning on every load, before
    again = read_metrics(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for old, new in zip(original, again):  # steps 3-4 redone from intact values: the same numbers
        assert all(old[k] == new[k] for k in ("loss", "accuracy", "gradient_norm", "learning_rate")), (old, new)
    integrity.verify(step4)  # the new step 4
    assert all(before["files"][str(p.relative_to(out))] == p.read_bytes() for p in step2.rglob("*") if p.is_file())

    # Only damaged checkpoints left: refused, nothing moved.
    only_damaged = tmp_path / "only_damaged"
    shutil.copytree(aside, checkpoint.step_path(only_damaged, 4))
    with pytest.raises(checkpoint.CheckpointError, match=rf"^no intact checkpoint in {only_damaged}/checkpoints: "
                                                         rf"checkpoint .* is damaged: .*Nothing was changed"):
        checkpoint.TrainCheckpointer(only_damaged, 0, 2)
    assert checkpoint.step_path(only_damaged, 4).is_dir()


def test_unsealed_newest_checkpoint_is_set_aside_for_the_sealed_one(tmp_path):
    """A kill between Orbax's commit and the seal leaves the newest checkpoint without checksums."""
    ckpt = checkpoint.TrainCheckpointer(tmp_path, 1, 0)
    state = {"step": np.int32(0)}
    for step in (1, 2):
        ckpt.save(step, {"w": np.full(8, float(step), np.float32)}, state, {"step": step})
        ckpt.wait()
    ckpt.close()
    (checkpoint.step_path(tmp_path, 2) / integrity.MANIFEST).unlink()
    shutil.copytree(checkpoint.step_path(tmp_path, 2), checkpoint.step_path(tmp_path, 1))  # as before the deletion
    integrity.seal(checkpoint.step_path(tmp_path, 1))
    again = checkpoint.TrainCheckpointer(tmp_path, 1, 0)
    assert again.latest_step() == again.verified == 1
    assert (tmp_path / checkpoint.SET_ASIDE / f"{checkpoint.STEP_PREFIX}_2").is_dir()
    again.close()


def test_nothing_to_train_is_said_or_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^--total_steps=0: nothing would be trained"):
        train.Trainer(make_config(tmp_path / "zero", total_steps=0))
    train.Trainer(make_config(tmp_path / "run", total_steps=2)).run()
    capsys.readouterr()
    train.Trainer(make_config(tmp_path / "run", total_steps=2)).run()  # the same command again
    assert f"nothing to train: {tmp_path / 'run'} is already at step 2 of --total_steps=2" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"^--total_steps=1: the run in .* is already at step 2"):
        train.Trainer(make_config(tmp_path / "run", total_steps=1)).run()
    cfg = make_config(tmp_path / "next", total_steps=2,
                      load_checkpoint=f"trainstate::{checkpoint.step_path(tmp_path / 'run', 2)}")
    with pytest.raises(ConfigError, match=r"is at step 2, not below --total_steps=2: nothing would be trained"):
        train.Trainer(cfg).run()


def test_a_lock_from_another_host_blocks_until_its_heartbeat_is_old(tmp_path):
    """A pid on another host cannot be checked: the holder's heartbeat (the file's mtime) decides."""
    lock_file = tmp_path / run_lock.LOCK_FILE
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "start_time": None, "started": "earlier"}))
    with pytest.raises(run_lock.DirectoryInUse, match=rf"pid 1 on host elsewhere.*if that run is no longer running, "
                                                       rf"delete {lock_file}"):
        run_lock.RunLock(tmp_path).acquire()
    old = time.time() - run_lock.STALE_AFTER_S - 60
    os.utime(lock_file, (old, old))
    lock = run_lock.RunLock(tmp_path)
    lock.acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()
