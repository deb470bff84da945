"""EasyLM-style flags: each `ConfigDict` default becomes a dotted absl flag group.

`define_flags_with_default(optimizer=optimizer.default_config(), seed=42, ...)` defines
`--optimizer.adamw_optimizer.lr=2e-5`-style flags. `parse_flags_or_exit` checks every flag name
on the command line before absl sees it, so a typo fails at once, names the flag and suggests the
nearest valid one, before anything is compiled. `parse_config` does the same parsing for a
command line that is not this process's own (the sweep validating a trainer command): it returns
the config that command would run with, without defining any global flag.
"""

from __future__ import annotations

import copy
import difflib
import sys
from typing import Any, Mapping, Optional, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

from easylm_align import flag_help

from easylm_align.errors import ConfigError

FLAGS = flags.FLAGS
# What parsing a malformed flag value raises (absl's own errors, ml_collections' for dotted flags).
FLAG_VALUE_ERRORS = (flags.Error, ValueError, KeyError, TypeError, AttributeError)
_DEFINED: dict[str, Any] = {}


def _define(fv: flags.FlagValues, name: str, value: Any, argv: Sequence[str]) -> None:
    """One flag (a ConfigDict: a dotted group) on `fv`; ml_collections reads a group's overrides from `argv`."""
    if isinstance(value, ConfigDict):
        config_flags.DEFINE_config_dict(name, value, flag_values=fv, sys_argv=list(argv))
    elif isinstance(value, bool):
        flags.DEFINE_bool(name, value, flag_help.description(name) or None, flag_values=fv)
    elif isinstance(value, int):
        flags.DEFINE_integer(name, value, flag_help.description(name) or None, flag_values=fv)
    elif isinstance(value, float):
        flags.DEFINE_float(name, value, flag_help.description(name) or None, flag_values=fv)
    elif isinstance(value, str):
        flags.DEFINE_string(name, value, flag_help.description(name) or None, flag_values=fv)
    else:
        raise TypeError(f"flag {name}: unsupported default of type {type(value).__name__}")


def define_flags_with_default(**defaults: Any) -> dict[str, Any]:
    """Defines one global absl flag per keyword; ConfigDicts become dotted flag groups."""
    for name, value in defaults.items():
        if isinstance(value, ConfigDict):
            # ml_collections applies `--name.x.y=` overrides from sys.argv while defining the flag,
            # so misspelt names in this group must be caught before that.
            _exit_on_unknown(sys.argv, _leaf_names(name, value), prefix=f"{name}.")
        _define(FLAGS, name, value, sys.argv)
        _DEFINED[name] = value
    return defaults


def flatten(tree: Mapping[str, Any] | ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{dotted name: value} for each leaf of a config tree (ConfigDicts or the dicts of its JSON)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, (Mapping, ConfigDict)):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _leaf_names(name: str, group: ConfigDict) -> list[str]:
    return list(flatten(group, f"{name}."))


def flag_names(defaults: Mapping[str, Any] | ConfigDict) -> list[str]:
    """Every flag name `defaults` defines: `seed`, and `optimizer.adamw_optimizer.lr` for each leaf of a group."""
    return list(flatten(defaults))


def known_flag_names() -> list[str]:
    """The names this process accepts on its command line: its own flags and absl's."""
    return [name for name in FLAGS if name not in _DEFINED] + flag_names(_DEFINED)


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


HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "--helpfull", "-helpfull")


def parse_flags_or_exit(argv: Sequence[str]) -> list[str]:
    """absl `flags_parser` for app.run: clear one-line errors for misspelt or malformed flags; the
    help flags print every flag with a one-line description (`flag_help`) and exit."""
    asked = [a for a in argv[1:] if a in HELP_FLAGS]
    if asked:
        print(help_text(full=any("full" in a for a in asked)))
        sys.exit(0)
    _exit_on_unknown(argv, known_flag_names())
    try:
        return FLAGS(argv)
    except FLAG_VALUE_ERRORS as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


def help_text(full: bool = False) -> str:
    """The program's docstring and its flags, one line each (absl would print each group as a dict);
    `full` adds absl's own flags (--flagfile, --verbosity, ...)."""
    main = sys.modules.get("__main__")
    text = flag_help.usage(_DEFINED, getattr(main, "__doc__", "") or "")
    groups = tuple(f"{name}." for name in _DEFINED)
    own = []  # flags a program defines with absl directly (the sweep's --param, convert's flags)
    for name in sorted(set(FLAGS)):
        flag = FLAGS[name]
        module = FLAGS.find_module_defining_flag(name, "")
        if name in _DEFINED or name.startswith(groups) or flag.name != name or not _ours(module):
            continue
        own.append(f"  --{name}={flag.default}  {flag.help or ''}".rstrip())
    if own:
        text += "\n" + "\n".join(own)
    if full:
        others = sorted({FLAGS.find_module_defining_flag(n, "") for n in FLAGS} - {""})
        text += ("\n\nFlags of absl and the libraries:\n  --flagfile=FILE  read flags from FILE, one per line "
                 "(flags after it override them)\n" + "\n".join(FLAGS.module_help(m) for m in others if not _ours(m)))
    else:
        text += "\n\n--helpfull also lists the flags of absl (--flagfile, --verbosity, ...) and the libraries."
    return text


def _ours(module: str) -> bool:
    return module == "__main__" or module.startswith("easylm_align")


def parsed_config() -> ConfigDict:
    """The parsed value of every flag this program defined, as one ConfigDict."""
    return ConfigDict({name: getattr(FLAGS, name) for name in _DEFINED})


def _absl_flags(fv: flags.FlagValues) -> None:
    """Adds absl's own flags (--verbosity, --flagfile, ...) to `fv`: a command line may use them."""
    for name in list(FLAGS):
        if FLAGS[name].name == name and FLAGS.find_module_defining_flag(name, "").startswith("absl"):
            fv[name] = FLAGS[name]


def parse_config(defaults: ConfigDict, argv: Sequence[str]) -> ConfigDict:
    """The config the command line `argv` (program name first; `--flagfile` allowed) gives a program
    whose flags are `defaults`, parsed as that program would, with no global flag defined.

    Raises ConfigError naming an unknown flag (and the nearest known one) or a malformed value."""
    try:
        argv = [argv[0], *FLAGS.read_flags_from_files(list(argv[1:]), force_gnu=False)]
        fv = flags.FlagValues()
        _absl_flags(fv)
        check_flag_names(argv, [*fv, *flag_names(defaults)])
        for name, value in copy.deepcopy(defaults).items():
            _define(fv, name, value, argv)
        fv(argv)
    except (*FLAG_VALUE_ERRORS, OSError) as e:
        raise ConfigError(str(e)) from None
    return ConfigDict({name: getattr(fv, name) for name in defaults})


def flag_value(value: Any) -> str:
    """A value as written on a command line (absl reads booleans as true/false)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def to_flags(cfg: Mapping[str, Any], defaults: Optional[Mapping[str, Any]] = None) -> list[str]:
    """`--name=value` for each leaf of `cfg` that is set (not None) and, when `defaults` is given,
    differs from it: the command line that gives `cfg` to a program parsing its flags."""
    base = flatten(defaults) if defaults is not None else {}
    return [f"--{name}={flag_value(value)}" for name, value in flatten(cfg).items()
            if value is not None and (defaults is None or base.get(name) != value)]
