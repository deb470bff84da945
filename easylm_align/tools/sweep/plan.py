"""What a sweep will do: its input checked, and each value's train config derived in-process.

Everything here runs before any training starts, so bad input costs nothing.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ml_collections import ConfigDict

from easylm_align import config, train_config
from easylm_align.errors import UserError
from easylm_align.evaluation.qa import check_eval_config, task_name

# The sweep's own flags: given after `--` by mistake they would go to the trainer.
SWEEP_FLAGS = ("param", "values", "sweep_dir", "dry_run", "eval")


class SweepError(UserError):
    """Bad input to the sweep: reported as one line, exit status 2."""


@dataclass
class Plan:
    param: str
    values: list[str]
    sweep_dir: Path
    eval_cfg: ConfigDict
    train_argv: list[str]
    configs: dict[str, ConfigDict]  # value -> the trainer's config for it
    task: str                       # the evaluation task ('' = not evaluated)

    def run_dir(self, value: str) -> Path:
        return self.sweep_dir / run_dir_name(self.param, value)


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


def run_dir_name(param: str, value: str) -> str:
    """`LEAF=VALUE`, with characters that do not belong in a file name replaced by '_'."""
    leaf = param.rsplit(".", 1)[-1]
    return f"{leaf}={re.sub(r'[^A-Za-z0-9._+-]', '_', value)}"


def _flag_name(arg: str) -> Optional[str]:
    """'--a.b=1' / '-a.b' -> 'a.b'; None for a positional argument."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    return arg.lstrip("-").split("=", 1)[0]


def check_train_argv(train_argv: Sequence[str], param: str) -> None:
    """Refuses the flags the sweep sets itself, and sweep flags put after `--` by mistake."""
    for name in filter(None, map(_flag_name, train_argv)):
        if name == "logger.output_dir":
            raise SweepError("--logger.output_dir must not be given in the train flags: the sweep sets it to "
                             "SWEEP_DIR/<param>=<value> for each run (use --sweep_dir)")
        if name in (param, "no" + param):
            raise SweepError(f"--{param} is the swept flag; remove it from the train flags after --")
        if name.split(".")[0] in SWEEP_FLAGS:
            raise SweepError(f"--{name} is a sweep flag: put it before --, not among the train flags")


def check_param(param: str, train_names: Sequence[str]) -> None:
    """`param` must name one train flag (a leaf, not a group)."""
    if param in train_names:
        return
    fields = [n for n in train_names if n.startswith(param + ".")]
    if fields:
        raise SweepError(f"--param={param} is a group of train flags; sweep one of its fields, e.g. --param={fields[0]}")
    near = difflib.get_close_matches(param, train_names, n=1, cutoff=0.6)
    hint = f"; did you mean --param={near[0]}?" if near else ""
    raise SweepError(f"--param={param}: the trainer has no flag --{param}{hint}")


def train_configs(param: str, values: Sequence[str], train_argv: Sequence[str]) -> dict[str, ConfigDict]:
    """The config the trainer would run with for each value, parsed here as its command line."""
    defaults = train_config.default_config()
    check_param(param, config.flag_names(defaults))
    try:
        config.parse_config(defaults, ["easylm_align.train", *train_argv])
    except UserError as e:
        raise SweepError(f"train flags (after --): {e}") from None
    configs = {}
    for value in values:
        try:
            configs[value] = config.parse_config(defaults, ["easylm_align.train", *train_argv, f"--{param}={value}"])
        except UserError as e:
            raise SweepError(f"--values: {value!r} is not a valid --{param}: {e}") from None
    return configs


def _check_eval(eval_cfg: ConfigDict) -> None:
    if eval_cfg.output:
        raise SweepError("--eval.output is set by the sweep (SWEEP_DIR/<param>=<value>/eval_<task>.json)")
    if not Path(eval_cfg.squad_file).is_file():
        raise SweepError(f"--eval.squad_file={eval_cfg.squad_file!r}: no such file")
    try:
        check_eval_config(eval_cfg)
    except UserError as e:
        raise SweepError(str(e)) from None


def make_plan(param: str, values: Sequence[str], sweep_dir: str | Path, eval_cfg: ConfigDict,
              train_argv: Sequence[str]) -> Plan:
    """Checks the whole input and derives every value's train config; raises SweepError."""
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
    if eval_cfg.squad_file:
        _check_eval(eval_cfg)
    names = [run_dir_name(param, v) for v in values]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise SweepError(f"--values map to the same run directory {clashes[0]!r}; make them differ in "
                         "letters, digits or ._+-")
    configs = train_configs(param, values, train_argv)
    if any(cfg.logger.output_dir for cfg in configs.values()):
        raise SweepError("--logger.output_dir is set in the train flags (a --flagfile?): the sweep sets it "
                         "for each run (use --sweep_dir)")
    _warn_if_ineffective(param, configs[values[0]])
    return Plan(param, values, Path(sweep_dir).absolute(), eval_cfg, list(train_argv), configs,
                task_name(eval_cfg) if eval_cfg.squad_file else "")


def _warn_if_ineffective(param: str, cfg: ConfigDict) -> None:
    if param.endswith("text_processor.codemix_ratio"):
        group = param[:-len("codemix_ratio")]
        if not config.flatten(cfg).get(group + "codemix_dict_path"):
            print(f"warning: --{group}codemix_dict_path is not set, so --{param} changes nothing", file=sys.stderr)
