"""The sweep's command line: its own flags before `--`, the trainer's after (see the package docstring)."""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags

from easylm_align.config import FLAGS, define_flags_with_default, parse_flags_or_exit
from easylm_align.evaluation.qa import default_eval_config
from easylm_align.tools.sweep.orchestrate import run_sweep
from easylm_align.tools.sweep.plan import SweepError, make_plan, parse_values


def define_flags() -> None:
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
        plan = make_plan(FLAGS.param or "", parse_values(FLAGS.values), FLAGS.sweep_dir, FLAGS.eval, argv[1:])
        code = run_sweep(plan, FLAGS.dry_run)
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
