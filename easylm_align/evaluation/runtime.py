"""What every evaluation command shares: loading sharded params from the model flags (defined once,
in `run_config`), the report file and the command-line wrapper that turns user mistakes into
one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import jax
from absl import app
from absl import logging as absl_logging
from ml_collections import ConfigDict

from easylm_align import checkpoint, model, run_config, sharding, tokenizer
from easylm_align.config import FLAGS, define_flags_with_default, parse_flags_or_exit
from easylm_align.errors import ConfigError, exit_on_user_error
from easylm_align.conversion.families import HF_FIELDS


def load_model(cfg: Any, decodes: bool = False) -> tuple[Any, model.LlamaForCausalLM, tokenizer.Tokenizer, Any]:
    """Params (sharded on the `--mesh_dim` mesh), model, tokenizer and mesh from the model flags
    (`run_config.default_config`). `decodes`: the caller turns generated ids into text, so every id
    the model can produce needs a piece."""
    kind, path = checkpoint.parse_load_checkpoint(cfg.load_checkpoint)
    if not kind:
        raise ConfigError("--load_checkpoint=params::PATH is required")
    # Cheap checks first, so a wrong path fails before anything is compiled or read.
    tok = tokenizer.Tokenizer.from_config(cfg.tokenizer)
    ckpt_path = checkpoint.resolve_path(path)
    meta = checkpoint.read_meta(ckpt_path)
    llama_config = llama_config_for(cfg, meta.get("llama_config"), ckpt_path)
    tok.check_recorded(meta.get("tokenizer"), f"checkpoint {ckpt_path}", cfg.tokenizer.allow_mismatch)
    tok.check_fits(llama_config.vocab_size)
    if decodes and tok.vocab_size < llama_config.vocab_size:
        raise tokenizer.TokenizerError(
            f"--tokenizer.vocab_file={cfg.tokenizer.vocab_file} has {tok.vocab_size} pieces but the model has "
            f"vocab_size {llama_config.vocab_size}: generated ids from {tok.vocab_size} on could not be decoded; "
            "use the tokenizer the model was trained with")
    mesh = sharding.make_mesh(cfg.mesh_dim)
    llama = model.build_model(llama_config, cfg.dtype, cfg.param_dtype)
    abstract = jax.eval_shape(lambda: model.init_params(llama, jax.random.PRNGKey(0)))
    target = sharding.with_shardings(abstract, sharding.param_shardings(abstract, mesh))
    return checkpoint.load_params(str(ckpt_path), target, llama_config), llama, tok, mesh


def llama_config_for(cfg: Any, recorded: Optional[dict], ckpt: Path) -> ConfigDict:
    """The model config to evaluate `ckpt` with. Without `--load_llama_config` (the evaluators'
    default), the architecture the checkpoint's meta records (`demo` if it records none); with it,
    the flags' config, refused where it disagrees with the recorded one."""
    overrides = cfg.llama.to_dict()
    if not cfg.load_llama_config:
        if not recorded:
            return model.get_llama_config("demo", cfg.update_llama_config, overrides)
        if cfg.update_llama_config:
            raise ConfigError("--update_llama_config needs --load_llama_config to apply to; without it the "
                              f"config is the one {ckpt} records (change single fields with --llama.FIELD)")
        fields = {k: recorded[k] for k in HF_FIELDS if k in recorded}
        return model.get_llama_config("debug", json.dumps(fields), overrides)
    config = model.get_llama_config(cfg.load_llama_config, cfg.update_llama_config, overrides)
    diff = [f"{k}: flags {config[k]!r}, checkpoint {recorded[k]!r}"
            for k in HF_FIELDS if recorded and k in recorded and config[k] != recorded[k]]
    if diff:
        raise ConfigError(f"--load_llama_config={cfg.load_llama_config!r} / --update_llama_config disagree with "
                          f"the config {ckpt} records ({'; '.join(diff)}); leave --load_llama_config out to use "
                          "the recorded one")
    return config


def evaluator_flags(**groups: Any) -> ConfigDict:
    """An evaluator's run configuration: the model flags, with `--load_llama_config` defaulting to the
    checkpoint's recorded config (`llama_config_for`), and the evaluator's own `groups`."""
    cfg = run_config.default_config(**groups)
    cfg.load_llama_config = ""
    return cfg


def model_description(cfg: Any) -> dict[str, Any]:
    """The model flags recorded in a report."""
    return dict(load_checkpoint=cfg.load_checkpoint, load_llama_config=cfg.load_llama_config,
                update_llama_config=cfg.update_llama_config, vocab_file=cfg.tokenizer.vocab_file, dtype=cfg.dtype)


def write_report(report: dict, output: str) -> None:
    if output and jax.process_index() == 0:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")


def run_program(default_flags: dict[str, Any], run: Callable[[Any], dict], format_table: Callable[[dict], str],
                output: Callable[[Any], str]) -> None:
    """An evaluation command's `__main__`: define its flags (EasyLM's dotted names), parse, `cli_main`."""
    define_flags_with_default(**default_flags)
    app.run(lambda argv: cli_main(run, format_table, output), flags_parser=parse_flags_or_exit)


def cli_main(run: Callable[[Any], dict], format_table: Callable[[dict], str], output: Callable[[Any], str]) -> None:
    """Body of an evaluation command's absl `main`: run, print the table, one-line user errors."""
    if not FLAGS["verbosity"].present:  # Orbax logs every read at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    with exit_on_user_error():  # anything else is a bug and keeps its traceback
        sharding.initialize_distributed(FLAGS.jax_distributed)
        report = run(FLAGS)
    if jax.process_index() == 0:
        print(format_table(report))
        if output(FLAGS):
            print(f"report: {output(FLAGS)}")
