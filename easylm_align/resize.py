"""Loading a checkpoint into a model with a larger vocabulary: the new rows of the embedding and LM head.

After `tools/extend_vocab` appends pieces to a tokenizer, the model's `vocab_size` grows; the old
rows keep their values (so the logits over the old vocabulary do not change on old-piece input)
and each new row is initialised by `--resize.init`:

* `subword_mean` (default): the mean of the rows of the pieces the *old* tokenizer splits the new
  piece's text into (Chinese-LLaMA-Alpaca-2's initialisation). For a SentencePiece piece, its text
  is the piece with '▁' read as a space; the old tokenizer encodes it without BOS/EOS, and a lone
  leading '▁' (SentencePiece's dummy prefix) is dropped when the piece itself has none. For a
  `tokenizer.json` base the old model tokenizes the byte-level token string as it is.
* `mean`: the mean of all old rows;
* `random`: normal(0, initializer_range), as the model initialises them.

Rows past the new tokenizer's pieces (padding to `--resize.pad_vocab_to_multiple`) and pieces the
old tokenizer cannot split get the mean of all old rows. The embedding's rows and the LM head's
columns are initialised alike.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from easylm_align import checkpoint
from easylm_align.errors import ConfigError
from easylm_align.tree_paths import path_str

INITS = ("subword_mean", "mean", "random")
EMBEDDING, LM_HEAD = "embed_tokens/embedding", "lm_head/kernel"
_SPACE = "\u2581"  # SentencePiece's '▁'


def default_config() -> ConfigDict:
    return ConfigDict(dict(
        init="subword_mean",        # new rows: subword_mean | mean | random
        old_tokenizer="",           # the checkpoint's tokenizer; '' reads it from the checkpoint's flags
        pad_vocab_to_multiple=0,    # >0: vocab_size = the tokenizer's size rounded up to this multiple
        seed=0,                     # for init=random
    ))


def padded_vocab_size(tokenizer_size: int, model_vocab_size: int, multiple: int) -> int:
    """The model's vocab_size: the tokenizer's size rounded up to `multiple` (never below the config's)."""
    if multiple < 0:
        raise ConfigError(f"--resize.pad_vocab_to_multiple={multiple} must be >= 0")
    if not multiple:
        return model_vocab_size
    return max(model_vocab_size, math.ceil(tokenizer_size / multiple) * multiple)


# ----------------------------------------------------------------------------------------------
# Which old pieces make up a new one
# ----------------------------------------------------------------------------------------------

def _load_tokenizer(path: str) -> Any:
    """A SentencePiece processor or a `tokenizers.Tokenizer`, by the file's kind."""
    if str(path).endswith(".json"):
        import tokenizers
        return tokenizers.Tokenizer.from_file(str(path))
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"--resize.old_tokenizer={str(path)!r} is not a SentencePiece model: {e}") from None
    return sp


def _tokenizer_size(tok: Any) -> int:
    return tok.GetPieceSize() if hasattr(tok, "GetPieceSize") else tok.get_vocab_size(with_added_tokens=True)


def _piece(tok: Any, i: int) -> Optional[str]:
    return tok.IdToPiece(i) if hasattr(tok, "IdToPiece") else tok.id_to_token(i)


def old_pieces(old: Any, piece: str) -> list[int]:
    """The ids the old tokenizer splits `piece` (a piece string of the new tokenizer) into."""
    if hasattr(old, "EncodeAsIds"):  # SentencePiece
        ids = old.EncodeAsIds(piece.replace(_SPACE, " "))
        if ids and not piece.startswith(_SPACE) and old.IdToPiece(ids[0]) == _SPACE:
            ids = ids[1:]
        return ids
    return [t.id for t in old.model.tokenize(piece)]  # tokenizers: the byte-level string, no pre-tokenizer


def new_row_sources(old: Any, new: Any, old_vocab: int, new_vocab: int) -> list[list[int]]:
    """For each id in [old_vocab, new_vocab): the old ids whose rows it averages ([] = mean of all)."""
    size = _tokenizer_size(new)
    out = []
    for i in range(old_vocab, new_vocab):
        piece = _piece(new, i) if i < size else None
        ids = [j for j in old_pieces(old, piece) if j < old_vocab] if piece else []
        out.append(ids)
    return out


# ----------------------------------------------------------------------------------------------
# Resizing a parameter tree (NumPy)
# ----------------------------------------------------------------------------------------------

def _new_rows(rows: np.ndarray, sources: Sequence[list[int]], init: str, std: float,
              rng: np.random.Generator) -> np.ndarray:
    """New rows for a (V_old, D) matrix, in float32 then cast to its dtype."""
    old = rows.astype(np.float32)
    mean = old.mean(axis=0)
    if init == "random":
        new = rng.normal(0.0, std, size=(len(sources), rows.shape[1])).astype(np.float32)
    elif init == "mean":
        new = np.broadcast_to(mean, (len(sources), rows.shape[1]))
    else:
        new = np.stack([old[ids].mean(axis=0) if ids else mean for ids in sources]) if len(sources) else \
            np.zeros((0, rows.shape[1]), np.float32)
    return new.astype(rows.dtype)


def resize_params(params: dict, new_vocab: int, sources: Sequence[list[int]], init: str,
                  initializer_range: float, seed: int = 0) -> dict:
    """`params` (nested dicts of NumPy arrays, our layout) with embedding and LM head grown to `new_vocab`."""
    if init not in INITS:
        raise ConfigError(f"--resize.init={init!r}: choose one of {INITS}")
    rng = np.random.default_rng(seed)
    out = jax.tree_util.tree_map(lambda x: x, params)  # a new tree; arrays are shared until replaced
    embedding = params["embed_tokens"]["embedding"]
    out["embed_tokens"]["embedding"] = np.concatenate(
        [embedding, _new_rows(embedding, sources, init, initializer_range, rng)])
    if "lm_head" in params:  # absent when the embeddings are tied
        head = params["lm_head"]["kernel"]
        out["lm_head"]["kernel"] = np.concatenate(
            [head, _new_rows(head.T, sources, init, initializer_range, rng).T], axis=1)
    assert out["embed_tokens"]["embedding"].shape[0] == new_vocab
    return out


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint into a larger model
# ----------------------------------------------------------------------------------------------

def vocab_growth(path: str, target: Any) -> Optional[tuple[int, int]]:
    """(old, new) vocab sizes when the checkpoint at `path` differs from `target` only by a smaller
    vocabulary in the embedding and LM head; None when it needs no resizing (or is not ours)."""
    ckpt = checkpoint.resolve_path(path)
    if not (ckpt / "params").is_dir():
        return None
    stored, wanted = checkpoint._stored_shapes(ckpt), checkpoint._flat_shapes(target)
    if stored == wanted or set(stored) != set(wanted) or EMBEDDING not in stored:
        return None
    old, new = stored[EMBEDDING][0], wanted[EMBEDDING][0]
    grown = {EMBEDDING: (new, stored[EMBEDDING][1])}
    if LM_HEAD in stored:
        grown[LM_HEAD] = (stored[LM_HEAD][0], new)
    if old >= new or {k: grown.get(k, v) for k, v in stored.items()} != wanted:
        return None
    return old, new


def old_tokenizer_path(config: ConfigDict, path: str) -> str:
    """`--resize.old_tokenizer`, else the tokenizer recorded in the checkpoint's flags."""
    if config.old_tokenizer:
        return config.old_tokenizer
    flags = checkpoint.read_meta(checkpoint.resolve_path(path)).get("flags", {})
    recorded = flags.get("tokenizer", {}).get("vocab_file", "")
    if not recorded or not Path(recorded).is_file():
        raise ConfigError(f"--resize.init=subword_mean: the checkpoint {path} is smaller than the model's vocabulary "
                          "and records no readable tokenizer; name the tokenizer it was trained with in "
                          "--resize.old_tokenizer (or choose --resize.init=mean|random)")
    return recorded


def load_params(path: str, target: Any, llama_config: Any, config: ConfigDict, new_tokenizer_file: str) -> Any:
    """`checkpoint.load_params`, growing a smaller vocabulary to the target's as `config` says."""
    growth = vocab_growth(path, target)
    if growth is None:
        return checkpoint.load_params(path, target, llama_config)
    old_vocab, new_vocab = growth
    sources: Sequence[list[int]] = [[]] * (new_vocab - old_vocab)
    if config.init == "subword_mean":
        old = _load_tokenizer(old_tokenizer_path(config, path))
        sources = new_row_sources(old, _load_tokenizer(new_tokenizer_file), old_vocab, new_vocab)
    params = resize_params(checkpoint.load_params_numpy(path), new_vocab, sources, config.init,
                           llama_config.initializer_range, config.seed)
    logging.info("loaded params from %s, vocabulary %d -> %d (new rows: %s)", path, old_vocab, new_vocab, config.init)
    flat = {path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    return jax.tree_util.tree_map_with_path(
        lambda k, t: jax.device_put(flat[path_str(k)].astype(t.dtype), getattr(t, "sharding", None)), target)


def resize_checkpoint(path: str, output: str, new_tokenizer_file: str, config: ConfigDict) -> tuple[int, int]:
    """Writes a params checkpoint of `path` grown to the new tokenizer's size (rounded up to
    `config.pad_vocab_to_multiple`), with its meta's llama_config updated; for `convert_to_hf` and any
    program that reads params. Returns (old, new) vocabulary sizes."""
    ckpt = checkpoint.resolve_path(path)
    meta = checkpoint.read_meta(ckpt)
    params = checkpoint.load_params_numpy(str(ckpt))
    old_vocab = params["embed_tokens"]["embedding"].shape[0]
    new_tok = _load_tokenizer(new_tokenizer_file)
    new_vocab = padded_vocab_size(_tokenizer_size(new_tok), old_vocab, config.pad_vocab_to_multiple or 1)
    if new_vocab <= old_vocab:
        raise ConfigError(f"{new_tokenizer_file} has {_tokenizer_size(new_tok)} pieces: the checkpoint's vocabulary "
                          f"({old_vocab}) needs no resizing")
    sources: Sequence[list[int]] = [[]] * (new_vocab - old_vocab)
    if config.init == "subword_mean":
        sources = new_row_sources(_load_tokenizer(old_tokenizer_path(config, path)), new_tok, old_vocab, new_vocab)
    llama = dict(meta.get("llama_config", {}))
    resized = resize_params(params, new_vocab, sources, config.init, llama.get("initializer_range", 0.02), config.seed)
    if llama:
        llama["vocab_size"] = new_vocab
    checkpoint.save_params(output, resized, meta=dict(meta, llama_config=llama) if llama else meta)
    return old_vocab, new_vocab
