"""`python -m easylm_align.train`: the train loop. It only wires the other modules together.

With no flags it trains the tiny `demo` LLaMA on the demo corpus shipped in the package, on
whatever devices JAX sees (the CPU on a laptop), in about a minute. Every COMMIT flag from the
paper's README works as in EasyLM (see README.md).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import logging as absl_logging
from ml_collections import ConfigDict
from tqdm import tqdm

from easylm_align import (checkpoint, logger, model, objectives, optimizer, preemption, resize,
                          run_identity, run_lock, sharding, tokenizer, tpu_topology)
from easylm_align.config import FLAGS, define_flags_with_default, parse_flags_or_exit, parsed_config
from easylm_align.data import mixture, pipeline
from easylm_align.errors import ConfigError, exit_on_user_error
from easylm_align.evaluation import during_training
from easylm_align.model import attention, memory, platform as model_platform
from easylm_align.train_config import default_config

# stop: a non-finite loss ends the run (exit 1) and keeps the last good checkpoint;
# skip: a step whose loss or gradient norm is not finite leaves weights and optimizer state as they were.
NONFINITE_POLICIES = ("stop", "skip")


class TrainingDiverged(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: ConfigDict):
        self.cfg = cfg
        if cfg.dry_run_topology and not cfg.dry_run:
            raise ConfigError(f"--dry_run_topology={cfg.dry_run_topology}: it only compiles; add --dry_run=True")
        # A dry run for a TPU slice compiles on that slice's devices, for the TPU's kernels.
        self.mesh = sharding.make_mesh(
            cfg.mesh_dim, tpu_topology.devices(cfg.dry_run_topology) if cfg.dry_run_topology else None)
        self.platform = self.mesh.devices.flat[0].platform
        self.llama_config = model.get_llama_config(cfg.load_llama_config, cfg.update_llama_config,
                                                   cfg.llama.to_dict(), self.platform)
        self.tokenizer = tokenizer.Tokenizer.from_config(cfg.tokenizer)
        self.llama_config.vocab_size = resize.padded_vocab_size(
            self.tokenizer.vocab_size, self.llama_config.vocab_size, cfg.resize.pad_vocab_to_multiple)
        self.tokenizer.check_fits(self.llama_config.vocab_size)
        if cfg.objective not in objectives.OBJECTIVES:
            raise ConfigError(f"--objective={cfg.objective!r}: choose one of {sorted(objectives.OBJECTIVES)}")
        if cfg.total_steps <= 0:
            raise ConfigError(f"--total_steps={cfg.total_steps}: nothing would be trained; give a positive number")
        if cfg.nonfinite_policy not in NONFINITE_POLICIES:
            raise ConfigError(f"--nonfinite_policy={cfg.nonfinite_policy!r}: choose one of {NONFINITE_POLICIES}")
        if cfg.log_freq < 1:
            raise ConfigError(f"--log_freq={cfg.log_freq}: must be at least 1 (log every N steps)")
        _warn_if_beyond_positions(cfg.train_dataset, self.llama_config.max_position_embeddings)
        self.model = model.build_model(self.llama_config, cfg.dtype, cfg.param_dtype)
        with model_platform.compiling_for(self.platform):
            try:  # a backend the run's options rule out is a config error, found before any data is read
                self.attention_backend = attention.resolve(
                    self.llama_config.attention, model.run_options(self.llama_config, False, self.model.dtype))
            except ConfigError as e:
                raise ConfigError(f"--llama.attention / --update_llama_config: {e}") from None
            self.loss_kernel = objectives.clm_loss_kernel(cfg.objectives)
        objectives.resolve_loss_average(cfg.objectives.loss_average, cfg.objective)  # a bad value fails here
        _check_reference_ranks(cfg)
        if cfg.dry_run:  # shapes come from the config; no data is opened
            self.train_data = self.eval_data = None
        else:
            self.train_data = self._dataset(cfg.train_dataset, "--train_dataset")
            self.eval_data = self._dataset(cfg.eval_dataset, "--eval_dataset") if cfg.eval_steps > 0 else None
        self.squad_eval = during_training.SquadDuringTraining(cfg.squad_eval, self.model, self.tokenizer, self.mesh)
        self.tx, self.current_lr = optimizer.build(cfg.optimizer)
        self._abstract: Any = None  # (params, state) ShapeDtypeStructs, see _abstract_state
        self.output_dir = Path(cfg.logger.output_dir or f"outputs/{time.strftime('%Y%m%d-%H%M%S')}").absolute()

    def _dataset(self, config, flag: str) -> pipeline.DatasetIterator:
        data = pipeline.DatasetIterator(config, self.tokenizer, flag)
        prefix, _ = pipeline.source_group(config, flag)
        sharding.check_batch_divisible(data.batch_size, self.mesh, f"{prefix}.batch_size")
        return data

    # -- state ---------------------------------------------------------------------------------

    def _init_state(self, rng: jax.Array) -> tuple[Any, dict]:
        params = model.init_params(self.model, rng)
        return params, self._fresh_train_state(params, rng)

    def _fresh_train_state(self, params: Any, rng: jax.Array) -> dict:
        return {"opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.fold_in(rng, 1)), "nonfinite_skips": jnp.zeros((), jnp.int32)}

    def _abstract_state(self) -> tuple[Any, Any]:
        """Shapes, dtypes and shardings of the parameters and train state; nothing is allocated."""
        if self._abstract is None:  # traced once: tracing a large unrolled model takes seconds
            abstract_params, abstract_state = jax.eval_shape(self._init_state, jax.random.PRNGKey(self.cfg.seed))
            self.param_sh = sharding.param_shardings(abstract_params, self.mesh)
            self.state_sh = sharding.state_shardings(abstract_state, self.mesh)
            self._abstract = (sharding.with_shardings(abstract_params, self.param_sh),
                              sharding.with_shardings(abstract_state, self.state_sh))
        return self._abstract

    def _build_state(self, ckpt: checkpoint.TrainCheckpointer) -> tuple[Any, dict]:
        rng = jax.random.PRNGKey(self.cfg.seed)
        params_t, state_t = self._abstract_state()
        kind, path = checkpoint.parse_load_checkpoint(self.cfg.load_checkpoint)
        step = ckpt.latest_step()
        if step is not None:  # resume this run: weights, optimizer, step, RNG and data
            where = ckpt.step_path(step)
            meta = checkpoint.read_meta(where)
            self._check_tokenizer(meta, where, resize_allowed=False)
            self._check_resume(meta, where, step)
            self._check_optimizer_layout(meta, where)
            params, state, meta = ckpt.restore_latest(params_t, state_t)
            self.train_data.load_state_dict(pipeline.saved_position(meta["dataset"], str(where)))
            if jax.process_index() == 0:
                print(f"resuming from step {int(state['step'])} of {self.output_dir}", flush=True)
            return params, state
        if kind:
            where = checkpoint.resolve_path(path)
            meta = checkpoint.read_meta(where)
            self._check_tokenizer(meta, where, resize_allowed=kind == "params")
        if kind == "trainstate":
            self._check_optimizer_layout(meta, where)
            params, state, _ = checkpoint.load_train_state(path, params_t, state_t)
            if int(state["step"]) >= self.cfg.total_steps:
                raise ConfigError(f"--load_checkpoint={self.cfg.load_checkpoint} is at step {int(state['step'])}, "
                                  f"not below --total_steps={self.cfg.total_steps}: nothing would be trained; "
                                  "raise --total_steps")
            return params, state
        if kind == "params":
            # A smaller vocabulary (an extended tokenizer) grows to the model's: resize.py.
            params = resize.load_params(path, params_t, self.llama_config, self.cfg.resize,
                                        self.cfg.tokenizer.vocab_file)
            state = jax.jit(self._fresh_train_state, out_shardings=self.state_sh)(params, rng)
            return params, state
        return jax.jit(self._init_state, out_shardings=(self.param_sh, self.state_sh))(rng)

    def _check_resume(self, meta: dict, where: Path, step: int) -> None:
        """Refuses to continue a run saved with other results-relevant flags, or past --total_steps."""
        if "flags" in meta:
            run_identity.check_resume(meta["flags"], self.cfg.to_dict(), self.cfg.resume_despite_changes, where)
        if step > self.cfg.total_steps:
            raise ConfigError(f"--total_steps={self.cfg.total_steps}: the run in {self.output_dir} is already at "
                              f"step {step}; give --total_steps={step} or more, or another --logger.output_dir")

    def _check_tokenizer(self, meta: dict, where: Path, resize_allowed: bool) -> None:
        """The checkpoint this run starts from must have been trained with this run's tokenizer
        (its meta records it, `_checkpoint_meta`), unless --tokenizer.allow_mismatch says otherwise.
        With `resize_allowed` (weights loaded with params::) a smaller recorded vocabulary is an
        extended tokenizer's starting point: resize.load_params checks it piece by piece."""
        recorded = meta.get("tokenizer")
        if resize_allowed and recorded and recorded.get("vocab_size", 0) < self.tokenizer.vocab_size:
            return
        self.tokenizer.check_recorded(recorded, f"checkpoint {where}", self.cfg.tokenizer.allow_mismatch)

    def _check_optimizer_layout(self, meta: dict, where: Path) -> None:
        """An optimizer state holds moments for the trained parameters only (--optimizer.trainable), so
        one written under another choice cannot be restored: say so before Orbax fails deep inside."""
        saved = meta.get("flags", {}).get("optimizer", {}).get("trainable", "")
        if saved != self.cfg.optimizer.trainable:
            raise checkpoint.CheckpointError(
                f"{where} was written with --optimizer.trainable={saved!r}, this run has "
                f"{self.cfg.optimizer.trainable!r}: its optimizer state does not fit; start from its weights "
                "with --load_checkpoint=params::PATH (and a new --logger.output_dir)")

    # -- steps ---------------------------------------------------------------------------------

    def _train_step(self, params, state, batch):
        loss_fn = objectives.OBJECTIVES[self.cfg.objective]
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        (_, metrics), grads = jax.value_and_grad(
            lambda p: loss_fn(self.model, optimizer.stop_frozen_gradients(p, self.cfg.optimizer.trainable), batch,
                              step_rng, False, self.cfg.objectives), has_aux=True)(params)
        if self.cfg.optimizer.freeze_eos_embedding:
            grads = optimizer.zero_embedding_row(grads, self.tokenizer.eos_id)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        grad_norm, skips = optax.tree.norm(grads), state["nonfinite_skips"]
        if self.cfg.nonfinite_policy == "skip":  # decided on the device: no host sync per step
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            new_params, opt_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                                           (new_params, opt_state), (params, state["opt_state"]))
            skips = skips + jnp.where(finite, 0, 1).astype(skips.dtype)
        metrics = dict(metrics, gradient_norm=grad_norm, learning_rate=self.current_lr(opt_state),
                       nonfinite_skips=skips)
        return new_params, {"opt_state": opt_state, "step": state["step"] + 1, "rng": jax.random.key_data(rng),
                            "nonfinite_skips": skips}, metrics

    def _eval_step(self, params, batch):
        _, metrics = objectives.OBJECTIVES[self.cfg.objective](
            self.model, params, batch, jax.random.PRNGKey(0), True, self.cfg.objectives)
        return metrics

    # -- loop ----------------------------------------------------------------------------------

    def _jit_train_step(self):
        batch_sh, repl = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        return jax.jit(self._train_step, in_shardings=(self.param_sh, self.state_sh, batch_sh),
                       out_shardings=(self.param_sh, self.state_sh, repl), donate_argnums=(0, 1))

    def compile_train_step(self) -> tuple[Any, dict[str, tuple[tuple[int, ...], np.dtype]], float]:
        """The train step compiled for abstract arrays (nothing allocated): (executable, the global
        batch's (shape, dtype) per array, compile seconds). The executable takes what the loop passes."""
        params_t, state_t = self._abstract_state()
        spec = pipeline.abstract_batch(self.cfg.train_dataset, "--train_dataset")
        prefix, _ = pipeline.source_group(self.cfg.train_dataset)
        sharding.check_batch_divisible(spec["input_tokens"][0][0], self.mesh, f"{prefix}.batch_size")
        batch_t = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(self.mesh))
                   for k, (shape, dtype) in spec.items()}
        start = time.perf_counter()
        with sharding.activation_rules(self.mesh):
            compiled = self._jit_train_step().lower(params_t, state_t, batch_t).compile()
        return compiled, spec, time.perf_counter() - start

    def initial_state(self) -> tuple[Any, dict]:
        """Freshly initialised parameters and train state, sharded on the mesh (for benchmarks)."""
        self._abstract_state()
        return jax.jit(self._init_state, out_shardings=(self.param_sh, self.state_sh))(
            jax.random.PRNGKey(self.cfg.seed))

    def dry_run(self) -> dict[str, Any]:
        """Compiles the train step for abstract arrays and reports its per-device memory; allocates nothing."""
        try:
            with model_platform.compiling_for(self.platform):
                compiled, spec, seconds = self.compile_train_step()
        except jax.errors.JaxRuntimeError as e:  # a TPU compiler refuses a step larger than the device
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise ConfigError(f"--dry_run: the train step does not fit a {self.mesh.devices.flat[0].device_kind}: "
                              f"{str(e).splitlines()[0]}") from None
        params_t, _ = self._abstract_state()
        report = {"dry_run": True, "devices": self.mesh.size, "platform": self.platform,
                  "device_kind": self.mesh.devices.flat[0].device_kind,
                  "mesh": dict(self.mesh.shape), "params": model.param_count(params_t),
                  "batch": {k: list(shape) for k, (shape, _) in spec.items()},
                  "scan_layers": self.llama_config.scan_layers,
                  "attention": self.attention_backend, "loss_kernel": self.loss_kernel,
                  "memory_gib_per_device": memory.compiled_memory_gib(compiled, with_peak=self.platform == "tpu"),
                  "compile_seconds": round(seconds, 2)}
        if self.cfg.dry_run_topology:
            report["device_memory_gib"] = tpu_topology.get_slice(self.cfg.dry_run_topology).memory_gib
        print(json.dumps(report), flush=True)
        return report

    def run(self) -> Path:
        with sharding.activation_rules(self.mesh):  # the model's activation constraints resolve on this mesh
            return self._train()

    def _train(self) -> Path:
        checkpoint.require_writable(self.output_dir, "--logger.output_dir")
        lock = run_lock.acquire_for_run(self.output_dir)
        try:
            return self._train_locked()
        finally:
            if lock is not None:
                lock.release()

    def _train_locked(self) -> Path:
        cfg = self.cfg
        ckpt = checkpoint.TrainCheckpointer(self.output_dir, cfg.save_model_freq, cfg.save_milestone_freq)
        try:
            params, state = self._build_state(ckpt)
        except BaseException:
            ckpt.close()
            self.train_data.close()
            raise
        step = int(state["step"])
        if step >= cfg.total_steps:  # the same command again after the run finished
            ckpt.close()
            self.train_data.close()
            if jax.process_index() == 0:
                print(f"nothing to train: {self.output_dir} is already at step {step} of --total_steps={cfg.total_steps}"
                      "; raise --total_steps to train further", flush=True)
            return self.output_dir
        batch_sh, repl = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        train_step = self._jit_train_step()
        eval_step = jax.jit(self._eval_step, in_shardings=(self.param_sh, batch_sh), out_shardings=repl)
        flops = model.flops_per_token(self.llama_config, self.train_data.seq_length)
        metrics_log = logger.MetricsLogger(cfg.logger, self.output_dir, flops, resume_step=step,
                                           run_config=cfg.to_dict())
        if jax.process_index() == 0:
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        meta = lambda data_state: {"step": step, "dataset": data_state,
                                   "flags": cfg.to_dict(), "llama_config": self.llama_config.to_dict(),
                                   "tokenizer": self.tokenizer.identity()}  # checked on every load
        progress = tqdm(total=cfg.total_steps, initial=step, disable=jax.process_index() != 0, desc="train")
        unchecked: list[tuple[int, Any]] = []  # at most one (step, loss) not yet read back from the device
        skips_seen = int(state["nonfinite_skips"])
        stop_request = preemption.StopRequest()

        def check_finite() -> None:
            """Reads the pending loss (blocking on it only); stops if it is not finite."""
            if unchecked:
                at, loss = unchecked.pop()
                value = float(loss)
                if not np.isfinite(value):
                    ckpt.wait()  # a save in flight holds an earlier step, checked finite: it is sealed first
                    where = f"the last good checkpoint is {ckpt.step_path(ckpt.verified)}" \
                        if ckpt.verified is not None else "no verified checkpoint was saved before it"
                    raise TrainingDiverged(f"non-finite loss ({value}) at step {at}; stopped; {where}")

        try:
            if step < cfg.total_steps:
                batch, data_state = next(self.train_data), self.train_data.state_dict()
            stop_request.install()
            while step < cfg.total_steps:
                params, state, metrics = train_step(params, state, sharding.host_batch_to_global(batch, self.mesh))
                step += 1
                metrics_log.count_tokens(batch["input_tokens"].size)  # the global batch
                trained_state = data_state
                if step < cfg.total_steps:  # prepare the next batch while the device works
                    batch, data_state = next(self.train_data), self.train_data.state_dict()
                # One step behind: the previous step's loss is ready by now, and the device already
                # has this step queued, so reading it does not stall the pipeline.
                check_finite()
                if cfg.nonfinite_policy == "stop":
                    unchecked.append((step, metrics["loss"]))
                progress.update(1)
                ckpt.poll()
                # Every host asks every step: with several hosts this is where they agree on a step.
                preempted = stop_request.reached(step) and step < cfg.total_steps
                logging_step = step % cfg.log_freq == 0 or step == cfg.total_steps or self.squad_eval.due(step)
                if logging_step or ckpt.due(step) or preempted:
                    check_finite()  # nothing non-finite is logged as progress or saved
                if logging_step:
                    row = dict(metrics, **self._data_metrics())
                    if self.eval_data is not None:
                        row.update(self._evaluate(eval_step, params))
                    if self.squad_eval.due(step):
                        row.update(self.squad_eval(params))
                    row = metrics_log.log(step, row)
                    progress.set_postfix(loss=f"{row['loss']:.4f}")
                    skips_seen = _warn_new_skips(step, int(row["nonfinite_skips"]), skips_seen)
                if ckpt.due(step) or step == cfg.total_steps or preempted:
                    ckpt.save(step, params, state, meta(trained_state))  # async: training goes on
                if preempted:
                    raise preemption.Preempted(step, ckpt.step_path(step), stop_request.received)
        finally:
            stop_request.restore()
            progress.close()
            ckpt.close()
            metrics_log.close()
            self.train_data.close()
        logging.info("finished at step %d; checkpoints in %s", step, ckpt.directory)
        return self.output_dir

    def _data_metrics(self) -> dict[str, float]:
        s = self.train_data.stats
        out = {"data/examples": s["examples"], "data/epoch": self.train_data.epoch}
        for key in ("skipped_lines", "truncated_sentences", "clm_tokens_dropped"):  # the last two: data/pairs.py
            if s[key]:
                out[f"data/{key}"] = s[key]
        out.update(mixture.component_metrics(s))  # per-component examples and tokens of a mixture
        if s["words_seen"]:
            out.update({f"codemix/{k}": s[k] for k in ("words_seen", "words_in_dict", "words_replaced")})
            out["codemix/replaced_fraction"] = s["words_replaced"] / max(s["words_in_dict"], 1)
        return out

    def _evaluate(self, eval_step, params) -> dict[str, float]:
        rows = [eval_step(params, sharding.host_batch_to_global(next(self.eval_data), self.mesh))
                for _ in range(self.cfg.eval_steps)]
        return {f"eval_{k}": float(np.mean([r[k] for r in rows])) for k in ("loss", "accuracy")}


def _check_reference_ranks(cfg: ConfigDict) -> None:
    """AFP's W-rank emulation needs the CLM rows grouped by the same W (objectives.afp_loss)."""
    if cfg.objective != "afp" or cfg.train_dataset.type not in pipeline.SOURCES:  # the pipeline names a bad type
        return
    prefix, group = pipeline.source_group(cfg.train_dataset)
    groups = group.get("clm_groups", 1)
    if groups != cfg.objectives.reference_ranks:
        raise ConfigError(f"--objectives.reference_ranks={cfg.objectives.reference_ranks} and "
                          f"{prefix}.clm_groups={groups} must be equal: a W-rank AFP run "
                          "groups each rank's CLM texts alone")


def _warn_if_beyond_positions(data: ConfigDict, max_positions: int) -> None:
    """A sequence longer than the model's max_position_embeddings trains (rotary positions have no
    table), but the exported config.json would then claim the shorter maximum."""
    if data.type not in pipeline.SOURCES:  # the pipeline names a bad type
        return
    prefix, group = pipeline.source_group(data)
    if group.seq_length > max_positions:
        logging.warning("%s.seq_length=%d is longer than the model's max_position_embeddings=%d "
                        "(which an exported config.json records); set --llama.max_position_embeddings=%d if the "
                        "longer context is meant", prefix, group.seq_length, max_positions, group.seq_length)


def _warn_new_skips(step: int, skips: int, seen: int) -> int:
    if skips > seen:
        logging.warning("--nonfinite_policy=skip: %d step(s) up to step %d had a non-finite loss or gradient "
                        "and changed nothing (%d in all)", skips - seen, step, skips)
    return skips


def main(argv) -> None:
    del argv
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console readable
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        with exit_on_user_error():  # anything else is a bug and keeps its traceback
            sharding.initialize_distributed(FLAGS.jax_distributed)
            trainer = Trainer(parsed_config())
            if trainer.cfg.dry_run:
                trainer.dry_run()
                return
            output_dir = trainer.run()
    except preemption.Preempted as e:
        print(f"preempted: {e}", flush=True)
        sys.exit(preemption.EXIT_PREEMPTED)
    except (TrainingDiverged, checkpoint.CheckpointSaveError) as e:
        logging.debug("stopped", exc_info=True)
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    print(f"done: metrics in {output_dir / 'metrics.jsonl'}, checkpoints in {output_dir / 'checkpoints'}")


if __name__ == "__main__":
    define_flags_with_default(**default_config())
    app.run(main, flags_parser=parse_flags_or_exit)
