"""Exports a params checkpoint as a Hugging Face `LlamaForCausalLM`, `Qwen2ForCausalLM` or
`MistralForCausalLM` directory, as the config's `model_type` says.

    python -m easylm_align.convert_to_hf --load_checkpoint=params::PATH \\
        --tokenizer_path=tokenizer.model --model_size=7b --output_dir=DIR [--dtype=fp16|bf16|fp32]

The weights are written in fp16 by default, as COMMIT's `convert_easylm_to_hf` always writes them
(and its evaluation harness then computes in fp16), so the seed's evaluation command scores the
export in the reference's precision.

The model config comes from `--model_size` (a `model.LLAMA_PRESETS` name) plus
`--update_llama_config` JSON, as in the trainer, or from the checkpoint's meta when it recorded one
(`convert_from_hf` and the trainer do); when both are there they must agree on every field a
Hugging Face config carries.

Tensors are mapped as tabled in `easylm_align.conversion.hf_mapping`: embeddings and norms as
they are, every kernel transposed (`(in, out)` → `nn.Linear.weight`), q/k without any rotary
permutation since we use Hugging Face's half-split layout. Scanned checkpoints (`layers/*` with a leading layer axis)
are split row by row. The export streams: one checkpoint array is read at a time (Orbax partial
restore), cast, and added to the current safetensors shard, which is written and dropped once
full. Peak memory is one shard plus about three times the largest stored array (Orbax decodes a
whole chunk before copying it out; in the scanned layout an array holds one tensor of every
layer): about 1 GB for a 3.8 GB fp32 checkpoint with 500 MB shards, 2.6 GB when it is scanned.
PATH may also be a file EasyLM wrote (`streaming_params_*`, as COMMIT's runs leave): its tensors
are read one at a time too, renamed and with q/k reordered to the half-split layout
(`easylm_align.conversion.easylm_checkpoint`); such a file records no config, so `--model_size` is
needed. The work is done by `easylm_align.conversion.to_hf`; this module is its command line.

DIR gets config.json, generation_config.json, model-0000K-of-0000N.safetensors with
model.safetensors.index.json, and, for a SentencePiece tokenizer, tokenizer.model with
tokenizer_config.json and special_tokens_map.json for `LlamaTokenizer` (loading it needs
`sentencepiece` and `protobuf`); for any other kind tokenizer.json with the same two JSON files
for `PreTrainedTokenizerFast`.
Everything is written into a hidden sibling directory that is renamed to DIR at the end.
"""

from __future__ import annotations

from absl import app, flags

from easylm_align import checkpoint, model
from easylm_align.conversion import ConversionError
from easylm_align.conversion.hf_mapping import DTYPES
from easylm_align.conversion.output import quiet_orbax_logs
from easylm_align.conversion.to_hf import export

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Registers the flags; only when run as a program, so both tools can be imported together."""
    flags.DEFINE_string("load_checkpoint", None, "params::PATH of the checkpoint to export (PATH may be a glob)")
    flags.DEFINE_string("tokenizer_path", None, "the tokenizer the model was trained with (as --tokenizer.vocab_file: "
                        "SentencePiece, tokenizer.json or a Hugging Face directory, Llama 3's tiktoken file)")
    flags.DEFINE_string("output_dir", None, "the Hugging Face model directory to write")
    flags.DEFINE_string("model_size", "", f"LLaMA preset, one of {sorted(model.LLAMA_PRESETS)}; "
                        "may be left out when the checkpoint's meta records the config")
    flags.DEFINE_string("update_llama_config", "", "JSON object of config fields overriding --model_size")
    flags.DEFINE_enum("dtype", "fp16", sorted(DTYPES), "dtype of the exported weights (fp16: the reference's)")
    flags.DEFINE_integer("max_shard_size_mb", 2000, "largest safetensors shard, in MB (10^6 bytes); "
                         "a whole shard is held in memory before it is written")
    flags.DEFINE_bool("overwrite", False, "replace --output_dir if it exists and is not empty")
    flags.DEFINE_bool("allow_tokenizer_mismatch", False, "export with a --tokenizer_path other than the one "
                      "the checkpoint records (refused by default)")
    for name in ("load_checkpoint", "tokenizer_path", "output_dir"):
        flags.mark_flag_as_required(name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_orbax_logs()
    path = _checkpoint_path(FLAGS.load_checkpoint)
    try:
        out = export(path, FLAGS.output_dir, FLAGS.tokenizer_path, FLAGS.model_size, FLAGS.update_llama_config,
                     FLAGS.dtype, FLAGS.max_shard_size_mb, FLAGS.overwrite, FLAGS.allow_tokenizer_mismatch)
    except ConversionError as e:
        raise SystemExit(f"convert_to_hf: error: {e}") from None
    print(f"wrote Hugging Face model ({FLAGS.dtype}) to {out}")


def _checkpoint_path(value: str) -> str:
    try:
        kind, path = checkpoint.parse_load_checkpoint(value)
    except checkpoint.CheckpointError as e:
        raise app.UsageError(str(e)) from None
    if kind != "params":  # a trainstate checkpoint also has a params item, but say what is read
        raise app.UsageError(f"--load_checkpoint={value!r}: use params::PATH (only the params are exported)")
    return path


if __name__ == "__main__":
    define_flags()
    app.run(main)
