"""EasyLM-style flags: each `ConfigDict` default becomes a dotted absl flag group.

`define_flags_with_default(optimizer=optimizer.default_config(), seed=42, ...)` defines
`--optimizer.adamw_optimizer.lr=2e-5`-style flags. `parse_flags_or_exit` checks every flag name
on the command line before absl sees it, so a typo fails at once, names the flag and suggests the
nearest valid one, before anything is compiled.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

FLAGS = flags.FLAGS
# What parsing a malformed flag value raises (absl's own errors, ml_collections' for dotted flags).
FLAG_VALUE_ERRORS = (flags.Error, ValueError, KeyError, TypeError, AttributeError)
_DEFINED: dict[str, Any] = {}


def define_flags_with_default(**defaults: Any) -> dict[str, Any]:
    """Defines one absl flag per keyword; ConfigDicts become dotted flag groups."""
    for name, value in defaults.items():
        if isinstance(value, ConfigDict):
            # ml_collections applies `--name.x.y=` overrides from sys.argv while defining the flag,
            # so misspelt names in this group must be caught before that.
            _exit_on_unknown(sys.argv, _leaf_names(name, value), prefix=f"{name}.")
            config_flags.DEFINE_config_dict(name, value)
        elif isinstance(value, bool):
            flags.DEFINE_bool(name, value, None)
        elif isinstance(value, int):
            flags.DEFINE_integer(name, value, None)
        elif isinstance(value, float):
            flags.DEFINE_float(name, value, None)
        elif isinstance(value, str):
            flags.DEFINE_string(name, value, None)
        else:
            raise TypeError(f"flag {name}: unsupported default of type {type(value).__name__}")
        _DEFINED[name] = value
    return defaults


def _leaf_names(prefix: str, cfg: ConfigDict) -> list[str]:
    names = []
    for key, value in cfg.items():
        if isinstance(value, ConfigDict):
            names += _leaf_names(f"{prefix}.{key}", value)
        else:
            names.append(f"{prefix}.{key}")
    return names


def known_flag_names() -> list[str]:
    names = [name for name in FLAGS if name not in _DEFINED or not isinstance(_DEFINED[name], ConfigDict)]
    for name, value in _DEFINED.items():
        if isinstance(value, ConfigDict):
            names += _leaf_names(name, value)
    return names


def check_flag_names(argv: Sequence[str], known: Sequence[str], prefix: str = "") -> None:
    """Raises flags.Error naming the first unknown `--flag` (and the nearest known one).

    Only names starting with `prefix` are checked."""
    known_set = set(known)
    for arg in argv[1:]:
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        if not name.startswith(prefix) or name in known_set or (name.startswith("no") and name[2:] in known_set):
            continue
        near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        hint = f"; did you mean --{near[0]}?" if near else ""
        raise flags.Error(f"unknown flag --{name}{hint}")


def _exit_on_unknown(argv: Sequence[str], known: Sequence[str], prefix: str = "") -> None:
    try:
        expanded = [argv[0], *FLAGS.read_flags_from_files(list(argv[1:]), force_gnu=False)]  # --flagfile
        check_flag_names(expanded, known, prefix)
    except (flags.Error, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


def parse_flags_or_exit(argv: Sequence[str]) -> list[str]:
    """absl `flags_parser` for app.run: clear one-line errors for misspelt or malformed flags."""
    _exit_on_unknown(argv, known_flag_names())
    try:
        return FLAGS(argv)
    except FLAG_VALUE_ERRORS as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


def parsed_config() -> ConfigDict:
    """The parsed value of every flag this program defined, as one ConfigDict."""
    return ConfigDict({name: getattr(FLAGS, name) for name in _DEFINED})
