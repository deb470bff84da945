"""Running a sweep: for each value, train (or resume) in a subprocess, then evaluate in another.

Each run is its own process because the trainer and the evaluator own the devices while they run.
The sweep supervises them (`Supervisor`): SIGTERM or SIGINT to the sweep is passed on to the
running child, the sweep waits for it (a trainer saves a checkpoint and exits 75) and then exits 75
itself, so rerunning the same command resumes that value.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, TextIO

from ml_collections import ConfigDict

from easylm_align import config, preemption, run_config
from easylm_align.evaluation.qa import default_eval_config
from easylm_align.tools.sweep import state
from easylm_align.tools.sweep.plan import Plan, SweepError
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


class Interrupted(Exception):
    """The sweep received SIGTERM or SIGINT; the child it was running has exited."""


class Supervisor:
    """While active (a context manager), SIGTERM and SIGINT to the sweep are recorded and passed on to
    the running child, once each; `run` waits for the child to exit either way, then raises
    Interrupted. Children run in their own session, so Ctrl-C in a terminal reaches a trainer only
    through the sweep (once: a second SIGINT would make it stop without saving)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.child: Optional[subprocess.Popen] = None
        self.received: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "Supervisor":
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def check(self) -> None:
        if self.received is not None:
            raise Interrupted(signal.Signals(self.received).name)

    def run(self, cmd: Sequence[str], stdout: TextIO) -> int:
        """Runs `cmd` to its end; its exit status, or Interrupted if a signal came meanwhile."""
        self.check()
        self.child = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
        if self.received is not None:  # arrived between the check and the start
            self.child.send_signal(self.received)
        try:
            code = self.child.wait()
        finally:
            self.child = None
        if self.received is not None:
            raise Interrupted(f"{signal.Signals(self.received).name} received; passed on to "
                              f"{cmd[2]}, which exited with status {code}")
        return code


def _run_logged(cmd: Sequence[str], log: Path, supervisor: Supervisor) -> int:
    """Runs `cmd`, appending its output to `log` (one header line per attempt); returns its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        f.flush()
        return supervisor.run(cmd, f)


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
    """Trains and evaluates every value; returns the exit status (0 all ok, 1 some value failed,
    75 interrupted by SIGTERM/SIGINT: rerun to resume). Progress goes to `out` (stdout).
    A value whose directory was trained with other flags refuses the whole sweep (SweepError)
    before anything runs or is written."""
    out = out or sys.stdout
    results = [Result(v, plan.run_dir(v)) for v in plan.values]
    if dry_run:
        _print_dry_run(plan, results, out)
        return 0
    _refuse_changed_runs(plan)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    if not plan.task:
        print("note: no --eval.squad_file; runs are trained but not evaluated", file=out)
    with Supervisor() as supervisor:
        for i, result in enumerate(results, 1):
            print(f"[{i}/{len(results)}] {plan.param}={result.value}: {result.run_dir}", file=out, flush=True)
            try:
                _run_one(plan, result, out, supervisor)
            except Interrupted as e:
                print(f"interrupted: {e}; {plan.param}={result.value} resumes when the same command is run "
                      f"again (exit code {preemption.EXIT_PREEMPTED})", file=sys.stderr, flush=True)
                return preemption.EXIT_PREEMPTED
            write_summary(plan.sweep_dir, plan.param, results, plan.task)
    failed = [r for r in results if r.status != "ok"]
    print(f"sweep: {len(results) - len(failed)}/{len(results)} ok; results in {plan.sweep_dir / 'sweep.csv'}, "
          f"{plan.sweep_dir / 'sweep.md'}, {plan.sweep_dir / 'sweep.png'}", file=out)
    for r in failed:
        print(f"error: {plan.param}={r.value}: {r.status}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


def _refuse_changed_runs(plan: Plan) -> None:
    """A rerun with other flags changes nothing: no run, and no summary rewritten with blanks."""
    changed = [f"{plan.param}={v}: {description}" for v in plan.values
               for kind, description in [state.run_state(plan.run_dir(v), plan.configs[v])] if kind == "changed"]
    if changed:
        raise SweepError("; ".join(changed))


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


def _train(plan: Plan, r: Result, out: TextIO, supervisor: Supervisor) -> bool:
    """Trains (or resumes) one value unless it is finished; False when it failed or cannot run."""
    cfg = plan.configs[r.value]
    kind, description = state.run_state(r.run_dir, cfg)
    if kind == "ahead":
        r.status, r.note = "train_failed", description
        print(f"  skipped: {description}", file=out)
        return False
    if kind == "finished":
        print(f"  {description}", file=out)
        return True
    log = r.run_dir / "train.log"
    print(f"  training{f' ({description})' if kind == 'partial' else ''}; log: {log}", file=out, flush=True)
    start = time.time()
    code = _run_logged(train_command(plan, r.value), log, supervisor)
    ckpt = state.final_checkpoint(r.run_dir, cfg)
    if code != 0 or not (ckpt / "params").is_dir():
        r.final_step, r.final_loss = state.final_loss(r.run_dir)
        _report_failure(r, "train_failed", f"exit {code}: {_log_tail(log)[1]}" if code else
                        f"no final checkpoint {ckpt.name}", log, out)
        return False
    print(f"  trained in {time.time() - start:.1f} s", file=out)
    return True


def _evaluate(plan: Plan, r: Result, out: TextIO, retrained: bool, supervisor: Supervisor) -> None:
    cfg = plan.configs[r.value]
    ckpt = state.final_checkpoint(r.run_dir, cfg)
    report = r.run_dir / f"eval_{plan.task}.json"
    if not retrained and state.report_is_current(report, plan.eval_cfg, ckpt):
        print(f"  evaluated already: {report}", file=out)
    else:
        log = r.run_dir / f"eval_{plan.task}.log"
        print(f"  evaluating {plan.task}; log: {log}", file=out, flush=True)
        start = time.time()
        code = _run_logged(eval_command(cfg, ckpt, plan.eval_cfg, report), log, supervisor)
        if code != 0 or not state.report_is_current(report, plan.eval_cfg, ckpt):
            _report_failure(r, "eval_failed", f"exit {code}: {_log_tail(log)[1]}" if code else
                            f"no report {report.name}", log, out)
            return
        print(f"  evaluated in {time.time() - start:.1f} s", file=out)
    r.aggregate = json.loads(report.read_text(encoding="utf-8"))["aggregate"]
    r.status = "ok"
    print(f"  EM {r.aggregate['exact_match']:.2f}  F1 {r.aggregate['f1']:.2f}  (multilingual: EM "
          f"{r.aggregate['multilingual_exact_match']:.2f}  F1 {r.aggregate['multilingual_f1']:.2f})", file=out)


def _run_one(plan: Plan, r: Result, out: TextIO, supervisor: Supervisor) -> None:
    finished_before = state.run_state(r.run_dir, plan.configs[r.value])[0] == "finished"
    if not _train(plan, r, out, supervisor):
        return
    r.final_step, r.final_loss = state.final_loss(r.run_dir)
    if r.final_loss is not None:
        print(f"  final loss {r.final_loss:.4f} (step {r.final_step})", file=out)
    if not plan.task:
        r.status, r.note = "ok", "not evaluated: no --eval.squad_file"
        return
    _evaluate(plan, r, out, retrained=not finished_before, supervisor=supervisor)
