"""Orbax checkpoints.

A checkpoint is an Orbax composite directory. Its items:

* `params`     — the model parameters (Orbax PyTree; sharded arrays are written shard by shard);
* `train_state` — optimizer state, step and RNG key (train checkpoints only);
* `meta`       — JSON: step, dataset position per host, the resolved flags, the LLaMA config.

Training writes them under `output_dir/checkpoints/streaming_params_{step}` (EasyLM's name, so the
seed's `--load_checkpoint=params::$save_path/*/streaming_params_1210` works unchanged).
`convert_from_hf` writes a directory with `params` and `meta` only. `--load_checkpoint=params::PATH`
reads the `params` item of either kind; `trainstate::PATH` reads all of a train checkpoint.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from easylm_align.sharding import path_str

STEP_PREFIX = "streaming_params"


class CheckpointError(ValueError):
    pass


def resolve_path(path: str) -> Path:
    """Expands a glob (as the seed's `$save_path/*/streaming_params_1210`) to exactly one directory."""
    matches = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    if not matches:
        raise CheckpointError(f"checkpoint path {path!r} matches nothing")
    if len(matches) > 1:
        raise CheckpointError(f"checkpoint path {path!r} matches {len(matches)} directories: {matches[:4]}")
    p = Path(matches[0]).absolute()
    if not (p / "params").is_dir():
        raise CheckpointError(f"{p} is not a checkpoint: it has no 'params' item")
    return p


def parse_load_checkpoint(value: str) -> tuple[str, str]:
    """`params::PATH` or `trainstate::PATH` → (kind, path); '' → ('', '')."""
    if not value:
        return "", ""
    kind, sep, path = value.partition("::")
    if not sep or kind not in ("params", "trainstate") or not path:
        raise CheckpointError(f"--load_checkpoint={value!r}: expected 'params::PATH' or 'trainstate::PATH'")
    return kind, path


def read_meta(path: str | Path) -> dict:
    meta = Path(path) / "meta" / "metadata"
    if not meta.exists():
        return {}
    return json.loads(meta.read_text())


def save_params(path: str | Path, params: Any, meta: Optional[dict] = None) -> None:
    """Writes a params-only checkpoint (what `convert_from_hf` produces)."""
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta or {})}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(Path(path).absolute(), args=ocp.args.Composite(**items))


def _check_shapes(path: Path, target: Any) -> None:
    """Compares stored array shapes with the model's before restoring, to fail with a clear message."""
    stored = ocp.PyTreeCheckpointer().metadata(path / "params")
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
    flat_stored = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored_tree)[0]}
    flat_target = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    missing = sorted(set(flat_target) - set(flat_stored))
    extra = sorted(set(flat_stored) - set(flat_target))
    wrong = [f"{k}: checkpoint {tuple(flat_stored[k].shape)} vs model {tuple(flat_target[k].shape)}"
             for k in flat_target if k in flat_stored and tuple(flat_stored[k].shape) != tuple(flat_target[k].shape)]
    if missing or extra or wrong:
        lines = [f"checkpoint {path} does not match the model config:"]
        lines += [f"  shape mismatch {w}" for w in wrong[:8]]
        lines += [f"  missing in checkpoint: {m}" for m in missing[:8]]
        lines += [f"  not in model: {e}" for e in extra[:8]]
        lines.append("  (check --load_llama_config / --update_llama_config, e.g. scan_layers, tie_word_embeddings)")
        raise CheckpointError("\n".join(lines))


def load_params(path: str, target: Any) -> Any:
    """Restores the `params` item into `target`'s shapes, dtypes and shardings.

    `target` is a tree of jax.ShapeDtypeStruct (with `.sharding` for a sharded restore), so each
    host reads only its own shards and nothing is materialised twice.
    """
    ckpt = resolve_path(path)
    _check_shapes(ckpt, target)
    restore = jax.tree_util.tree_map(lambda x: ocp.utils.to_shape_dtype_struct(x) if not isinstance(
        x, jax.ShapeDtypeStruct) else x, target)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(ckpt, args=ocp.args.Composite(params=ocp.args.StandardRestore(restore)))
    logging.info("loaded params from %s", ckpt)
    return restored["params"]


def load_params_numpy(path: str) -> dict:
    """Restores the `params` item as host NumPy arrays in their stored dtypes (for conversion tools)."""
    ckpt = resolve_path(path)
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.restore(ckpt / "params")
    return jax.tree_util.tree_map(np.asarray, tree)


# ----------------------------------------------------------------------------------------------
# Train checkpoints
# ----------------------------------------------------------------------------------------------

def _restore_items(path: Path, params: Any, train_state: Any) -> tuple[Any, Any, dict]:
    abstract = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    _check_shapes(path, params)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(path, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params)),
            train_state=ocp.args.StandardRestore(abstract(train_state)),
            meta=ocp.args.JsonRestore()))
    return restored["params"], restored["train_state"], restored["meta"]


def load_train_state(path: str, params: Any, train_state: Any) -> tuple[Any, Any, dict]:
    """`trainstate::PATH`: params, optimizer state, step and RNG (targets as in `load_params`)."""
    ckpt = resolve_path(path)
    if not (ckpt / "train_state").is_dir():
        raise CheckpointError(f"{ckpt} holds no train state (a params-only checkpoint? use params::)")
    return _restore_items(ckpt, params, train_state)


class TrainCheckpointer:
    """Keeps the latest checkpoint (every `save_model_freq` steps) and every milestone
    (`save_milestone_freq`) under `output_dir/checkpoints/streaming_params_{step}`."""

    def __init__(self, output_dir: Path, save_model_freq: int, save_milestone_freq: int):
        self.save_model_freq, self.save_milestone_freq = save_model_freq, save_milestone_freq
        self.directory = (Path(output_dir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=1, keep_period=save_milestone_freq or None,
                                               step_prefix=STEP_PREFIX, create=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("params", "train_state", "meta"),
                                             options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def step_path(self, step: int) -> Path:
        return self.directory / f"{STEP_PREFIX}_{step}"

    def due(self, step: int) -> bool:
        return any(freq > 0 and step % freq == 0 for freq in (self.save_model_freq, self.save_milestone_freq))

    def save(self, step: int, params: Any, train_state: Any, meta: dict) -> None:
        self.manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), train_state=ocp.args.StandardSave(train_state),
            meta=ocp.args.JsonSave(meta)))

    def restore_latest(self, params: Any, train_state: Any) -> tuple[Any, Any, dict]:
        self.manager.wait_until_finished()
        return _restore_items(self.step_path(self.latest_step()), params, train_state)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
