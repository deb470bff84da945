"""Running a sweep: for each value, train (or resume) in a subprocess, then evaluate in another.

Each run is its own process because the trainer and the evaluator own the devices while they run.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, TextIO

from ml_collections import ConfigDict

from easylm_align import config, run_config
from easylm_align.evaluate import default_eval_config
from easylm_align.tools.sweep import state
from easylm_align.tools.sweep.plan import Plan
from easylm_align.tools.sweep.report import Result, write_summary


def train_command(plan: Plan, value: str) -> list[str]:
    return [sys.executable, "-m", "easylm_align.train", *plan.train_argv, f"--{plan.param}={value}",
            f"--logger.output_dir={plan.run_dir(value)}"]


def eval_command(cfg: ConfigDict, ckpt: Path, eval_cfg: ConfigDict, report: Path) -> list[str]:
    """The evaluator with the run's model flags and the sweep's --eval.* flags."""
    model = dict(run_config.model_part(cfg), load_checkpoint=f"params::{ckpt}")
    del model["jax_distributed"]  # the evaluator runs on this host, not in the trainer's cluster
    return [sys.executable, "-m", "easylm_align.evaluate", *config.to_flags(model),
            *config.to_flags({"eval": eval_cfg}, {"eval": default_eval_config()}), f"--eval.output={report}"]


def _run_logged(cmd: Sequence[str], log: Path) -> int:
    """Runs `cmd`, appending its output to `log` (one header line per attempt); returns its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def _log_tail(log: Path, n: int = 15) -> tuple[str, str]:
    """The last `n` lines of a log, and its last `error:` line (or its last line)."""
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return "\n".join(lines[-n:]), (errors[-1] if errors else (lines[-1] if lines else ""))


def _report_failure(r: Result, status: str, note: str, log: Path, out: TextIO) -> None:
    r.status, r.note = status, note
    tail, _ = _log_tail(log)
    what = "training" if status == "train_failed" else "evaluation"
    print(f"  error: {what} failed ({note}); last lines of {log}:\n" +
          "\n".join("    " + line for line in tail.splitlines()), file=out)


def run_sweep(plan: Plan, dry_run: bool = False, out: Optional[TextIO] = None) -> int:
    """Trains and evaluates every value; returns the exit status (0 all ok, 1 some value failed).
    Progress goes to `out` (stdout)."""
    out = out or sys.stdout
    results = [Result(v, plan.run_dir(v)) for v in plan.values]
    if dry_run:
        _print_dry_run(plan, results, out)
        return 0
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    if not plan.task:
        print("note: no --eval.squad_file; runs are trained but not evaluated", file=out)
    for i, result in enumerate(results, 1):
        print(f"[{i}/{len(results)}] {plan.param}={result.value}: {result.run_dir}", file=out, flush=True)
        _run_one(plan, result, out)
        write_summary(plan.sweep_dir, plan.param, results, plan.task)
    failed = [r for r in results if r.status != "ok"]
    print(f"sweep: {len(results) - len(failed)}/{len(results)} ok; results in {plan.sweep_dir / 'sweep.csv'}, "
          f"{plan.sweep_dir / 'sweep.md'}, {plan.sweep_dir / 'sweep.png'}", file=out)
    for r in failed:
        print(f"error: {plan.param}={r.value}: {r.status}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


def _print_dry_run(plan: Plan, results: list[Result], out: TextIO) -> None:
    for r in results:
        cfg = plan.configs[r.value]
        kind, description = state.run_state(r.run_dir, cfg)
        print(f"# {plan.param}={r.value}: {description}", file=out)
        train = shlex.join(train_command(plan, r.value))
        print(train if kind in ("new", "partial") else f"# {train}", file=out)
        if plan.task:
            ckpt = state.final_checkpoint(r.run_dir, cfg)
            report = r.run_dir / f"eval_{plan.task}.json"
            skip = kind in ("changed", "ahead") or (kind == "finished" and state.report_is_current(report, plan.eval_cfg, ckpt))
            evaluation = shlex.join(eval_command(cfg, ckpt, plan.eval_cfg, report))
            print(f"# {evaluation}" if skip else evaluation, file=out)
        else:
            print("# not evaluated: no --eval.squad_file", file=out)


def _train(plan: Plan, r: Result, out: TextIO) -> bool:
    """Trains (or resumes) one value unless it is finished; False when it failed or cannot run."""
    cfg = plan.configs[r.value]
    kind, description = state.run_state(r.run_dir, cfg)
    if kind in ("changed", "ahead"):
        r.status, r.note = ("changed_flags" if kind == "changed" else "train_failed"), description
        print(f"  skipped: {description}", file=out)
        return False
    if kind == "finished":
        print(f"  {description}", file=out)
        return True
    log = r.run_dir / "train.log"
    print(f"  training{f' ({description})' if kind == 'partial' else ''}; log: {log}", file=out, flush=True)
    start = time.time()
    code = _run_logged(train_command(plan, r.value), log)
    ckpt = state.final_checkpoint(r.run_dir, cfg)
    if code != 0 or not (ckpt / "params").is_dir():
        r.final_step, r.final_loss = state.final_loss(r.run_dir)
        _report_failure(r, "train_failed", f"exit {code}: {_log_tail(log)[1]}" if code else
                        f"no final checkpoint {ckpt.name}", log, out)
        return False
    print(f"  trained in {time.time() - start:.1f} s", file=out)
    return True


def _evaluate(plan: Plan, r: Result, out: TextIO, retrained: bool) -> None:
    cfg = plan.configs[r.value]
    ckpt = state.final_checkpoint(r.run_dir, cfg)
    report = r.run_dir / f"eval_{plan.task}.json"
    if not retrained and state.report_is_current(report, plan.eval_cfg, ckpt):
        print(f"  evaluated already: {report}", file=out)
    else:
        log = r.run_dir / f"eval_{plan.task}.log"
        print(f"  evaluating {plan.task}; log: {log}", file=out, flush=True)
        start = time.time()
        code = _run_logged(eval_command(cfg, ckpt, plan.eval_cfg, report), log)
        if code != 0 or not state.report_is_current(report, plan.eval_cfg, ckpt):
            _report_failure(r, "eval_failed", f"exit {code}: {_log_tail(log)[1]}" if code else
                            f"no report {report.name}", log, out)
            return
        print(f"  evaluated in {time.time() - start:.1f} s", file=out)
    r.aggregate = json.loads(report.read_text(encoding="utf-8"))["aggregate"]
    r.status = "ok"
    print(f"  EM {r.aggregate['exact_match']:.2f}  F1 {r.aggregate['f1']:.2f}  (multilingual: EM "
          f"{r.aggregate['multilingual_exact_match']:.2f}  F1 {r.aggregate['multilingual_f1']:.2f})", file=out)


def _run_one(plan: Plan, r: Result, out: TextIO) -> None:
    finished_before = state.run_state(r.run_dir, plan.configs[r.value])[0] == "finished"
    if not _train(plan, r, out):
        return
    r.final_step, r.final_loss = state.final_loss(r.run_dir)
    if r.final_loss is not None:
        print(f"  final loss {r.final_loss:.4f} (step {r.final_step})", file=out)
    if not plan.task:
        r.status, r.note = "ok", "not evaluated: no --eval.squad_file"
        return
    _evaluate(plan, r, out, retrained=not finished_before)
