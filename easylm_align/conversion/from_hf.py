"""The import of a Hugging Face LLaMA-family directory as a params checkpoint (see `convert_from_hf`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
from ml_collections import ConfigDict

from easylm_align import checkpoint, model
from easylm_align.conversion import ConversionError
from easylm_align.conversion.families import llama_fields_from_hf, read_hf_config, suggest_flags
from easylm_align.conversion.hf_mapping import DTYPES, expected_shapes, tensor_specs
from easylm_align.conversion.output import staged_output
from easylm_align.tokenizer import Tokenizer, TokenizerError

# (index file, single file) per weight format, in order of preference.
_WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                 ("pytorch_model.bin.index.json", "pytorch_model.bin"))


class _HFWeights(contextlib.AbstractContextManager):
    """The tensors of an HF directory by name, each read from disk only when asked for."""

    def __init__(self, hf_dir: Path):
        for index_name, single_name in _WEIGHT_FILES:
            if (hf_dir / index_name).is_file():
                weight_map = json.loads((hf_dir / index_name).read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
                break
            if (hf_dir / single_name).is_file():
                files = [single_name]
                break
        else:
            raise ConversionError(f"{hf_dir} has no weights: expected model.safetensors, "
                                  "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")
        self._stack = contextlib.ExitStack()
        self._sources: dict[str, Any] = {}  # tensor name → open safetensors file or torch state dict
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise ConversionError(f"{path} is listed in the index but missing")
            if name.endswith(".safetensors"):
                source = self._stack.enter_context(safetensors.safe_open(str(path), framework="np"))
            else:
                import torch  # only pytorch_model.bin needs it

                source = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            self._sources.update({key: source for key in source.keys()})

    @property
    def names(self) -> set[str]:
        return set(self._sources)

    def get(self, name: str) -> np.ndarray:
        if name not in self._sources:
            raise ConversionError(f"the Hugging Face weights have no tensor {name!r}")
        source = self._sources[name]
        if isinstance(source, dict):
            return _torch_to_numpy(source[name])
        return source.get_tensor(name)

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _set_path(tree: dict, path: str, value: np.ndarray) -> None:
    *parents, name = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[name] = value


def read_params(weights: _HFWeights, config: ConfigDict, dtype: Any) -> dict:
    """Our parameter tree (scanned if config.scan_layers) from the HF tensors."""
    shapes = expected_shapes(config)
    params: dict = {}
    stacks: dict[str, np.ndarray] = {}
    specs = tensor_specs(config)
    for spec in specs:
        tensor = weights.get(spec.hf)
        want = shapes[spec.ours][::-1] if spec.transpose else shapes[spec.ours]
        if tensor.shape != want:
            raise ConversionError(f"{spec.hf} has shape {tuple(tensor.shape)} but config.json implies {want}")
        if config.scan_layers and spec.layer is not None:
            if spec.scanned_path not in stacks:
                stacks[spec.scanned_path] = np.empty((config.num_hidden_layers, *shapes[spec.ours]), dtype)
                _set_path(params, spec.scanned_path, stacks[spec.scanned_path])
            stacks[spec.scanned_path][spec.layer] = tensor.T if spec.transpose else tensor
        else:
            _set_path(params, spec.ours, np.ascontiguousarray(tensor.T if spec.transpose else tensor, dtype=dtype))
    # Old conversions stored the rotary inverse frequencies; a tied head may be stored as well.
    ignored = {n for n in weights.names if n.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")
    unexpected = sorted(weights.names - {spec.hf for spec in specs} - ignored)
    if unexpected:
        raise ConversionError(f"the Hugging Face weights have tensors a LLaMA of this config lacks: {unexpected[:5]}")
    return params


def import_hf(hf_dir: str, output: str, dtype: str = "fp32", scan_layers: bool = False,
              overwrite: bool = False) -> tuple[Path, str, dict]:
    """Writes the params checkpoint; returns its path, the preset name and the update fields."""
    source = Path(hf_dir)
    if not source.is_dir():
        raise ConversionError(f"--hf_dir={hf_dir!r} is not a directory")
    # The printed flags leave the layer layout to the preset: the checkpoint loads into either.
    preset, updates = suggest_flags(llama_fields_from_hf(read_hf_config(source)))
    try:
        config = model.get_llama_config(preset, json.dumps(dict(updates, scan_layers=scan_layers)))
    except ValueError as e:
        raise ConversionError(f"{source / 'config.json'}: {e}") from None
    dest = Path(output)
    with staged_output(dest, overwrite) as stage, _HFWeights(source) as weights:
        params = read_params(weights, config, DTYPES[dtype])
        checkpoint.save_params(stage, params, meta={"llama_config": config.to_dict(),
                                                    "converted_from": str(source.absolute()),
                                                    **_tokenizer_meta(source)})
    return dest.absolute(), preset, updates


def _tokenizer_meta(source: Path) -> dict:
    """The identity of the model's tokenizer, so runs and tools that load the checkpoint refuse
    another one (`Tokenizer.check_recorded`): DIR's SentencePiece tokenizer.model where it has one
    (LLaMA-1/2, Mistral), else DIR itself read as a Hugging Face directory (its tokenizer.json, with
    tokenizer_config.json's special tokens: Llama 3, Qwen2). Nothing when DIR has neither."""
    candidates = [source / "tokenizer.model"] if (source / "tokenizer.model").is_file() else []
    candidates += [source] if (source / "tokenizer.json").is_file() else []
    for path in candidates:
        try:
            return {"tokenizer": Tokenizer(str(path)).identity()}
        except TokenizerError:  # e.g. a tokenizer.model that is not SentencePiece: try the next
            continue
    return {}
