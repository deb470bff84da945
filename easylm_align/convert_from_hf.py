"""Imports a Hugging Face LLaMA-family model as a params checkpoint: LLaMA-1/2/3.x (`llama`, with
Llama 3.1's rope scaling), Qwen2/2.5 (`qwen2`, q/k/v biases) or Mistral (`mistral`, sliding window);
MHA or GQA; tied or untied head.

    python -m easylm_align.convert_from_hf --hf_dir=DIR --output=PATH [--dtype=fp32] [--scan_layers]

DIR needs config.json with model_type 'llama', 'qwen2' or 'mistral' and its weights as safetensors (model.safetensors or
shards with model.safetensors.index.json) or, read through torch, pytorch_model.bin (or shards
with pytorch_model.bin.index.json). Tensors are mapped as tabled in
`easylm_align.conversion.hf_mapping`: every `nn.Linear.weight` is transposed into our `(in, out)`
kernel, and q/k need no rotary permutation because our rotary embedding uses Hugging Face's
half-split layout. With `--scan_layers` the layers are stacked into the scanned layout as they are
read; either layout loads into a model of the other, so the printed flags leave the layout to the
preset (`scan_layers`). The work is done by `easylm_align.conversion.from_hf`; this module is its command line.

PATH is written with `checkpoint.save_params` and records the resolved LLaMA config in its meta
(so `convert_to_hf` needs no --model_size for it), and the identity of DIR's tokenizer
(tokenizer.model, else the directory's tokenizer.json with its special tokens), so a run or tool
given another tokenizer is refused. The tool prints the trainer flags to start from it: `--load_checkpoint=params::PATH --load_llama_config=NAME --update_llama_config='{...}'`,
NAME being a preset with the same layer shapes (or 'debug' when none has them) and the JSON the
fields that differ from it. Peak memory is one copy of the model: each tensor is read lazily and
cast straight into its place. PATH is written under a hidden sibling and renamed at the end.
"""

from __future__ import annotations

import json
import shlex

from absl import app, flags

from easylm_align.conversion import ConversionError
from easylm_align.conversion.from_hf import import_hf
from easylm_align.conversion.hf_mapping import DTYPES
from easylm_align.conversion.output import quiet_orbax_logs

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Registers the flags; only when run as a program, so both tools can be imported together."""
    flags.DEFINE_string("hf_dir", None, "Hugging Face LLaMA, Qwen2 or Mistral directory (config.json and weights)")
    flags.DEFINE_string("output", None, "path of the params checkpoint to write")
    flags.DEFINE_enum("dtype", "fp32", sorted(DTYPES), "dtype of the stored parameters")
    flags.DEFINE_bool("scan_layers", False, "store the layers stacked (the scanned layout, scan_layers=true)")
    flags.DEFINE_bool("overwrite", False, "replace --output if it exists and is not empty")
    for name in ("hf_dir", "output"):
        flags.mark_flag_as_required(name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_orbax_logs()
    try:
        path, preset, updates = import_hf(FLAGS.hf_dir, FLAGS.output, FLAGS.dtype, FLAGS.scan_layers, FLAGS.overwrite)
    except ConversionError as e:
        raise SystemExit(f"convert_from_hf: error: {e}") from None
    start = f"{shlex.quote(f'--load_checkpoint=params::{path}')} --load_llama_config={preset}"
    if updates:
        start += f" --update_llama_config={shlex.quote(json.dumps(updates))}"
    print(f"wrote params checkpoint to {path}\nstart from it with: {start}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
