"""Soak test of preemption and resume (run by hand; not part of the test suite).

Trains a short run with dropout, forgetful causal masking and code-mixing on, kills it N times at
random moments with SIGKILL or SIGTERM (some kills aimed at the moment an asynchronous checkpoint
is being written), reruns the same command after each kill, and checks that every logged loss and
the final parameters equal those of an uninterrupted run. Prints a summary; exits 1 on a mismatch.

    python tools/soak.py --kills=8 --workdir=/tmp/soak

Every attempt is a fresh process, so a persistent JAX compilation cache (in the work directory)
keeps restarts quick; it does not change results.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "fcm_max_ratio": 0.2}
EXIT_PREEMPTED = 75  # easylm_align.preemption.EXIT_PREEMPTED (not imported: this process stays JAX-free)
TMP_SUFFIX = ".orbax-checkpoint-tmp"
KINDS = ("SIGTERM", "SIGKILL", "SIGKILL mid-save")  # taken in turn, in a random order


def train_command(out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "easylm_align.train", "--load_llama_config=demo",
            f"--update_llama_config={json.dumps(MODEL)}", f"--total_steps={args.steps}", "--log_freq=1",
            f"--save_model_freq={args.save_every}", f"--logger.output_dir={out}", "--logger.tensorboard=False",
            "--train_dataset.json_dataset.seq_length=64", "--train_dataset.json_dataset.batch_size=8",
            f"--train_dataset.text_processor.codemix_dict_path={REPO / 'dicts/hi-en.txt'}",
            "--train_dataset.text_processor.codemix_ratio=0.5"]


def environment(workdir: Path) -> dict[str, str]:
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(workdir / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("\n")]  # not a row being written


def checkpoints(out: Path) -> tuple[list[int], bool]:
    """Complete checkpoint steps, and whether a write is in progress (a temporary directory)."""
    directory = out / "checkpoints"
    names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
    done = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"streaming_params_(\d+)", n)))
    return done, any(n.endswith(TMP_SUFFIX) for n in names)


@dataclass
class Report:
    sigkill: int = 0
    sigkill_mid_save: int = 0
    sigterm: int = 0
    finished_before_signal: int = 0
    steps_lost_per_sigterm: list[int] = field(default_factory=list)
    steps_redone_per_sigkill: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 900) -> bool:
    """Polls `ready()` every millisecond; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if ready():
            return True
        if time.monotonic() > deadline:
            raise TimeoutError("the run made no progress")
        time.sleep(0.001)
    return False


def one_kill(out: Path, kind: str, args: argparse.Namespace, rng: random.Random, report: Report) -> bool:
    """Starts (or resumes) the run and kills it once (`kind`), a few steps after the step it resumes
    from; returns False when the run finished first."""
    start_step, launched = max(checkpoints(out)[0], default=0), time.time_ns()
    proc = subprocess.Popen(train_command(out, args), cwd=REPO, env=environment(args.workdir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = start_step + rng.randint(1, args.save_every * 2)

    def reached_target() -> bool:  # rows the killed attempt logged past its checkpoint are stale until
        metrics = out / "metrics.jsonl"  # the new one rewrites the file
        return (metrics.exists() and metrics.stat().st_mtime_ns > launched
                and (logged_steps(out)[-1:] or [0])[0] >= target)

    if kind == "SIGKILL mid-save":  # the first save after `target` steps, caught while it is written
        ready = lambda: reached_target() and checkpoints(out)[1]
    else:
        ready = reached_target
    if not wait_for(proc, ready):
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            report.problems.append(f"run exited {proc.returncode} unasked: {stderr[-2000:]}")
        report.finished_before_signal += 1
        return False
    if kind != "SIGKILL mid-save":
        time.sleep(rng.uniform(0, 0.3))  # anywhere in a step, a save, or logging
    proc.send_signal(signal.SIGTERM if kind == "SIGTERM" else signal.SIGKILL)
    stdout, stderr = proc.communicate()
    trained = max(logged_steps(out), default=start_step)
    saved, mid_save = checkpoints(out)
    resumes_at = max(saved, default=0)
    if kind == "SIGTERM":
        report.sigterm += 1
        if proc.returncode == 0:
            report.finished_before_signal += 1
            return False
        if proc.returncode != EXIT_PREEMPTED or "preempted:" not in stdout:
            report.problems.append(f"SIGTERM: exit {proc.returncode}, expected {EXIT_PREEMPTED}: {stderr[-2000:]}")
        report.steps_lost_per_sigterm.append(trained - resumes_at)
    else:
        report.sigkill += 1
        report.sigkill_mid_save += mid_save
        report.steps_redone_per_sigkill.append(trained - resumes_at)
    print(f"  {kind:16s} after step {trained:3d}: resumes at {resumes_at}"
          + (" (killed while a checkpoint was written)" if mid_save else ""), flush=True)
    return True


def finish(out: Path, args: argparse.Namespace) -> None:
    result = subprocess.run(train_command(out, args), cwd=REPO, env=environment(args.workdir),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run in {out} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def final_params(out: Path, steps: int) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    import numpy as np
    from easylm_align import checkpoint
    params = checkpoint.load_params_numpy(str(out / f"checkpoints/streaming_params_{steps}"))
    import jax
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def compare(reference: Path, soaked: Path, steps: int, report: Report) -> None:
    import numpy as np
    rows = {name: [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
            for name, path in (("reference", reference), ("soaked", soaked))}
    if [r["step"] for r in rows["soaked"]] != list(range(1, steps + 1)):
        report.problems.append(f"logged steps {[r['step'] for r in rows['soaked']]}")
    for a, b in zip(rows["reference"], rows["soaked"]):
        for key in ("loss", "accuracy", "gradient_norm", "learning_rate", "codemix/words_replaced"):
            if a.get(key) != b.get(key):
                report.problems.append(f"step {a['step']} {key}: {a.get(key)} vs {b.get(key)}")
    ref, soak = final_params(reference, steps), final_params(soaked, steps)
    report.problems += [f"final parameter {k} differs" for k in ref if not np.array_equal(ref[k], soak[k])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--save_every", type=int, default=4, help="--save_model_freq of the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/easylm_align_soak"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    rng, report = random.Random(args.seed), Report()
    started = time.monotonic()
    print("uninterrupted reference run ...", flush=True)
    finish(args.workdir / "reference", args)
    print(f"{args.kills} kills ...", flush=True)
    soaked = args.workdir / "soaked"
    kinds = [KINDS[i % len(KINDS)] for i in range(args.kills)]
    rng.shuffle(kinds)
    for kind in kinds:
        if not one_kill(soaked, kind, args, rng, report):
            break  # the run finished before this kill: --steps was too small for --kills
    finish(soaked, args)
    compare(args.workdir / "reference", soaked, args.steps, report)
    summary = {"kills": report.sigkill + report.sigterm, "sigkill": report.sigkill,
               "sigkill_while_saving": report.sigkill_mid_save, "sigterm": report.sigterm,
               "steps_lost_per_sigterm": report.steps_lost_per_sigterm,
               "steps_redone_per_sigkill": report.steps_redone_per_sigkill,
               "finished_before_the_signal": report.finished_before_signal,
               "losses_and_final_params_equal_reference": not report.problems,
               "minutes": round((time.monotonic() - started) / 60, 1)}
    print(json.dumps(summary, indent=1))
    for problem in report.problems[:20]:
        print("PROBLEM:", problem)
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
