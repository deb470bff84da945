"""The run configuration: every program's flags as one `ConfigDict` tree, built by `default_config`.

The tree's dotted names are EasyLM's flags (`--load_llama_config=7b`, `--tokenizer.vocab_file=...`);
absl is only its command-line face (`config.define_flags_with_default(**tree)`), and
`config.parse_config(tree, argv)` reads a command line into it without absl's globals.

Every program starts from the same model part (which checkpoint and LLaMA config, the tokenizer,
the mesh and dtypes, `jax.distributed`) and adds its own groups:

* the trainer: `train_config.default_config()` (`train_config.DEFAULTS`: steps, data, optimizer, logger, ...);
* the evaluators: `evaluate.default_flags()` (`--eval.*`), `evaluate_icl.default_flags()` (`--icl.*`);
* the sweep parses the trainer's tree in-process and hands `model_part` of each run's config to
  the evaluator.

So a model flag has one meaning and one default everywhere, with one exception: the trainer's
`--load_llama_config` defaults to `demo`, the tiny model it builds with no flags, while the
evaluators' defaults to '' = the config the checkpoint's meta records (`runtime.llama_config_for`).
A checkpoint of another shape is refused with a message naming `--load_llama_config`.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from easylm_align import model, sharding, tokenizer


def _model_flags() -> dict[str, Any]:
    return dict(
        load_checkpoint="",       # params::PATH (weights) or trainstate::PATH (the trainer: weights + optimizer)
        load_llama_config="demo",  # a model.LLAMA_PRESETS name
        update_llama_config="",   # JSON object of LLaMA config fields overriding the preset
        mesh_dim="1,-1,1",        # dp,fsdp,mp; -1 takes the remaining devices
        dtype="fp32",             # compute dtype
        param_dtype="fp32",
        tokenizer=tokenizer.default_config(),
        llama=model.default_llama_overrides(),
        jax_distributed=sharding.default_distributed_config(),
    )


def default_config(**program_flags: Any) -> ConfigDict:
    """The model part every program shares, plus `program_flags` (the program's own flags and groups)."""
    shared = _model_flags()
    clash = sorted(set(shared) & set(program_flags))
    if clash:
        raise TypeError(f"{clash} are model flags, defined once in run_config")
    return ConfigDict(dict(shared, **program_flags))


def model_part(cfg: ConfigDict) -> ConfigDict:
    """The model flags of a program's config (e.g. a training run's, to evaluate what it trained)."""
    return ConfigDict({name: cfg[name] for name in _model_flags()})
