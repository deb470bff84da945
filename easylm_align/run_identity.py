"""A resumed run is the run that was saved: its results-relevant flags must match the checkpoint's.

Every train checkpoint records the resolved flags in its meta. Rerunning a command on the same
`--logger.output_dir` resumes; with other settings (data, model config, batch size, optimizer...)
it would silently continue the old run's weights, optimizer, step and data position under the new
flags. `check_resume` refuses that with one line naming each differing flag with both values,
unless the flag is one that may change between the parts of a run (`MAY_CHANGE`) or the user
accepts the change by name with `--resume_despite_changes=FLAG,...`.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from easylm_align.errors import ConfigError

# Dotted flag names (a group name covers its flags) that may differ from the checkpoint's on resume:
# they change how long the run goes, what is logged, saved or evaluated, or where it runs, but not
# what a trained step computes.
MAY_CHANGE = (
    "total_steps",             # extending (or ending) the run
    "log_freq", "logger",      # what is logged, and where
    "save_model_freq", "save_milestone_freq",
    "eval_steps", "eval_dataset", "squad_eval",
    "mesh_dim", "jax_distributed",   # the devices and hosts the same steps run on (tests/test_multihost.py)
    "llama.scan_layers",             # the layer layout: checkpoints are restacked on load (the presets' "auto")
    "train_dataset.num_workers",     # processing in worker processes yields the same examples in order
    "dry_run", "dry_run_topology", "resume_despite_changes",
)


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], tree


def _covered(name: str, names: tuple[str, ...] | list[str]) -> bool:
    return any(name == n or name.startswith(n + ".") for n in names)


def differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted flag: (saved value, current value)} for flags both record and that may not change.
    A flag only one side has (added or removed by a newer version of the code) is not compared."""
    saved_flat = dict(_flat(saved))
    current_flat = dict(_flat(json.loads(json.dumps(current))))  # tuples as lists, as saved
    return {name: (saved_flat[name], value) for name, value in current_flat.items()
            if name in saved_flat and saved_flat[name] != value and not _covered(name, MAY_CHANGE)}


def check_resume(saved_flags: dict, current: dict, accepted: str, checkpoint: Any) -> None:
    """Raises ConfigError unless every results-relevant flag matches `saved_flags` or is accepted
    by `--resume_despite_changes` (a comma-separated list of dotted flag or group names)."""
    accepted_names = [n.strip().lstrip("-") for n in accepted.split(",") if n.strip()]
    refused = {k: v for k, v in differences(saved_flags, current).items() if not _covered(k, accepted_names)}
    if not refused:
        return
    changes = "; ".join(f"--{name}: saved {json.dumps(old)}, now {json.dumps(new)}"
                        for name, (old, new) in sorted(refused.items()))
    output_dir = current.get("logger", {}).get("output_dir", "")
    raise ConfigError(
        f"--logger.output_dir={output_dir} holds a run with other settings (checkpoint {checkpoint}): {changes}. "
        f"Start a new run with another --logger.output_dir, or continue this one with the new values by adding "
        f"--resume_despite_changes={','.join(sorted(refused))}")
