"""The export of a params checkpoint (or an EasyLM streaming file) as a Hugging Face model directory
(see `convert_to_hf`)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
import tokenizers
from ml_collections import ConfigDict

from easylm_align import checkpoint, model
from easylm_align.conversion import ConversionError, easylm_checkpoint
from easylm_align.conversion.families import HF_FIELDS, hf_config
from easylm_align.conversion.hf_mapping import DTYPES, TensorSpec, check_stored_shapes, expected_shapes, tensor_specs
from easylm_align.conversion.output import staged_output
from easylm_align.tokenizer import Tokenizer, TokenizerError
from easylm_align.tree_paths import path_str

# Identity normalization with a dummy prefix and whitespace kept, as LLaMA's tokenizer (and as
# Hugging Face's LlamaTokenizer assumes): how SentencePiece must normalize this probe.
_NORMALIZER_PROBE = "x  y½ﬁ\tक़\n"

_LLAMA_NORMALIZED = "▁" + _NORMALIZER_PROBE.replace(" ", "▁")


def resolve_config(ckpt: Path, model_size: str, update_llama_config: str) -> ConfigDict:
    """The config from the flags and/or the checkpoint's meta, refusing a disagreement between them."""
    if update_llama_config and not model_size:
        raise ConversionError("--update_llama_config needs --model_size to apply to")
    meta_fields = checkpoint.read_meta(ckpt).get("llama_config")
    if not model_size and not meta_fields:
        raise ConversionError(f"{ckpt} records no llama_config in its meta; pass --model_size "
                              f"(one of {sorted(model.LLAMA_PRESETS)}) and --update_llama_config if needed")
    try:
        flag_config = model.get_llama_config(model_size, update_llama_config) if model_size else None
    except ValueError as e:
        raise ConversionError(str(e)) from None
    try:  # every field is in the meta: the preset only fills fields a newer model may have added
        meta_config = model.get_llama_config("debug", json.dumps(meta_fields)) if meta_fields else None
    except ValueError as e:
        raise ConversionError(f"the llama_config in {ckpt}'s meta is not usable: {e}") from None
    if flag_config is not None and meta_config is not None:
        diff = [f"{k}: flags say {flag_config[k]!r}, checkpoint meta says {meta_config[k]!r}"
                for k in HF_FIELDS if flag_config[k] != meta_config[k]]
        if diff:
            raise ConversionError("--model_size/--update_llama_config disagree with the checkpoint's meta: "
                                  + "; ".join(diff))
    return flag_config if flag_config is not None else meta_config


class _ParamsReader(contextlib.AbstractContextManager):
    """Reads a checkpoint's `params` item one array at a time (Orbax partial restore)."""

    def __init__(self, ckpt: Path):
        self.ckpt, self.dir = ckpt, ckpt / "params"
        handler = ocp.PyTreeCheckpointHandler()
        with checkpoint.reading(ckpt):
            tree = handler.metadata(self.dir).tree
        self.shapes = {path_str(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
        self._checkpointer = ocp.Checkpointer(handler)

    def read(self, path: str) -> np.ndarray:
        *parents, name = path.split("/")
        item: dict = {}
        node = item
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = 0  # placeholder leaf: partial_restore reads only the paths present in `item`
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        with checkpoint.reading(self.ckpt):
            restored = self._checkpointer.restore(
                self.dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
        for key in path.split("/"):
            restored = restored[key]
        return restored

    def __exit__(self, *exc: Any) -> None:
        self._checkpointer.close()


def _grouped_by_array(specs: list[TensorSpec], scanned: bool) -> list[tuple[str, list[TensorSpec]]]:
    """Groups tensors by the checkpoint array that holds them, keeping first-appearance order."""
    groups: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.scanned_path if scanned else spec.ours, []).append(spec)
    return list(groups.items())


def _shard_of(sizes: list[int], max_bytes: int) -> list[int]:
    """Greedy assignment of tensors (in write order) to shards of at most max_bytes (or one tensor)."""
    shard, used, out = 0, 0, []
    for size in sizes:
        if used and used + size > max_bytes:
            shard, used = shard + 1, 0
        used += size
        out.append(shard)
    return out


def _converted(reader: _ParamsReader, groups: list[tuple[str, list[TensorSpec]]], scanned: bool,
               dtype: Any) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    for array_path, specs in groups:
        array = reader.read(array_path)
        for spec in specs:
            tensor = array[spec.layer] if scanned and spec.layer is not None else array
            yield spec, np.ascontiguousarray(tensor.T if spec.transpose else tensor, dtype=dtype)
        del array  # drop it before the next read


def _write_weights(reader: _ParamsReader, config: ConfigDict, scanned: bool, out: Path, dtype: str,
                   max_shard_size_mb: int) -> None:
    groups = _grouped_by_array(tensor_specs(config), scanned)
    ordered = [spec for _, specs in groups for spec in specs]
    shapes, itemsize = expected_shapes(config), np.dtype(DTYPES[dtype]).itemsize
    sizes = [int(np.prod(shapes[spec.ours])) * itemsize for spec in ordered]
    shard_ids = _shard_of(sizes, max_shard_size_mb * 10**6)
    count = shard_ids[-1] + 1
    names = [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]

    shard: dict[str, np.ndarray] = {}
    current = 0
    for (spec, tensor), shard_id in zip(_converted(reader, groups, scanned, DTYPES[dtype]), shard_ids):
        if shard_id != current:
            safetensors.numpy.save_file(shard, out / names[current], metadata={"format": "pt"})
            print(f"wrote {names[current]}", flush=True)
            shard, current = {}, shard_id
        shard[spec.hf] = tensor
    safetensors.numpy.save_file(shard, out / names[current], metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(sizes)},
             "weight_map": {spec.hf: names[k] for spec, k in zip(ordered, shard_ids)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(tokenizer: Tokenizer, config: ConfigDict, out: Path) -> None:
    """SentencePiece: tokenizer.model plus the two JSON files `AutoTokenizer` needs to pick `LlamaTokenizer`.
    Any other kind: tokenizer.json and tokenizer_config.json for `PreTrainedTokenizerFast`."""
    if tokenizer.sp is None:
        _write_tokenizer_json(tokenizer, config, out)
        return
    shutil.copyfile(tokenizer.vocab_file, out / "tokenizer.model")
    piece = tokenizer.sp.IdToPiece
    special = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
               "unk_token": piece(tokenizer.sp.unk_id()), "pad_token": piece(tokenizer.pad_id)}
    tokenizer_config = dict(special, tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
                            legacy=False, clean_up_tokenization_spaces=False,
                            model_max_length=config.max_position_embeddings)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def _write_tokenizer_json(tokenizer: Tokenizer, config: ConfigDict, out: Path) -> None:
    """The `tokenizers` object as tokenizer.json, which adds BOS (as Llama 3's does) when there is one."""
    hf = tokenizers.Tokenizer.from_str(tokenizer.hf.to_str())
    piece = lambda i: tokenizer.id_to_piece(i) if i >= 0 else None
    bos, eos = piece(tokenizer.bos_id), piece(tokenizer.eos_id)
    if bos is not None:
        hf.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_id)])
    hf.save(str(out / "tokenizer.json"))
    special = {"bos_token": bos, "eos_token": eos, "pad_token": tokenizer.pad_token}  # no pad: none invented
    tokenizer_config = dict(special, tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                            model_max_length=config.max_position_embeddings)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def _load_tokenizer(path: str, config: ConfigDict) -> Tokenizer:
    if not Path(path).exists():
        raise ConversionError(f"--tokenizer_path={path!r}: no such file")
    try:
        tokenizer = Tokenizer(path, add_bos_token=False, add_eos_token=False)
    except TokenizerError as e:
        raise ConversionError(f"--tokenizer_path: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                              f"vocab_size={config.vocab_size}")
    # A tokenizer without BOS (Qwen2's) never uses the config's bos_token_id: only EOS must agree.
    bos = tokenizer.bos_id if tokenizer.bos_id >= 0 else config.bos_token_id
    if (bos, tokenizer.eos_id) != (config.bos_token_id, config.eos_token_id):
        raise ConversionError(f"the tokenizer's bos/eos ids ({tokenizer.bos_id}, {tokenizer.eos_id}) differ from the "
                              f"config's ({config.bos_token_id}, {config.eos_token_id}); fix bos_token_id/"
                              "eos_token_id with --update_llama_config")
    if tokenizer.sp is not None and tokenizer.sp.Normalize(_NORMALIZER_PROBE) != _LLAMA_NORMALIZED:
        logging.warning("%s normalizes text (e.g. NFKC or collapsing spaces) but Hugging Face's LlamaTokenizer "
                        "does not: text that normalization changes will encode differently after export", path)
    return tokenizer


def export(checkpoint_path: str, output_dir: str, tokenizer_path: str, model_size: str = "",
           update_llama_config: str = "", dtype: str = "fp16", max_shard_size_mb: int = 2000,
           overwrite: bool = False, allow_tokenizer_mismatch: bool = False) -> Path:
    """Writes the Hugging Face directory; returns its path. Input problems raise ConversionError."""
    if max_shard_size_mb <= 0:
        raise ConversionError("--max_shard_size_mb must be positive")
    try:
        ckpt = checkpoint.resolve_path(checkpoint_path)
        if not easylm_checkpoint.is_streaming_file(ckpt):
            checkpoint.verify(ckpt)  # before the meta or any array is read
        return _export(ckpt, output_dir, tokenizer_path, model_size, update_llama_config, dtype, max_shard_size_mb,
                       overwrite, allow_tokenizer_mismatch)
    except checkpoint.CheckpointError as e:
        raise ConversionError(str(e)) from None


def _export(ckpt: Path, output_dir: str, tokenizer_path: str, model_size: str, update_llama_config: str,
            dtype: str, max_shard_size_mb: int, overwrite: bool, allow_tokenizer_mismatch: bool) -> Path:
    config = resolve_config(ckpt, model_size, update_llama_config)
    tokenizer = _load_tokenizer(tokenizer_path, config)
    try:
        tokenizer.check_recorded(checkpoint.read_meta(ckpt).get("tokenizer"), f"checkpoint {ckpt}",
                                 allow_tokenizer_mismatch, "--tokenizer_path", "--allow_tokenizer_mismatch")
    except TokenizerError as e:
        raise ConversionError(str(e)) from None
    source = f"--model_size={model_size}" if model_size else "the config in its meta"
    dest = Path(output_dir)
    with _reader(ckpt, config) as reader:
        scanned = check_stored_shapes(reader.shapes, config, source)
        with staged_output(dest, overwrite) as stage:
            stage.mkdir()
            _write_weights(reader, config, scanned, stage, dtype, max_shard_size_mb)
            (stage / "config.json").write_text(json.dumps(hf_config(config, dtype, tokenizer.pad_id), indent=2) + "\n")
            generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                          "pad_token_id": tokenizer.pad_id}
            (stage / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
            _write_tokenizer(tokenizer, config, stage)
    return dest.absolute()


def _reader(ckpt: Path, config: ConfigDict) -> Any:
    """Reads one array at a time from our Orbax checkpoint or from an EasyLM streaming file."""
    if not easylm_checkpoint.is_streaming_file(ckpt):
        return _ParamsReader(ckpt)
    try:
        return easylm_checkpoint.StreamingParams(ckpt, model.head_dim(config))
    except easylm_checkpoint.EasyLMFormatError as e:
        raise ConversionError(str(e)) from None
