"""Orbax checkpoints.

A checkpoint is an Orbax composite directory. Its items:

* `params`     — the model parameters (Orbax PyTree; sharded arrays are written shard by shard);
* `train_state` — optimizer state, step and RNG key (train checkpoints only);
* `meta`       — JSON: step, the data position (one for all hosts), the resolved flags, the LLaMA config.

Training writes them under `output_dir/checkpoints/streaming_params_{step}` (EasyLM's name, so the
seed's `--load_checkpoint=params::$save_path/*/streaming_params_1210` works unchanged).
`convert_from_hf` writes a directory with `params` and `meta` only. `--load_checkpoint=params::PATH`
reads the `params` item of either kind; `trainstate::PATH` reads all of a train checkpoint.
`params::PATH` also reads a file written by EasyLM (`streaming_params_*` or the weights of a
`streaming_train_state_*`), converted to our layout on load (see `easylm_checkpoint`).
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

from easylm_align import easylm_checkpoint, model
from easylm_align.sharding import path_str

STEP_PREFIX = "streaming_params"


class CheckpointError(ValueError):
    pass


def resolve_path(path: str) -> Path:
    """Expands a glob (as the seed's `$save_path/*/streaming_params_1210`) to exactly one checkpoint:
    one of our directories, or an EasyLM streaming file."""
    matches = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    if not matches:
        raise CheckpointError(f"checkpoint path {path!r} matches nothing")
    if len(matches) > 1:
        raise CheckpointError(f"checkpoint path {path!r} matches {len(matches)} directories: {matches[:4]}")
    p = Path(matches[0]).absolute()
    if easylm_checkpoint.is_streaming_file(p):
        return p
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
    flat_stored = {path_str(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(stored_tree)[0]}
    flat_target = {path_str(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    _compare_shapes(path, flat_stored, flat_target)


def _compare_shapes(path: Path, flat_stored: dict[str, tuple], flat_target: dict[str, tuple]) -> None:
    missing = sorted(set(flat_target) - set(flat_stored))
    extra = sorted(set(flat_stored) - set(flat_target))
    wrong = [f"{k}: checkpoint {flat_stored[k]} vs model {flat_target[k]}"
             for k in flat_target if k in flat_stored and flat_stored[k] != flat_target[k]]
    if missing or extra or wrong:
        lines = [f"checkpoint {path} does not match the model config:"]
        lines += [f"  shape mismatch {w}" for w in wrong[:8]]
        lines += [f"  missing in checkpoint: {m}" for m in missing[:8]]
        lines += [f"  not in model: {e}" for e in extra[:8]]
        lines.append("  (check --load_llama_config / --update_llama_config, e.g. scan_layers, tie_word_embeddings)")
        raise CheckpointError("\n".join(lines))


def load_params(path: str, target: Any, llama_config: Optional[Any] = None) -> Any:
    """Restores the `params` item into `target`'s shapes, dtypes and shardings.

    `target` is a tree of jax.ShapeDtypeStruct (with `.sharding` for a sharded restore), so each
    host reads only its own shards and nothing is materialised twice. An EasyLM streaming file
    is converted on the way; its q/k reordering is per head, so it needs `llama_config`.
    """
    ckpt = resolve_path(path)
    if easylm_checkpoint.is_streaming_file(ckpt):
        return _load_easylm(ckpt, target, llama_config)
    _check_shapes(ckpt, target)
    restore = jax.tree_util.tree_map(lambda x: ocp.utils.to_shape_dtype_struct(x) if not isinstance(
        x, jax.ShapeDtypeStruct) else x, target)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(ckpt, args=ocp.args.Composite(params=ocp.args.StandardRestore(restore)))
    logging.info("loaded params from %s", ckpt)
    return restored["params"]


def _load_easylm(path: Path, target: Any, llama_config: Optional[Any]) -> Any:
    """An EasyLM file into `target`, one tensor at a time (each placed on its shards as read)."""
    if llama_config is None:
        raise CheckpointError(f"{path} is an EasyLM streaming file; reading it needs the model config")
    try:
        reader = easylm_checkpoint.StreamingParams(path, model.head_dim(llama_config))
    except easylm_checkpoint.EasyLMFormatError as e:
        raise CheckpointError(str(e)) from None
    flat_target = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    scanned = any(name.startswith("layers/") for name in flat_target)
    # The file is unscanned: compare in that layout, then stack the layers if the model scans them.
    unscanned = {}
    for name, leaf in flat_target.items():
        if scanned and name.startswith("layers/"):
            unscanned.update({f"layers_{i}/{name[7:]}": tuple(leaf.shape[1:]) for i in range(leaf.shape[0])})
        else:
            unscanned[name] = tuple(leaf.shape)
    _compare_shapes(path, reader.shapes, unscanned)

    def place(name: str, leaf: Any) -> jax.Array:
        if scanned and name.startswith("layers/"):
            array = np.stack([reader.read(f"layers_{i}/{name[7:]}") for i in range(leaf.shape[0])])
        else:
            array = reader.read(name)
        array = array.astype(leaf.dtype)
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            return jax.numpy.asarray(array)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    logging.info("loading EasyLM streaming params from %s (rotary q/k reordered to the half-split layout)", path)
    return jax.tree_util.tree_map_with_path(lambda p, leaf: place(path_str(p), leaf), target)


def load_params_numpy(path: str) -> dict:
    """Restores the `params` item as host NumPy arrays in their stored dtypes (for conversion tools),
    whatever devices wrote it: NumPy targets need none of the saved shardings' devices to exist."""
    ckpt = resolve_path(path)
    with ocp.PyTreeCheckpointer() as ckptr:
        stored = ckptr.metadata(ckpt / "params")
        stored = getattr(getattr(stored, "item_metadata", stored), "tree", stored)
        as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
        return ckptr.restore(ckpt / "params", args=ocp.args.PyTreeRestore(restore_args=as_numpy))


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
    if easylm_checkpoint.is_streaming_file(ckpt):
        raise CheckpointError(f"{ckpt} is an EasyLM streaming file: its optimizer state is EasyLM's and is not "
                              "restored; start from its weights with params::PATH")
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
