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

Every checkpoint is sealed with the checksums of its files once written (`integrity`), and every
read verifies them first: a damaged checkpoint is refused in one line naming it and the file. A
checkpoint without checksums (older, or written elsewhere) is read with a warning, and any error
Orbax or TensorStore raises while reading it becomes one line naming the checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import json
import logging
import tempfile
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from easylm_align import integrity, model
from easylm_align.conversion import easylm_checkpoint
from easylm_align.errors import UserError
from easylm_align.tree_paths import path_str

STEP_PREFIX = "streaming_params"


class CheckpointError(UserError):
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


def verify(path: Path) -> None:
    """Checks `path`'s files against the checksums recorded when it was saved, before anything is read."""
    try:
        integrity.verify(path)
    except integrity.Unsealed as e:
        logging.warning("%s; reading it unverified", e)
    except integrity.DamagedCheckpoint as e:
        raise CheckpointError(f"{e}; it cannot be used") from None


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """An error Orbax, TensorStore or JSON raises while reading `path` (a truncated or missing file
    of an unsealed checkpoint) becomes one line naming the checkpoint."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = first.split(" See full TensorStore details")[0][:300]  # the rest is a repr of the spec
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {first}); it may be "
                              "truncated or damaged") from e


def read_meta(path: str | Path) -> dict:
    """The checkpoint's meta item; verified against the checksums first (it is small), since the
    config, tokenizer and data position it records decide how the rest is read."""
    meta = Path(path) / "meta" / "metadata"
    if not meta.exists():
        return {}
    try:
        integrity.verify(path, only=("meta/",))
    except integrity.Unsealed:
        pass  # reading the params says so
    except integrity.DamagedCheckpoint as e:
        raise CheckpointError(f"{e}; it cannot be used") from None
    with reading(Path(path)):
        return json.loads(meta.read_text())


def save_params(path: str | Path, params: Any, meta: Optional[dict] = None) -> None:
    """Writes a params-only checkpoint (what `convert_from_hf` produces), sealed with its checksums."""
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta or {})}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(Path(path).absolute(), args=ocp.args.Composite(**items))
    if jax.process_index() == 0:
        integrity.seal(Path(path).absolute())


def _stored_tree(path: Path) -> Any:
    """The `params` item's tree of array metadata. Read through the handler: a Checkpointer would
    look for step metadata inside the item and warn that it is missing, which it always is."""
    with reading(path):
        return ocp.PyTreeCheckpointHandler().metadata(path / "params").tree


def _stored_shapes(path: Path) -> dict[str, tuple]:
    return {path_str(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(_stored_tree(path))[0]}


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    return {path_str(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(path: Path, target: Any) -> None:
    """Compares stored array shapes with the model's before restoring, to fail with a clear message."""
    _compare_shapes(path, _stored_shapes(path), _flat_shapes(target))


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
    target = jax.tree_util.tree_map(lambda x: ocp.utils.to_shape_dtype_struct(x) if not isinstance(
        x, jax.ShapeDtypeStruct) else x, target)
    verify(ckpt)
    as_stored = _in_stored_layout(ckpt, target, target)
    if as_stored is not None:
        # Written with the other `scan_layers` layout: read it as stored, then (un)stack on device.
        params = _restore_params(ckpt, as_stored)
        logging.info("loaded params from %s (layers %s)", ckpt, "stacked" if "layers" in target else "unstacked")
        return _relayout(params, target)
    _check_shapes(ckpt, target)
    logging.info("loaded params from %s", ckpt)
    return _restore_params(ckpt, target)


def _in_stored_layout(ckpt: Path, params: Any, tree: Any) -> Optional[Any]:
    """`tree` (ShapeDtypeStructs holding `params`) in the other layer layout where `ckpt` holds
    `params` that way; None where it does not."""
    stored, n = _stored_shapes(ckpt), _num_layers(params)
    if n == 0 or stored == _flat_shapes(params) or stored != _flat_shapes(_other_layer_layout(params, n)):
        return None
    return _other_layer_layout(tree, n)


def _restore_params(ckpt: Path, target: Any) -> Any:
    with reading(ckpt), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        return ckptr.restore(ckpt, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]


def _num_layers(params: dict) -> int:
    if "layers" in params:
        return jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    return sum(key.startswith("layers_") for key in params)


def _holds_layers(node: Any) -> bool:
    return isinstance(node, dict) and ("layers" in node or "layers_0" in node)


def _map_layer_dicts(fn: Callable[..., dict], tree: Any, *rest: Any) -> Any:
    """`fn` on every dict of `tree` that holds the model's layers (the parameters, and the optimizer
    moments that mirror them), with the matching subtrees of `rest`; everything else as it is."""
    return jax.tree_util.tree_map(lambda node, *others: fn(node, *others) if _holds_layers(node) else node,
                                  tree, *rest, is_leaf=_holds_layers)


def _other_layer_layout(target: Any, n: int) -> Any:
    """`target` (ShapeDtypeStructs) with its `n` layers in the other layout; each leaf keeps its
    sharding, with the layer axis unsharded, so a stored layout is read shard by shard as well."""
    def relaid(leaf: jax.ShapeDtypeStruct, stack: bool) -> jax.ShapeDtypeStruct:
        shape = (n, *leaf.shape) if stack else leaf.shape[1:]
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            spec = P(None, *sharding.spec) if stack else P(*sharding.spec[1:])
            sharding = NamedSharding(sharding.mesh, spec)
        return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)

    def other(layers_dict: dict) -> dict:
        if "layers" in layers_dict:
            rest = {k: v for k, v in layers_dict.items() if k != "layers"}
            unstacked = jax.tree_util.tree_map(lambda x: relaid(x, False), layers_dict["layers"])
            return dict(rest, **{f"layers_{i}": unstacked for i in range(n)})
        rest = {k: v for k, v in layers_dict.items() if not k.startswith("layers_")}
        return dict(rest, layers=jax.tree_util.tree_map(lambda x: relaid(x, True), layers_dict["layers_0"]))

    return _map_layer_dicts(other, target)


def _relayout(tree: Any, target: Any) -> Any:
    """Stacks or unstacks the layers of `tree` into `target`'s layout and shardings."""
    def convert(stored: dict, wanted: dict) -> dict:
        if "layers" in wanted:
            return model.stack_layers(stored, _num_layers(stored))
        return model.unstack_layers(stored, _num_layers(wanted))  # counted by key: moments may be masked

    shardings = jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), target)
    if any(s is None for s in jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: x is None)):
        return _map_layer_dicts(convert, tree, target)
    return jax.jit(lambda t: _map_layer_dicts(convert, t, target), out_shardings=shardings)(tree)


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
    verify(ckpt)
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), _stored_tree(ckpt))
    with reading(ckpt), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        return ckptr.restore(ckpt, args=ocp.args.Composite(
            params=ocp.args.PyTreeRestore(restore_args=as_numpy)))["params"]


# ----------------------------------------------------------------------------------------------
# Train checkpoints
# ----------------------------------------------------------------------------------------------

def _restore_items(path: Path, params: Any, train_state: Any) -> tuple[Any, Any, dict]:
    targets = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, (params, train_state))
    as_stored = _in_stored_layout(path, targets[0], targets)
    if as_stored is not None:  # saved by a run that laid its layers out the other way
        restored, meta = _restore_train_items(path, as_stored)
        return (*_relayout(restored, targets), meta)
    _check_shapes(path, params)
    restored, meta = _restore_train_items(path, targets)
    return (*restored, meta)


def _restore_train_items(path: Path, targets: tuple[Any, Any]) -> tuple[tuple[Any, Any], dict]:
    with reading(path), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(path, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(targets[0]), train_state=ocp.args.StandardRestore(targets[1]),
            meta=ocp.args.JsonRestore()))
    return (restored["params"], restored["train_state"]), restored["meta"]


def load_train_state(path: str, params: Any, train_state: Any) -> tuple[Any, Any, dict]:
    """`trainstate::PATH`: params, optimizer state, step and RNG (targets as in `load_params`)."""
    ckpt = resolve_path(path)
    if easylm_checkpoint.is_streaming_file(ckpt):
        raise CheckpointError(f"{ckpt} is an EasyLM streaming file: its optimizer state is EasyLM's and is not "
                              "restored; start from its weights with params::PATH")
    if not (ckpt / "train_state").is_dir():
        raise CheckpointError(f"{ckpt} holds no train state (a params-only checkpoint? use params::)")
    verify(ckpt)
    return _restore_items(ckpt, params, train_state)


class CheckpointSaveError(RuntimeError):
    pass


def require_writable(directory: Path, flag: str) -> None:
    """Fails before training starts if `directory` cannot be created or written to."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise CheckpointError(f"{flag}={directory}: cannot write there ({e.strerror or e}); "
                         "choose a writable directory") from None


def checkpoints_dir(output_dir: str | Path) -> Path:
    """Where a training run writing to `output_dir` keeps its checkpoints."""
    return (Path(output_dir) / "checkpoints").absolute()


def step_path(output_dir: str | Path, step: int) -> Path:
    """The checkpoint of `step` of the run writing to `output_dir`: `checkpoints/streaming_params_{step}`."""
    return checkpoints_dir(output_dir) / f"{STEP_PREFIX}_{step}"


def saved_steps(output_dir: str | Path) -> list[int]:
    """The steps of the run's complete checkpoints, ascending (Orbax's temporary directories of a save
    in progress have another name, and a checkpoint counts once its params are written)."""
    directory = checkpoints_dir(output_dir)
    if not directory.is_dir():
        return []
    pattern = re.compile(rf"{STEP_PREFIX}_(\d+)")
    return sorted(int(m.group(1)) for p in directory.iterdir()
                  if (m := pattern.fullmatch(p.name)) and (p / "params").is_dir())


SET_ASIDE = "checkpoints_set_aside"  # where resume moves a damaged or unverifiable newest checkpoint


def _step_dirs(output_dir: Path) -> dict[int, Path]:
    directory = checkpoints_dir(output_dir)
    pattern = re.compile(rf"{STEP_PREFIX}_(\d+)")
    if not directory.is_dir():
        return {}
    return {int(m.group(1)): p for p in directory.iterdir() if (m := pattern.fullmatch(p.name)) and p.is_dir()}


def _set_aside(path: Path, output_dir: Path) -> Path:
    """Moves a checkpoint out of the run's way, keeping it for inspection (never deletes it)."""
    target = Path(output_dir).absolute() / SET_ASIDE / path.name
    n = 0
    while target.exists():
        n += 1
        target = target.with_name(f"{path.name}.{n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    path.rename(target)
    return target


def choose_resume_step(output_dir: Path) -> Optional[int]:
    """The newest checkpoint of the run whose checksums verify; newer ones that are damaged or were
    never sealed (killed between Orbax's commit and the seal) are named and set aside, so the run
    continues from the intact one. With no sealed checkpoint at all (written before checksums
    existed), the newest complete one is used, with a warning. Every process verifies; process 0 moves."""
    steps = _step_dirs(output_dir)
    problems: dict[int, str] = {}
    chosen = None
    for step in sorted(steps, reverse=True):
        try:
            integrity.verify(steps[step])
            chosen = step
            break
        except (integrity.Unsealed, integrity.DamagedCheckpoint) as e:
            problems[step] = str(e)
    if chosen is None:
        unsealed = [s for s in sorted(steps, reverse=True) if not integrity.is_sealed(steps[s])
                    and (steps[s] / "params").is_dir()]
        damaged = {s: m for s, m in problems.items() if integrity.is_sealed(steps[s])}
        if unsealed:
            chosen = unsealed[0]
            logging.warning("%s; resuming from it unverified", problems[chosen])
        elif damaged:
            raise CheckpointError(f"no intact checkpoint in {checkpoints_dir(output_dir)}: "
                                  + "; ".join(damaged[s] for s in sorted(damaged, reverse=True))
                                  + ". Nothing was changed: move the damaged checkpoints away to start over, or use "
                                    "another --logger.output_dir")
    newer = [s for s in problems if chosen is None or s > chosen]
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("easylm_align:checkpoints_verified")
    for step in sorted(newer, reverse=True):
        moved = _set_aside(steps[step], output_dir) if jax.process_index() == 0 else steps[step]
        fallback = f"resuming from the newest intact checkpoint {steps[chosen]}" if chosen is not None else \
            "no earlier checkpoint exists; starting from the beginning"
        logging.warning("%s; moved to %s; %s", problems[step], moved, fallback)
    if newer and jax.process_count() > 1:
        multihost_utils.sync_global_devices("easylm_align:checkpoints_set_aside")
    return chosen


class TrainCheckpointer:
    """Keeps the latest checkpoint (every `save_model_freq` steps) and every milestone
    (`save_milestone_freq`) under `output_dir/checkpoints/streaming_params_{step}`.

    Saves are asynchronous: `save` returns once the arrays are copied to host memory (so the
    caller may donate them to the next step) and Orbax writes them in the background, into a
    temporary directory renamed on commit. A kill mid-write leaves the previous checkpoint as the
    latest; the temporary directory is removed on the next start. Once a checkpoint is committed
    (`poll`, every step), process 0 seals it with its files' checksums in a background thread; at
    the next `save` or `wait`, after the seal, the older ones that are no milestone are deleted, so
    a sealed checkpoint exists at every moment. At start, the newest checkpoint that verifies is the
    one to resume from (`choose_resume_step`).
    """

    def __init__(self, output_dir: Path, save_model_freq: int, save_milestone_freq: int):
        self.save_model_freq, self.save_milestone_freq = save_model_freq, save_milestone_freq
        self.output_dir = Path(output_dir)
        self.directory = checkpoints_dir(output_dir)
        resume_step = choose_resume_step(self.output_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=None, step_prefix=STEP_PREFIX, create=True,
                                               enable_async_checkpointing=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("params", "train_state", "meta"),
                                             options=options)
        self.committed: Optional[int] = self.manager.latest_step()  # the newest complete checkpoint
        # The newest checkpoint whose checksums are recorded (and, at start, verified).
        self.verified: Optional[int] = resume_step if resume_step is not None and integrity.is_sealed(
            self.step_path(resume_step)) else None
        self._writing: Optional[int] = None
        self._sealer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seal")
        self._sealing: Optional[concurrent.futures.Future] = None

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def step_path(self, step: int) -> Path:
        return step_path(self.output_dir, step)

    def due(self, step: int) -> bool:
        return any(freq > 0 and step % freq == 0 for freq in (self.save_model_freq, self.save_milestone_freq))

    def _milestone(self, step: int) -> bool:
        return self.save_milestone_freq > 0 and step % self.save_milestone_freq == 0

    def save(self, step: int, params: Any, train_state: Any, meta: dict) -> None:
        """Starts writing `step`; the previous save is finished (or its error raised) first."""
        self.wait()
        self._writing = step
        with self._naming_failure():
            self.manager.save(step, force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), train_state=ocp.args.StandardSave(train_state),
                meta=ocp.args.JsonSave(meta)))

    def poll(self) -> None:
        """Called after every step: starts sealing the checkpoint being written as soon as Orbax has
        committed it (its final directory exists), so a kill soon after still leaves it sealed."""
        if (self._writing is not None and self._sealing is None and jax.process_index() == 0
                and not self.manager.is_saving_in_progress() and self.step_path(self._writing).is_dir()):
            self._sealing = self._sealer.submit(integrity.seal, self.step_path(self._writing))

    def wait(self) -> None:
        """Blocks until the save in progress is committed and sealed; then drops what it supersedes."""
        with self._naming_failure():
            self.manager.wait_until_finished()
            if self._writing is None:
                return
            self.poll()
            if self._sealing is not None:
                self._sealing.result()
                self._sealing = None
            self.committed = self.verified = self._writing
            self._writing = None
            for old in self.manager.all_steps():
                if old < self.committed and not self._milestone(old):
                    self.manager.delete(old)

    @contextlib.contextmanager
    def _naming_failure(self) -> Iterator[None]:
        """A failed write (disk full, permissions) names the checkpoint and the one still intact."""
        try:
            yield
        except Exception as e:
            step, self._writing, self._sealing = self._writing, None, None
            kept = (f"the previous checkpoint {self.step_path(self.verified)} is intact" if self.verified
                    is not None else "no earlier checkpoint exists")
            raise CheckpointSaveError(f"writing checkpoint {self.step_path(step)} failed: {e}\n{kept}; free space "
                                      "or fix --logger.output_dir, then rerun the same command to resume") from e

    def restore_latest(self, params: Any, train_state: Any) -> tuple[Any, Any, dict]:
        """The checkpoint chosen at start (verified then), before any save of this run."""
        self.manager.wait_until_finished()
        return _restore_items(self.step_path(self.latest_step()), params, train_state)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            self._sealer.shutdown()
