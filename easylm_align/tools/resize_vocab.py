r"""Grows a params checkpoint's vocabulary to an extended tokenizer's (resize.py), e.g. before export.

    python -m easylm_align.tools.resize_vocab --load_checkpoint=params::PATH --tokenizer=extended.model \
        --old_tokenizer=tokenizer.model --output=DIR [--init=subword_mean] [--pad_vocab_to_multiple=64]

The trainer does the same on `--load_checkpoint=params::PATH` when its model is larger; this writes
the resized checkpoint for `convert_to_hf` (or any program) to read. Its meta's llama_config gets
the new vocab_size.
"""

from __future__ import annotations

from absl import app, flags

from easylm_align import checkpoint, resize
from easylm_align.errors import ConfigError, exit_on_user_error


def _define_flags() -> None:
    flags.DEFINE_string("load_checkpoint", None, "params::PATH of the checkpoint to grow")
    flags.DEFINE_string("tokenizer", None, "the extended tokenizer (SentencePiece .model or tokenizer.json)")
    flags.DEFINE_string("old_tokenizer", "", "the checkpoint's tokenizer ('' reads it from the checkpoint's flags)")
    flags.DEFINE_string("output", None, "where to write the resized params checkpoint")
    flags.DEFINE_enum("init", "subword_mean", list(resize.INITS), "how new rows start")
    flags.DEFINE_integer("pad_vocab_to_multiple", 0, "round the new vocab_size up to this multiple")
    flags.DEFINE_integer("seed", 0, "for --init=random")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    with exit_on_user_error():
        for name in ("load_checkpoint", "tokenizer", "output"):
            if not f[name].value:
                raise ConfigError(f"--{name} is required")
        kind, path = checkpoint.parse_load_checkpoint(f.load_checkpoint)
        if kind != "params":
            raise ConfigError(f"--load_checkpoint={f.load_checkpoint!r}: expected params::PATH")
        config = resize.default_config()
        config.update(dict(init=f.init, old_tokenizer=f.old_tokenizer, pad_vocab_to_multiple=f.pad_vocab_to_multiple,
                           seed=f.seed))
        old, new = resize.resize_checkpoint(path, f.output, f.tokenizer, config)
    print(f"vocabulary {old} -> {new} (new rows: {f.init}); wrote {f.output}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
