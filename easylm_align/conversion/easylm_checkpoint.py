"""EasyLM's streaming checkpoints (`streaming_params_*`, `streaming_train_state_*`) in our layout.

EasyLM's `StreamingCheckpointer` writes one file: a msgpack stream of `(key, value)` pairs, `key`
the flattened tree path (a list of strings) and `value` `flax.serialization.to_bytes(array)`.
A params file (`save_optimizer_state=False`) holds the model tree itself, `train_state.params['params']`;
a train-state file holds the whole TrainState, the model tree under `params/params/` beside
`opt_state/…` and `step`. Below the prefix:

    transformer/wte/embedding                          embed_tokens/embedding
    transformer/h/{i}/attention/{wq,wk,wv,wo}/kernel   layers_{i}/attention/…/kernel
    transformer/h/{i}/feed_forward/{w1,w2,w3}/kernel   layers_{i}/feed_forward/…/kernel
    transformer/h/{i}/attention_norm/kernel            layers_{i}/attention_norm/scale
    transformer/h/{i}/ffn_norm/kernel                  layers_{i}/ffn_norm/scale
    transformer/ln_f/kernel                            norm/scale
    lm_head/kernel                                     lm_head/kernel

EasyLM casts floats to its `float_dtype` (bf16 by default) when saving; they are cast to the
model's dtype on load.

Kernels are `(in, out)` on both sides. EasyLM's rotary embedding rotates interleaved pairs of a
head's dimensions (2j, 2j+1); ours rotates (j, j + head_dim/2). So the output columns of wq and wk
are reordered within each head, even ones first, then odd ones (the permutation Hugging Face's
converter applies to these files); the attention scores, and so the logits, are unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import msgpack
import numpy as np
from flax import serialization

from easylm_align.errors import UserError

_READ_SIZE = 1 << 24
_ROTARY_KERNELS = ("attention/wq/kernel", "attention/wk/kernel")


class EasyLMFormatError(UserError):
    pass


def is_streaming_file(path: Path) -> bool:
    """EasyLM checkpoints are single files; ours are Orbax directories."""
    return Path(path).is_file()


def _records(path: Path) -> Iterator[tuple[tuple[str, ...], bytes, int, int]]:
    """(key, serialized value, start offset, end offset) for each record, in file order."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, read_size=_READ_SIZE, max_buffer_size=0, raw=False)
        start, n = 0, 0
        while True:
            try:
                item = unpacker.unpack()
            except msgpack.OutOfData:
                return
            except (msgpack.UnpackException, ValueError) as e:
                raise EasyLMFormatError(f"{path}: not an EasyLM streaming checkpoint (msgpack: {e})") from None
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))
                    and isinstance(item[1], bytes)):
                raise EasyLMFormatError(f"{path}: record {n} is not a (key, tensor bytes) pair; "
                                        "not an EasyLM streaming checkpoint")
            end = unpacker.tell()
            yield tuple(str(k) for k in item[0]), item[1], start, end
            start, n = end, n + 1


def our_path(key: tuple[str, ...]) -> Optional[str]:
    """Our unscanned parameter path for an EasyLM key; None for what is not a parameter (optimizer
    state, step). Raises on a parameter this LLaMA does not have."""
    if key[:2] == ("params", "params"):  # a train state
        rest = key[2:]
    elif key[:1] in (("transformer",), ("lm_head",)):  # a params file
        rest = key
    else:
        return None
    if rest == ("transformer", "wte", "embedding"):
        return "embed_tokens/embedding"
    if rest == ("transformer", "ln_f", "kernel"):
        return "norm/scale"
    if rest == ("lm_head", "kernel"):
        return "lm_head/kernel"
    if len(rest) >= 4 and rest[:2] == ("transformer", "h") and rest[2].isdigit():
        inner = "/".join(rest[3:])
        if inner in ("attention_norm/kernel", "ffn_norm/kernel"):
            inner = inner.replace("/kernel", "/scale")
        if inner in _LAYER_LEAVES:
            return f"layers_{int(rest[2])}/{inner}"
    raise EasyLMFormatError(f"unexpected tensor {'/'.join(key)} (not a LLaMA parameter EasyLM writes)")


_LAYER_LEAVES = {"attention_norm/scale", "ffn_norm/scale", "attention/wq/kernel", "attention/wk/kernel",
                 "attention/wv/kernel", "attention/wo/kernel", "feed_forward/w1/kernel",
                 "feed_forward/w2/kernel", "feed_forward/w3/kernel"}


def interleaved_to_half_split(kernel: np.ndarray, head_dim: int) -> np.ndarray:
    """Reorders a q/k kernel's output columns within each head: 0, 2, 4, …, then 1, 3, 5, …"""
    n_in, n_out = kernel.shape
    if n_out % head_dim or head_dim % 2:
        raise EasyLMFormatError(f"a q/k kernel of {n_out} columns does not split into heads of {head_dim}")
    split = kernel.reshape(n_in, n_out // head_dim, head_dim // 2, 2)
    return split.transpose(0, 1, 3, 2).reshape(n_in, n_out)


class StreamingParams:
    """The parameters of an EasyLM streaming file, in our unscanned layout, read one at a time.

    Opening indexes the file (one pass); `read(path)` then decodes just that tensor, so conversion
    holds one tensor in memory at a time, as with our Orbax checkpoints.
    """

    def __init__(self, path: str | Path, head_dim: int):
        self.path, self.head_dim = Path(path), head_dim
        self._offsets: dict[str, tuple[int, int]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for key, value, start, end in _records(self.path):
            ours = our_path(key)
            if ours is None:
                continue
            if ours in self._offsets:
                raise EasyLMFormatError(f"{self.path}: {'/'.join(key)} appears twice")
            self._offsets[ours] = (start, end)
            self.shapes[ours] = tuple(_decode(value, self.path, key).shape)
        if not self._offsets:
            raise EasyLMFormatError(f"{self.path}: no model parameters (keys transformer/… or params/params/…)")

    def read(self, path: str) -> np.ndarray:
        start, end = self._offsets[path]
        with open(self.path, "rb") as f:
            f.seek(start)
            key, value = msgpack.unpackb(f.read(end - start), raw=False)
        array = _decode(value, self.path, key)
        if path.endswith(_ROTARY_KERNELS):
            array = interleaved_to_half_split(array, self.head_dim)
        return array

    def __enter__(self) -> "StreamingParams":
        return self

    def __exit__(self, *exc) -> None:
        return None


def _decode(value: bytes, path: Path, key) -> np.ndarray:
    array = serialization.msgpack_restore(value)
    if not isinstance(array, np.ndarray):
        raise EasyLMFormatError(f"{path}: {'/'.join(map(str, key))} is not an array")
    return array

