r"""`python -m easylm_align.tools.sweep`: one training run per value of a train flag, then QA evaluation.

    python -m easylm_align.tools.sweep --param=train_dataset.text_processor.codemix_ratio \
        --values=0,0.25,0.5,0.75,0.9,1.0 --sweep_dir=sweeps/ratio \
        --eval.squad_file=xquad.hi.json --eval.lang=hi --eval.max_examples=200 \
        -- --total_steps=1210 --load_llama_config=7b --tokenizer.vocab_file=tokenizer.model ...

Everything after `--` is passed to `python -m easylm_align.train` unchanged, followed by
`--PARAM=VALUE` (the value exactly as written in `--values`) and
`--logger.output_dir=SWEEP_DIR/LEAF=VALUE`, where LEAF is the last component of `--param`
(`codemix_ratio=0.5`). Any train flag can be swept. Each run's final checkpoint
(`checkpoints/streaming_params_{total_steps}`) is then scored by `python -m easylm_align.evaluate`
with the run's own `--load_llama_config`, `--update_llama_config`, `--llama.*`,
`--tokenizer.vocab_file`, `--mesh_dim`, `--dtype` and `--param_dtype`, plus the sweep's `--eval.*`
flags. The report goes to `SWEEP_DIR/LEAF=VALUE/eval_{task}.json`. Without `--eval.squad_file`
evaluation is skipped.

Results: `SWEEP_DIR/sweep.csv`, `sweep.md` (a Markdown table) and `sweep.png` (EM and F1 against
the value; final train loss against the value). They are rewritten after every value.

Resuming: run the same command again. A value whose final checkpoint exists is not retrained.
A report that exists for the same checkpoint and eval settings is not recomputed. An interrupted
run is restarted in its own directory, so the trainer resumes from its latest checkpoint. A
directory trained with different flags is not touched; that value is reported as `changed_flags`.

Before anything runs, the train flags and `--param` are checked against the trainer's own flag
definitions (in a throwaway subprocess, so that the trainer's flags are not defined here), and
each value is parsed as that flag's type. A failed run is reported, the sweep goes on with the
other values, and the exit status is 1. Bad input exits with status 2.
"""

from __future__ import annotations

import copy
import csv
import difflib
import json
import math
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from absl import app, flags
from ml_collections import ConfigDict

from easylm_align.config import FLAGS, check_flag_names, define_flags_with_default, parse_flags_or_exit
from easylm_align.errors import UserError
from easylm_align.evaluate import check_eval_config, default_eval_config, task_name

STEP_DIR = re.compile(r"^streaming_params_(\d+)$")
_PROBE_MARK = "SWEEP_PROBE_RESULT "
# Flags that do not change what a run learns up to its last checkpoint: a finished or interrupted
# run may be resumed with other values of these. (A larger total_steps continues training.)
_RESUMABLE_FLAGS = ("logger.", "log_freq", "save_model_freq", "save_milestone_freq", "eval_steps",
                    "eval_dataset.", "total_steps", "mesh_dim", "jax_distributed.")
# Eval settings that must match for an existing report to be reused.
_REPORT_KEYS = ("squad_file", "lang", "prompt_lang", "prompt_style", "shots", "seed", "max_new_tokens",
                "max_examples", "add_bos_token", "load_checkpoint")
SWEEP_FLAGS = ("param", "values", "sweep_dir", "dry_run", "eval")


class SweepError(UserError):
    """Bad input to the sweep: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def define_flags() -> None:
    """The sweep's own flags. Defined only when run as a program (importing this module defines none)."""
    flags.DEFINE_string("param", None, "The train flag to sweep, e.g. train_dataset.text_processor.codemix_ratio.")
    flags.DEFINE_string("values", None, "Comma-separated values of --param, passed to the trainer as written.")
    flags.DEFINE_string("sweep_dir", None, "One run directory per value goes here, with sweep.csv/.md/.png.")
    flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
    define_flags_with_default(eval=default_eval_config())


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """[prog, sweep flags..., '--', train flags...] -> (sweep part with prog, train flags)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse_values(raw: Optional[str]) -> list[str]:
    values = [v.strip() for v in (raw or "").split(",")]
    if values == [""]:
        raise SweepError("--values is empty: give comma-separated values, e.g. --values=0,0.5,1.0")
    if "" in values:
        raise SweepError(f"--values={raw!r} has an empty value")
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise SweepError(f"--values repeats {', '.join(duplicates)}")
    return values


def flag_name(arg: str) -> Optional[str]:
    """'--a.b=1' / '-a.b' -> 'a.b'; None for a positional argument."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    return arg.lstrip("-").split("=", 1)[0]


def check_train_argv(train_argv: Sequence[str], param: str) -> None:
    """Refuses the flags the sweep sets itself, and sweep flags put after `--` by mistake."""
    for arg in train_argv:
        name = flag_name(arg)
        if name is None:
            continue
        if name == "logger.output_dir":
            raise SweepError("--logger.output_dir must not be given in the train flags: the sweep sets it to "
                             "SWEEP_DIR/<param>=<value> for each run (use --sweep_dir)")
        if name in (param, "no" + param):
            raise SweepError(f"--{param} is the swept flag; remove it from the train flags after --")
        if name.split(".")[0] in SWEEP_FLAGS:
            raise SweepError(f"--{name} is a sweep flag: put it before --, not among the train flags")


def run_dir_name(param: str, value: str) -> str:
    """`LEAF=VALUE`, with characters that do not belong in a file name replaced by '_'."""
    leaf = param.rsplit(".", 1)[-1]
    return f"{leaf}={re.sub(r'[^A-Za-z0-9._+-]', '_', value)}"


def flag_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


# ----------------------------------------------------------------------------------------------
# The trainer's flags, read in a throwaway process
# ----------------------------------------------------------------------------------------------

def _train_flag_values(defaults: dict, argv: list[str]) -> flags.FlagValues:
    """A fresh FlagValues holding the trainer's flags (and absl's own), parsed from `argv`."""
    from ml_collections import config_flags

    fv = flags.FlagValues()
    for name in list(FLAGS):  # absl's flags (--verbosity, ...): a train command may use them
        if FLAGS[name].name == name and name.split(".")[0] not in defaults:
            fv[name] = FLAGS[name]
    for name, default in defaults.items():
        if isinstance(default, ConfigDict):
            config_flags.DEFINE_config_dict(name, copy.deepcopy(default), flag_values=fv, sys_argv=argv)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, None, flag_values=fv)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, None, flag_values=fv)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, None, flag_values=fv)
        else:
            flags.DEFINE_string(name, default, None, flag_values=fv)
    fv(argv)
    return fv


def resolve_train_configs(param: str, values: Sequence[str], train_argv: Sequence[str]) -> dict[str, dict]:
    """The trainer's resolved config (train's `config.json` layout) for each value.

    Imports the trainer, which defines its flags globally: call this in a subprocess (`probe_trainer`)."""
    from easylm_align import train
    from easylm_align.config import known_flag_names

    known = known_flag_names()
    train_names = [n for n in known if n.split(".")[0] in train.DEFAULTS]
    if param not in train_names and any(n.startswith(param + ".") for n in train_names):
        fields = [n for n in train_names if n.startswith(param + ".")]
        raise SweepError(f"--param={param} is a group of train flags; sweep one of its fields, e.g. --param={fields[0]}")
    if param not in train_names:
        near = difflib.get_close_matches(param, train_names, n=1, cutoff=0.6)
        hint = f"; did you mean --param={near[0]}?" if near else ""
        raise SweepError(f"--param={param}: the trainer has no flag --{param}{hint}")
    parse_errors = (flags.Error, ValueError, KeyError, TypeError, AttributeError)
    try:
        base = FLAGS.read_flags_from_files(["easylm_align.train", *train_argv], force_gnu=False)
        check_flag_names(base, known)
        _train_flag_values(train.DEFAULTS, base)
    except parse_errors as e:
        raise SweepError(f"train flags (after --): {e}") from None
    configs = {}
    for value in values:
        try:
            fv = _train_flag_values(train.DEFAULTS, [*base, f"--{param}={value}"])
        except parse_errors as e:
            raise SweepError(f"--values: {value!r} is not a valid --{param}: {e}") from None
        cfg = ConfigDict({name: getattr(fv, name) for name in train.DEFAULTS})
        configs[value] = json.loads(json.dumps(cfg.to_dict()))
    return configs


def _probe_main() -> None:
    """Entry point of the probe subprocess: a JSON request on stdin, one marked JSON line out."""
    request = json.load(sys.stdin)
    try:
        result = {"configs": resolve_train_configs(request["param"], request["values"], request["train_argv"])}
    except SweepError as e:
        result = {"error": str(e)}
    print(_PROBE_MARK + json.dumps(result), flush=True)


def probe_trainer(param: str, values: Sequence[str], train_argv: Sequence[str]) -> dict[str, dict]:
    request = json.dumps(dict(param=param, values=list(values), train_argv=list(train_argv)))
    proc = subprocess.run([sys.executable, "-c", "from easylm_align.tools.sweep import _probe_main; _probe_main()"],
                          input=request, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_PROBE_MARK)]
    if not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise SweepError(f"could not read the trainer's flags (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len(_PROBE_MARK):])
    if "error" in result:
        raise SweepError(result["error"])
    return result["configs"]


# ----------------------------------------------------------------------------------------------
# One value
# ----------------------------------------------------------------------------------------------

def checkpoint_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpts.iterdir()
                  if (m := STEP_DIR.match(p.name)) and (p / "params").is_dir())


def final_checkpoint(run_dir: Path, total_steps: int) -> Path:
    return run_dir / "checkpoints" / f"streaming_params_{total_steps}"


def final_loss(run_dir: Path) -> tuple[Optional[int], Optional[float]]:
    """(step, loss) of the last row of the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None, None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    return (int(rows[-1]["step"]), float(rows[-1]["loss"])) if rows else (None, None)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def changed_flags(run_dir: Path, expected: dict) -> list[str]:
    """Flags with which an existing run was trained that differ from this sweep's (ignoring
    `_RESUMABLE_FLAGS`, and flags that only one side knows). Empty when the directory holds no run."""
    path = run_dir / "config.json"
    if not path.exists():
        return []
    before, now = _flatten(json.loads(path.read_text())), _flatten(expected)
    return [f"--{k}: {before[k]!r} -> {now[k]!r}" for k in sorted(set(before) & set(now))
            if not k.startswith(_RESUMABLE_FLAGS) and before[k] != now[k]]


def run_state(run_dir: Path, cfg: dict) -> tuple[str, str]:
    """(kind, description) of a value's run directory: kind is new, partial, finished, ahead
    (trained past total_steps) or changed (trained with other flags)."""
    changed = changed_flags(run_dir, cfg)
    if changed:
        return "changed", f"{run_dir} was trained with other flags ({'; '.join(changed[:4])}); delete it or use " \
                          "another --sweep_dir"
    steps, total = checkpoint_steps(run_dir), cfg["total_steps"]
    if total in steps:
        return "finished", f"trained already (step {total})"
    if steps and steps[-1] > total:
        return "ahead", f"the run is already at step {steps[-1]}, past --total_steps={total}"
    if steps:
        return "partial", f"resumes from step {steps[-1]}"
    return "new", "new"


def train_command(param: str, value: str, train_argv: Sequence[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "easylm_align.train", *train_argv, f"--{param}={value}",
            f"--logger.output_dir={run_dir}"]


def eval_command(cfg: dict, ckpt: Path, eval_cfg: ConfigDict, report: Path) -> list[str]:
    """The evaluator with the run's model, tokenizer, mesh and dtypes, and the sweep's --eval.* flags."""
    cmd = [sys.executable, "-m", "easylm_align.evaluate", f"--load_checkpoint=params::{ckpt}",
           f"--load_llama_config={cfg['load_llama_config']}"]
    if cfg["update_llama_config"]:
        cmd.append(f"--update_llama_config={cfg['update_llama_config']}")
    cmd += [f"--llama.{k}={flag_value(v)}" for k, v in cfg["llama"].items() if v is not None]
    cmd += [f"--tokenizer.vocab_file={cfg['tokenizer']['vocab_file']}", f"--mesh_dim={cfg['mesh_dim']}",
            f"--dtype={cfg['dtype']}", f"--param_dtype={cfg['param_dtype']}"]
    defaults = default_eval_config()
    cmd += [f"--eval.{k}={flag_value(v)}" for k, v in eval_cfg.items() if k != "output" and v != defaults[k]]
    cmd.append(f"--eval.output={report}")
    return cmd


def report_is_current(path: Path, eval_cfg: ConfigDict, ckpt: Path) -> bool:
    if not path.exists():
        return False
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        stored, aggregate = report["config"], report["aggregate"]
    except (ValueError, KeyError):
        return False
    wanted = dict(eval_cfg.to_dict(), load_checkpoint=f"params::{ckpt}")
    # A report written before the metric keys were renamed lacks the current ones: recompute it.
    return all(stored.get(k) == wanted.get(k) for k in _REPORT_KEYS) and all(k in aggregate for k in _METRICS)


@dataclass
class Result:
    value: str
    run_dir: Path
    status: str = "pending"
    final_step: Optional[int] = None
    final_loss: Optional[float] = None
    aggregate: dict = field(default_factory=dict)
    note: str = ""


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


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------

def run_sweep(param: str, values: Sequence[str], sweep_dir: str | Path, eval_cfg: ConfigDict,
              train_argv: Sequence[str], dry_run: bool = False, out: Optional[TextIO] = None) -> int:
    """Trains and evaluates every value; returns the exit status (0 all ok, 1 some value failed).
    Raises SweepError on bad input, before anything runs. Progress goes to `out` (stdout)."""
    out = out or sys.stdout
    param = param.lstrip("-")
    if not param:
        raise SweepError("--param is required: the train flag to sweep, e.g. train_dataset.text_processor.codemix_ratio")
    if param == "logger.output_dir":
        raise SweepError("--param=logger.output_dir cannot be swept: the sweep sets it for each run")
    values = list(values)
    if not values:
        raise SweepError("--values is empty: give comma-separated values, e.g. --values=0,0.5,1.0")
    if not sweep_dir:
        raise SweepError("--sweep_dir is required")
    check_train_argv(train_argv, param)
    evaluate = bool(eval_cfg.squad_file)
    if evaluate:
        if eval_cfg.output:
            raise SweepError("--eval.output is set by the sweep (SWEEP_DIR/<param>=<value>/eval_<task>.json)")
        if not Path(eval_cfg.squad_file).is_file():
            raise SweepError(f"--eval.squad_file={eval_cfg.squad_file!r}: no such file")
        try:
            check_eval_config(eval_cfg)
        except ValueError as e:
            raise SweepError(str(e)) from None
    sweep_dir = Path(sweep_dir).absolute()
    names = {v: run_dir_name(param, v) for v in values}
    clashes = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
    if clashes:
        raise SweepError(f"--values map to the same run directory {clashes[0]!r}; make them differ in "
                         "letters, digits or ._+-")
    configs = probe_trainer(param, values, train_argv)
    for cfg in configs.values():
        if cfg["logger"]["output_dir"]:
            raise SweepError("--logger.output_dir is set in the train flags (a --flagfile?): the sweep sets it "
                             "for each run (use --sweep_dir)")

    if param.endswith("text_processor.codemix_ratio"):
        group = param[:-len("codemix_ratio")]
        if not _flatten(next(iter(configs.values()))).get(group + "codemix_dict_path"):
            print(f"warning: --{group}codemix_dict_path is not set, so --{param} changes nothing", file=sys.stderr)
    task = task_name(eval_cfg) if evaluate else ""
    results = [Result(v, sweep_dir / names[v]) for v in values]
    if dry_run:
        _print_dry_run(param, results, configs, eval_cfg, train_argv, task, out)
        return 0
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not evaluate:
        print("note: no --eval.squad_file; runs are trained but not evaluated", file=out)
    for i, result in enumerate(results, 1):
        print(f"[{i}/{len(results)}] {param}={result.value}: {result.run_dir}", file=out, flush=True)
        _run_one(param, result, configs[result.value], eval_cfg, train_argv, task, out)
        write_summary(sweep_dir, param, results, task)
    failed = [r for r in results if r.status != "ok"]
    print(f"sweep: {len(results) - len(failed)}/{len(results)} ok; results in {sweep_dir / 'sweep.csv'}, "
          f"{sweep_dir / 'sweep.md'}, {sweep_dir / 'sweep.png'}", file=out)
    for r in failed:
        print(f"error: {param}={r.value}: {r.status}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


def _print_dry_run(param: str, results: list[Result], configs: dict, eval_cfg: ConfigDict,
                   train_argv: Sequence[str], task: str, out: TextIO) -> None:
    for r in results:
        cfg = configs[r.value]
        kind, state = run_state(r.run_dir, cfg)
        print(f"# {param}={r.value}: {state}", file=out)
        train = shlex.join(train_command(param, r.value, train_argv, r.run_dir))
        print(train if kind in ("new", "partial") else f"# {train}", file=out)
        if task:
            ckpt = final_checkpoint(r.run_dir, cfg["total_steps"])
            report = r.run_dir / f"eval_{task}.json"
            skip = kind in ("changed", "ahead") or (kind == "finished" and report_is_current(report, eval_cfg, ckpt))
            evaluation = shlex.join(eval_command(cfg, ckpt, eval_cfg, report))
            print(f"# {evaluation}" if skip else evaluation, file=out)
        else:
            print("# not evaluated: no --eval.squad_file", file=out)


def _run_one(param: str, r: Result, cfg: dict, eval_cfg: ConfigDict, train_argv: Sequence[str],
             task: str, out: TextIO) -> None:
    ckpt = final_checkpoint(r.run_dir, cfg["total_steps"])
    kind, state = run_state(r.run_dir, cfg)
    retrained = False
    if kind in ("changed", "ahead"):
        r.status, r.note = ("changed_flags" if kind == "changed" else "train_failed"), state
        print(f"  skipped: {state}", file=out)
        return
    if kind == "finished":
        print(f"  {state}", file=out)
    else:
        log = r.run_dir / "train.log"
        print(f"  training{f' ({state})' if kind == 'partial' else ''}; log: {log}", file=out, flush=True)
        start = time.time()
        code = _run_logged(train_command(param, r.value, train_argv, r.run_dir), log)
        tail, last = _log_tail(log)
        if code != 0 or not (ckpt / "params").is_dir():
            r.status = "train_failed"
            r.note = f"exit {code}: {last}" if code else f"no final checkpoint {ckpt.name}"
            r.final_step, r.final_loss = final_loss(r.run_dir)
            print(f"  error: training failed ({r.note}); last lines of {log}:\n" +
                  "\n".join("    " + line for line in tail.splitlines()), file=out)
            return
        retrained = True
        print(f"  trained in {time.time() - start:.1f} s", file=out)
    r.final_step, r.final_loss = final_loss(r.run_dir)
    if r.final_loss is not None:
        print(f"  final loss {r.final_loss:.4f} (step {r.final_step})", file=out)
    if not task:
        r.status, r.note = "ok", "not evaluated: no --eval.squad_file"
        return
    report = r.run_dir / f"eval_{task}.json"
    if not retrained and report_is_current(report, eval_cfg, ckpt):
        print(f"  evaluated already: {report}", file=out)
    else:
        log = r.run_dir / f"eval_{task}.log"
        print(f"  evaluating {task}; log: {log}", file=out, flush=True)
        start = time.time()
        code = _run_logged(eval_command(cfg, ckpt, eval_cfg, report), log)
        if code != 0 or not report_is_current(report, eval_cfg, ckpt):
            tail, last = _log_tail(log)
            r.status, r.note = "eval_failed", (f"exit {code}: {last}" if code else f"no report {report.name}")
            print(f"  error: evaluation failed ({r.note}); last lines of {log}:\n" +
                  "\n".join("    " + line for line in tail.splitlines()), file=out)
            return
        print(f"  evaluated in {time.time() - start:.1f} s", file=out)
    r.aggregate = json.loads(report.read_text(encoding="utf-8"))["aggregate"]
    r.status = "ok"
    print(f"  EM {r.aggregate['exact_match']:.2f}  F1 {r.aggregate['f1']:.2f}  (multilingual: EM "
          f"{r.aggregate['multilingual_exact_match']:.2f}  F1 {r.aggregate['multilingual_f1']:.2f})",
          file=out)


# ----------------------------------------------------------------------------------------------
# Summary: CSV, Markdown, PNG
# ----------------------------------------------------------------------------------------------

CSV_COLUMNS = ("param", "value", "status", "final_step", "final_loss", "task", "num_examples", "exact_match",
               "f1", "multilingual_exact_match", "multilingual_f1", "run_dir", "note")
_METRICS = ("exact_match", "f1", "multilingual_exact_match", "multilingual_f1")


def _row(param: str, r: Result) -> dict[str, Any]:
    agg = r.aggregate
    return dict(param=param, value=r.value, status=r.status, final_step=r.final_step, final_loss=r.final_loss,
                task=agg.get("task", ""), num_examples=agg.get("num_examples"),
                **{k: agg.get(k) for k in _METRICS}, run_dir=str(r.run_dir), note=r.note)


def write_summary(sweep_dir: Path, param: str, results: Sequence[Result], task: str) -> None:
    rows = [_row(param, r) for r in results]
    with open(sweep_dir / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    (sweep_dir / "sweep.md").write_text(markdown_table(param, rows, task), encoding="utf-8")
    write_plot(sweep_dir / "sweep.png", param, results, task)


def markdown_table(param: str, rows: Sequence[dict], task: str) -> str:
    fmt = lambda v, spec: "" if v is None else format(v, spec)
    header = [f"`{param}`", "status", "final step", "final loss"]
    if task:
        header += ["EM", "F1", "EM (multilingual)", "F1 (multilingual)", "n"]
    lines = [f"Sweep of `--{param}`" + (f", evaluated on `{task}`" if task else " (not evaluated)") + ".", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["value"], row["status"], fmt(row["final_step"], "d"), fmt(row["final_loss"], ".4f")]
        if task:
            cells += [fmt(row[k], ".2f") for k in _METRICS] + [fmt(row["num_examples"], "d")]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    notes = [f"* `{row['value']}`: {row['note']}" for row in rows if row["status"] != "ok" and row["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _x_positions(values: Sequence[str]) -> tuple[list[float], bool]:
    """Numeric values are plotted at their value; anything else at 0, 1, 2, ... in the given order."""
    try:
        xs = [float(v) for v in values]
        if all(math.isfinite(x) for x in xs):
            return xs, True
    except ValueError:
        pass
    return [float(i) for i in range(len(values))], False


def write_plot(path: Path, param: str, results: Sequence[Result], task: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    xs, numeric = _x_positions([r.value for r in results])
    order = sorted(range(len(results)), key=lambda i: xs[i])
    x = [xs[i] for i in order]
    nan = float("nan")
    series = lambda get: [nan if (v := get(results[i])) is None else v for i in order]
    fig = Figure(figsize=(11, 4.2))
    ax_metric, ax_loss = fig.subplots(1, 2)
    if task and any(r.aggregate for r in results):
        for key, label, style in (("exact_match", "EM", "o-"), ("f1", "F1", "s-"),
                                  ("multilingual_exact_match", "EM (multilingual)", "o--"),
                                  ("multilingual_f1", "F1 (multilingual)", "s--")):
            ax_metric.plot(x, series(lambda r: r.aggregate.get(key)), style, label=label,
                           alpha=0.6 if key.startswith("multilingual") else 1.0)
        top = max([v for r in results for k, v in r.aggregate.items() if k in _METRICS] + [0.0])
        ax_metric.set_ylim(0, max(1.1 * top, 1.0))
        ax_metric.set_ylabel(f"{task} (%)")
        ax_metric.legend(fontsize="small")
        ax_metric.set_title(f"{task} against {param.rsplit('.', 1)[-1]}")
    else:
        ax_metric.text(0.5, 0.5, "not evaluated" if not task else "no evaluation results yet",
                       ha="center", va="center", transform=ax_metric.transAxes)
        ax_metric.set_title("QA metrics")
    ax_loss.plot(x, series(lambda r: r.final_loss), "o-", color="tab:red")
    ax_loss.set_ylabel("final train loss")
    ax_loss.set_title(f"final train loss against {param.rsplit('.', 1)[-1]}")
    positive = numeric and all(v > 0 for v in x)
    for ax in (ax_metric, ax_loss):
        ax.set_xlabel(param)
        ax.grid(True, alpha=0.3)
        if positive and len(x) > 1 and max(x) / min(x) >= 100:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(x, [results[i].value for i in order], rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def _parse_flags(argv: list[str]) -> list[str]:
    """Sweep flags before `--`, train flags after; returns [prog, *train flags] for main."""
    sweep_argv, train_argv = split_argv(argv)
    rest = parse_flags_or_exit(FLAGS.read_flags_from_files(sweep_argv, force_gnu=False))
    if len(rest) > 1:
        sys.stderr.write(f"error: unexpected argument {rest[1]!r}; put the train flags after --\n")
        sys.exit(2)
    return [argv[0], *train_argv]


def main(argv: list[str]) -> None:
    try:
        code = run_sweep(FLAGS.param or "", parse_values(FLAGS.values), FLAGS.sweep_dir, FLAGS.eval,
                         argv[1:], FLAGS.dry_run)
    except SweepError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; run the same command again to resume\n")
        sys.exit(130)
    sys.exit(code)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=_parse_flags)
