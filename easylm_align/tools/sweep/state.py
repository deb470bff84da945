"""What a value's run directory already holds, so that running the same sweep again resumes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ml_collections import ConfigDict

from easylm_align import checkpoint, config, logger

# Flags that do not change what a run learns up to its last checkpoint: a finished or interrupted
# run may be resumed with other values of these. (A larger total_steps continues training.)
_RESUMABLE_FLAGS = ("logger.", "log_freq", "save_model_freq", "save_milestone_freq", "eval_steps",
                    "eval_dataset.", "total_steps", "mesh_dim", "jax_distributed.")
# Eval settings that must match for an existing report to be reused.
_REPORT_KEYS = ("squad_file", "lang", "prompt_lang", "prompt_style", "shots", "seed", "max_new_tokens",
                "max_examples", "add_bos_token", "load_checkpoint")
# The report's aggregate keys the summary reads; a report written before they were named so is recomputed.
METRICS = ("exact_match", "f1", "multilingual_exact_match", "multilingual_f1")


def final_checkpoint(run_dir: Path, cfg: ConfigDict) -> Path:
    return checkpoint.step_path(run_dir, cfg.total_steps)


def final_loss(run_dir: Path) -> tuple[Optional[int], Optional[float]]:
    """(step, loss) of the last row the run logged."""
    rows = [r for r in logger.read_metrics(run_dir) if "loss" in r]
    return (int(rows[-1]["step"]), float(rows[-1]["loss"])) if rows else (None, None)


def changed_flags(run_dir: Path, cfg: ConfigDict) -> list[str]:
    """Flags with which an existing run was trained that differ from `cfg` (ignoring
    `_RESUMABLE_FLAGS`, and flags that only one side knows). Empty when the directory holds no run."""
    path = run_dir / "config.json"
    if not path.exists():
        return []
    before = config.flatten(json.loads(path.read_text()))
    now = config.flatten(json.loads(json.dumps(cfg.to_dict())))  # as the trainer wrote it: tuples are lists
    return [f"--{k}: {before[k]!r} -> {now[k]!r}" for k in sorted(set(before) & set(now))
            if not k.startswith(_RESUMABLE_FLAGS) and before[k] != now[k]]


def run_state(run_dir: Path, cfg: ConfigDict) -> tuple[str, str]:
    """(kind, description) of a value's run directory: kind is new, partial, finished, ahead
    (trained past total_steps) or changed (trained with other flags)."""
    changed = changed_flags(run_dir, cfg)
    if changed:
        return "changed", f"{run_dir} was trained with other flags ({'; '.join(changed[:4])}); delete it or use " \
                          "another --sweep_dir"
    steps, total = checkpoint.saved_steps(run_dir), cfg.total_steps
    if total in steps:
        return "finished", f"trained already (step {total})"
    if steps and steps[-1] > total:
        return "ahead", f"the run is already at step {steps[-1]}, past --total_steps={total}"
    if steps:
        return "partial", f"resumes from step {steps[-1]}"
    return "new", "new"


def report_is_current(path: Path, eval_cfg: ConfigDict, ckpt: Path) -> bool:
    """Whether `path` holds a report of `ckpt` with these eval settings."""
    if not path.exists():
        return False
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        stored, aggregate = report["config"], report["aggregate"]
    except (ValueError, KeyError):
        return False
    wanted: dict[str, Any] = dict(eval_cfg.to_dict(), load_checkpoint=f"params::{ckpt}")
    return all(stored.get(k) == wanted.get(k) for k in _REPORT_KEYS) and all(k in aggregate for k in METRICS)
