"""SentencePiece tokenizer with EasyLM's BOS/EOS flags."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import sentencepiece as spm
from ml_collections import ConfigDict

from easylm_align.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_TOKENIZER = ASSETS / "demo_tokenizer.model"


class TokenizerError(UserError):
    pass


def default_config() -> ConfigDict:
    """`--tokenizer.*`. The default vocabulary is the small demo model shipped with the package."""
    # allow_mismatch: load a checkpoint recorded with another tokenizer (refused by default: the
    # embedding rows would mean other pieces); for a deliberate vocabulary change.
    return ConfigDict(dict(vocab_file=str(DEMO_TOKENIZER), add_bos_token=True, add_eos_token=True,
                           allow_mismatch=False))


# What makes two tokenizers the same for a checkpoint: the file's bytes, and what a reader sees of them.
IDENTITY_KEYS = ("sha256", "vocab_size", "bos_id", "eos_id", "unk_id", "pad_id")


class Tokenizer:
    """Encodes text to ids. BOS/EOS are added by the text processors, guided by the flags here."""

    def __init__(self, vocab_file: str, add_bos_token: bool = True, add_eos_token: bool = True):
        path = Path(vocab_file)
        if not path.is_file():
            raise TokenizerError(f"--tokenizer.vocab_file={vocab_file!r}: no such file")
        self.vocab_file = str(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"--tokenizer.vocab_file={vocab_file!r} is not a SentencePiece model: {e}") from None
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._identity: Optional[dict] = None

    @classmethod
    def from_config(cls, config: ConfigDict) -> "Tokenizer":
        return cls(config.vocab_file, config.add_bos_token, config.add_eos_token)

    def __getstate__(self):  # picklable for data-loading worker processes
        return (self.vocab_file, self.add_bos_token, self.add_eos_token)

    def __setstate__(self, state):
        self.__init__(*state)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """LLaMA tokenizers have no pad piece; 0 (unk) pads, always under a zero mask."""
        return max(self.sp.pad_id(), 0)

    def check_fits(self, model_vocab_size: int) -> None:
        """Every piece id must have a row in the model's embedding."""
        if self.vocab_size > model_vocab_size:
            raise TokenizerError(f"--tokenizer.vocab_file has {self.vocab_size} pieces but the model's "
                                 f"vocab_size is {model_vocab_size}")

    def identity(self) -> dict:
        """What a checkpoint records of its tokenizer: the file's SHA-256, size and special ids (and
        the file name, for messages only)."""
        if self._identity is None:
            digest = hashlib.sha256(Path(self.vocab_file).read_bytes()).hexdigest()
            self._identity = dict(file=self.vocab_file, sha256=digest, vocab_size=self.vocab_size,
                                  bos_id=self.bos_id, eos_id=self.eos_id, unk_id=self.sp.unk_id(),
                                  pad_id=self.sp.pad_id())
        return self._identity

    def check_recorded(self, recorded: Optional[dict], where: str, allow: bool = False,
                       flag: str = "--tokenizer.vocab_file", allow_flag: str = "--tokenizer.allow_mismatch") -> None:
        """Refuses (TokenizerError) to use this tokenizer with `where` (a checkpoint) if the checkpoint
        recorded another one; `allow` turns the refusal into a warning. Checkpoints that recorded
        none (older ones, conversions) pass."""
        if not recorded:
            return
        mine = self.identity()
        if all(recorded.get(k) == mine[k] for k in IDENTITY_KEYS):
            return
        message = (f"{where} was trained with the tokenizer {describe_identity(recorded)}, but {flag} is "
                   f"{describe_identity(mine)}")
        if allow:
            logging.warning("%s; going on because %s=True", message, allow_flag)
            return
        raise TokenizerError(f"{message}; use the tokenizer the checkpoint was trained with, or pass "
                             f"{allow_flag}=True if the change is meant")

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.Encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.Decode([int(i) for i in ids])


def describe_identity(identity: dict) -> str:
    """One line: `FILE (sha256 0123456789ab, 32000 pieces, bos 1, eos 2, unk 0, pad -1)`."""
    return (f"{identity.get('file', '?')} (sha256 {str(identity.get('sha256', '?'))[:12]}, "
            f"{identity.get('vocab_size', '?')} pieces, bos {identity.get('bos_id', '?')}, "
            f"eos {identity.get('eos_id', '?')}, unk {identity.get('unk_id', '?')}, pad {identity.get('pad_id', '?')})")


def split_tokens(tokenizer: Tokenizer, text: str, prefix_chars: int) -> tuple[list[int], int]:
    """Token ids of `text` and how many of them belong to its first `prefix_chars` characters.

    `text` is tokenized whole (what the model sees); the prefix's share is the longest common
    prefix with the tokenization of `text[:prefix_chars]` (AFP's rule), so a token straddling the
    boundary (`"▁D"` of `": Dear"`) counts as after it, whatever the tokenizer does at the seam.
    """
    ids = tokenizer.encode(text)
    if prefix_chars <= 0:
        return ids, 0
    n = 0
    for a, b in zip(ids, tokenizer.encode(text[:prefix_chars])):
        if a != b:
            break
        n += 1
    return ids, n
