"""Tokenizers with EasyLM's BOS/EOS flags: SentencePiece, Hugging Face `tokenizers`, Llama 3's tiktoken file.

`--tokenizer.vocab_file` names one of (the kind is recognised from the file, not its name):

* a SentencePiece model (`tokenizer.model` of LLaMA-1/2, Mistral);
* a Hugging Face `tokenizer.json` (the `tokenizers` library's format), or a Hugging Face model
  directory holding one; the directory's `tokenizer_config.json` names the BOS/EOS/pad tokens;
* a tiktoken BPE file (`base64(token) rank` per line) as Meta ships Llama 3's `tokenizer.model`:
  it is turned into a byte-level BPE with Llama 3's pre-tokenizer pattern and its 256 special
  tokens at ids 128000..128255 (both from Meta's `llama/tokenizer.py`).

Whatever the kind, `encode` never adds special tokens: the text processors add BOS/EOS as
`add_bos_token` / `add_eos_token` say (EasyLM's meaning; Llama 3: `<|begin_of_text|>`,
`<|end_of_text|>`), and `decode` drops special tokens, as SentencePiece drops its control pieces.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import sentencepiece as spm
import tokenizers
from ml_collections import ConfigDict

from easylm_align.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_TOKENIZER = ASSETS / "demo_tokenizer.model"

# Llama 3's pre-tokenizer (Meta's `pat_str`) and special tokens, which its tiktoken file lacks.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = (["<|begin_of_text|>", "<|end_of_text|>"]
                         + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                         + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                         + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])
# A bare tokenizer.json names no BOS/EOS: these well-known tokens are looked up, first found wins.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")
_EXPECTED = ("a SentencePiece model, a Hugging Face tokenizer.json or model directory (with tokenizer.json), "
             "or a tiktoken BPE file (Llama 3's tokenizer.model)")


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
    """Encodes text to ids. BOS/EOS are added by the text processors, guided by the flags here.

    `kind` is "sentencepiece", "tokenizer.json", "hf_dir" or "tiktoken"; `sp` is the SentencePiece
    processor for the first and None otherwise, `hf` the `tokenizers.Tokenizer` for the others.
    """

    def __init__(self, vocab_file: str, add_bos_token: bool = True, add_eos_token: bool = True):
        path = Path(vocab_file)
        if not path.exists():
            raise TokenizerError(f"--tokenizer.vocab_file={vocab_file!r}: no such file")
        self.vocab_file = str(path)
        if path.is_dir() and not (path / "tokenizer.json").is_file() and (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"  # a Hugging Face directory of a SentencePiece (or tiktoken) model
        self._path = path
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._identity: Optional[dict] = None
        self.pad_token: Optional[str] = None  # the pad token's name where a tokenizer.json has one
        self.sp: Optional[spm.SentencePieceProcessor] = None
        self.hf: Optional[tokenizers.Tokenizer] = None
        self.kind = recognise(path)
        if self.kind == "sentencepiece":
            self.sp = spm.SentencePieceProcessor()
            try:
                self.sp.Load(str(path))
            except (OSError, RuntimeError) as e:
                raise TokenizerError(f"--tokenizer.vocab_file={vocab_file!r} is not {_EXPECTED}: {e}") from None
            self._specials = (self.sp.bos_id(), self.sp.eos_id(), max(self.sp.pad_id(), 0))
        else:
            self.hf, names = _load_hf(path, self.kind)
            bos, eos, pad = (_token_id(self.hf, name) for name in names)
            self.pad_token = names[2] if pad >= 0 else None
            self._specials = (bos, eos, max(pad, 0))
        if add_bos_token and self.bos_id < 0:
            raise TokenizerError(f"--tokenizer.vocab_file={vocab_file!r} has no BOS token; "
                                 "pass --tokenizer.add_bos_token=false")
        if add_eos_token and self.eos_id < 0:
            raise TokenizerError(f"--tokenizer.vocab_file={vocab_file!r} has no EOS token; "
                                 "pass --tokenizer.add_eos_token=false")

    @classmethod
    def from_config(cls, config: ConfigDict) -> "Tokenizer":
        return cls(config.vocab_file, config.add_bos_token, config.add_eos_token)

    def __getstate__(self):  # picklable for data-loading worker processes
        return (self.vocab_file, self.add_bos_token, self.add_eos_token)

    def __setstate__(self, state):
        self.__init__(*state)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize() if self.sp is not None else self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        """-1 when the vocabulary has none (Qwen2's)."""
        return self._specials[0]

    @property
    def eos_id(self) -> int:
        return self._specials[1]

    @property
    def pad_id(self) -> int:
        """The pad token where the vocabulary has one, else 0 (LLaMA has none); always under a zero mask."""
        return self._specials[2]

    def check_fits(self, model_vocab_size: int) -> None:
        """Every piece id must have a row in the model's embedding."""
        if self.vocab_size > model_vocab_size:
            raise TokenizerError(f"--tokenizer.vocab_file has {self.vocab_size} pieces but the model's "
                                 f"vocab_size is {model_vocab_size}")

    def identity(self) -> dict:
        """What a checkpoint records of its tokenizer: the file's SHA-256, size and special ids (and
        the file name, for messages only)."""
        if self._identity is None:
            digest = hashlib.sha256()
            for file in self._defining_files():
                digest.update(file.read_bytes())
            if self.sp is not None:
                unk, pad = self.sp.unk_id(), self.sp.pad_id()
            else:
                unk, pad = -1, _token_id(self.hf, self.pad_token)
            self._identity = dict(file=self.vocab_file, sha256=digest.hexdigest(), vocab_size=self.vocab_size,
                                  bos_id=self.bos_id, eos_id=self.eos_id, unk_id=unk, pad_id=pad)
        return self._identity

    def _defining_files(self) -> list[Path]:
        """The file the tokenizer was read from; for a model directory its tokenizer.json. What the
        directory's tokenizer_config.json decides (which tokens are BOS, EOS and pad) is in the
        identity as their ids, so the directory and its tokenizer.json given alone are the same
        tokenizer when they resolve the same special tokens."""
        return [self._path / "tokenizer.json" if self._path.is_dir() else self._path]

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
        if self.sp is not None:
            return self.sp.EncodeAsIds(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.sp is not None:
            return self.sp.Encode(list(texts))
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        return self.sp.Decode(ids) if self.sp is not None else self.hf.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> Optional[str]:
        return self.sp.IdToPiece(i) if self.sp is not None else self.hf.id_to_token(i)

    def newline_ids(self) -> list[int]:
        """Ids whose piece produces a newline (SentencePiece: "\\n" pieces and the byte piece <0x0A>)."""
        if self.sp is not None:
            sp = self.sp
            return [i for i in range(sp.GetPieceSize())
                    if "\n" in sp.IdToPiece(i) or (sp.IsByte(i) and sp.IdToPiece(i) == "<0x0A>")]
        texts = self.hf.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=True)
        return [i for i, text in enumerate(texts) if "\n" in text]


def recognise(path: Path) -> str:
    """The tokenizer kind of a file or directory, from its content; TokenizerError when it is none."""
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return "hf_dir"
        raise TokenizerError(f"--tokenizer.vocab_file={str(path)!r} is a directory without tokenizer.json "
                             "or tokenizer.model; "
                             f"expected {_EXPECTED}")
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.lstrip()[:1] == b"{":
        return "tokenizer.json"
    first = head.split(b"\n", 1)[0].split(b" ")
    if len(first) == 2 and first[1].strip().isdigit() and _is_base64(first[0]):
        return "tiktoken"
    return "sentencepiece"


def _is_base64(text: bytes) -> bool:
    try:
        base64.b64decode(text, validate=True)
        return True
    except ValueError:
        return False


def _load_hf(path: Path, kind: str) -> tuple[tokenizers.Tokenizer, tuple[Optional[str], ...]]:
    """The `tokenizers` object and the names of its (BOS, EOS, pad) tokens (None: none)."""
    if kind == "tiktoken":
        return tiktoken_to_tokenizers(path), (LLAMA3_SPECIAL_TOKENS[0], LLAMA3_SPECIAL_TOKENS[1], None)
    file = path / "tokenizer.json" if kind == "hf_dir" else path
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the library raises a bare Exception for malformed files
        raise TokenizerError(f"--tokenizer.vocab_file={str(path)!r}: {file} is not a tokenizers JSON file "
                             f"({str(e).splitlines()[0][:200]}); expected {_EXPECTED}") from None
    if kind == "hf_dir" and (path / "tokenizer_config.json").is_file():
        config = json.loads((path / "tokenizer_config.json").read_text())
        return hf, tuple(_content(config.get(key)) for key in ("bos_token", "eos_token", "pad_token"))
    vocab = hf.get_vocab(with_added_tokens=True)
    found = lambda names: next((n for n in names if n in vocab), None)
    return hf, (found(_BOS_NAMES), found(_EOS_NAMES), found(_PAD_NAMES))


def _content(token) -> Optional[str]:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _token_id(hf: tokenizers.Tokenizer, name: Optional[str]) -> int:
    if name is None:
        return -1
    found = hf.token_to_id(name)
    return -1 if found is None else found


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, which byte-level BPE vocabularies are written in:
    printable Latin-1 bytes stand for themselves, the others for characters from U+0100 on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiktoken_to_tokenizers(path: Path) -> tokenizers.Tokenizer:
    """`_converted_tiktoken`, built once per file and process (data workers rebuild the Tokenizer)."""
    stat = path.stat()
    return _converted_tiktoken(str(path.absolute()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _converted_tiktoken(file: str, mtime_ns: int, size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE equal to tiktoken's encoding of Llama 3's file.

    tiktoken merges, in a pre-token, the adjacent pair whose concatenation has the lowest rank, and
    takes a pre-token that is a whole token as it is. So the merges are every split of every token
    into two tokens, ranked by the token they make (`ignore_merges` is the whole-token rule).
    """
    path = Path(file)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerError(f"--tokenizer.vocab_file={str(path)!r} line {number} is not "
                                     "'base64(token) rank' of a tiktoken BPE file") from None
    table = bytes_to_unicode()
    text = lambda token: "".join(table[b] for b in token)
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], text(left), text(right)))
    merges.sort()
    model = tokenizers.models.BPE(vocab, [(a, b) for _, _, a, b in merges], ignore_merges=True)
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = tokenizers.decoders.ByteLevel()
    first = len(ranks)
    hf.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)
                           for name in LLAMA3_SPECIAL_TOKENS])
    if hf.token_to_id(LLAMA3_SPECIAL_TOKENS[0]) != first:
        raise TokenizerError(f"--tokenizer.vocab_file={str(path)!r}: ranks are not 0..{first - 1}")
    return hf


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
