"""Every tokenizer kind `--tokenizer.vocab_file` takes, against independent implementations.

Hugging Face kinds against `transformers.AutoTokenizer` on the same files, tiktoken files against
the `tiktoken` library itself, on every line of the Hindi, Thai, Greek, Chinese and English text
(tests/data always; ../shared/data's mono and parallel text when present).
"""

import base64
import json
import pickle
import shutil
from pathlib import Path

import pytest
import transformers
from ml_collections import ConfigDict

from easylm_align.conversion import to_hf
from easylm_align.evaluation.generation import newline_token_ids
from easylm_align.tokenizer import (DEMO_TOKENIZER, LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, Tokenizer, TokenizerError,
                                    bytes_to_unicode, split_tokens)

TINY = Path(__file__).resolve().parent / "data" / "tokenizers" / "tiny-bpe"


def text_lines(root: Path) -> list[str]:
    lines = []
    for path in sorted((root / "mono").glob("*")) + sorted((root / "parallel").glob("*")):
        lines += [line for line in path.read_text(encoding="utf-8").split("\n") if line]
    return lines


@pytest.fixture(scope="module")
def lines(test_data) -> list[str]:
    return text_lines(test_data)


def assert_like_auto_tokenizer(ours: Tokenizer, hf_dir: Path, lines: list[str]) -> None:
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)
    plain = theirs(lines, add_special_tokens=False)["input_ids"]
    special = theirs(lines)["input_ids"]
    for line, ids, ids_special, mine in zip(lines, plain, special, ours.encode_batch(lines)):
        assert mine == ids == ours.encode(line), line
        assert ids_special == [ours.bos_id] + mine, line
        assert ours.decode(mine) == theirs.decode(ids, skip_special_tokens=True), line


def test_kinds_are_recognised_from_the_content(tmp_path):
    copy = tmp_path / "vocab.bin"  # the name says nothing
    shutil.copy(TINY / "tokenizer.json", copy)
    assert Tokenizer(str(copy)).kind == "tokenizer.json"
    assert Tokenizer(str(TINY)).kind == "hf_dir"
    assert Tokenizer(str(DEMO_TOKENIZER)).kind == "sentencepiece"
    (tmp_path / "hf_sentencepiece").mkdir()  # a Hugging Face directory of LLaMA-2's kind
    shutil.copy(DEMO_TOKENIZER, tmp_path / "hf_sentencepiece" / "tokenizer.model")
    assert Tokenizer(str(tmp_path / "hf_sentencepiece")).kind == "sentencepiece"


@pytest.mark.parametrize("form", ["tokenizer.json", "directory"])
def test_tokenizer_json_encodes_like_auto_tokenizer(form, lines, tmp_path):
    ours = Tokenizer(str(TINY / "tokenizer.json") if form == "tokenizer.json" else str(TINY))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2)  # named in tokenizer_config / found by name
    assert_like_auto_tokenizer(ours, TINY, lines)


def test_what_the_pipeline_relies_on_works_with_a_tokenizer_json(lines):
    tok = Tokenizer(str(TINY))
    newline = tok.encode("a\nb")[1]
    assert newline in newline_token_ids(tok) and tok.decode([newline]) == "\n"
    assert all("\n" in tok.decode([i]) for i in newline_token_ids(tok))
    text = "Instruction: translate. Response: नमस्ते दुनिया"
    ids, n = split_tokens(tok, text, len("Instruction: translate. Response:"))
    assert ids == tok.encode(text) and 0 < n < len(ids)
    assert tok.decode(ids[:n]) == text[:len(tok.decode(ids[:n]))]
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text  # special tokens drop out, as SentencePiece's
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(lines[0]) == tok.encode(lines[0]) and clone.kind == tok.kind


def write_tiktoken_file(tok: Tokenizer, path: Path) -> None:
    """The tiny BPE's tokens as a tiktoken rank file: bytes by merge order (ids are that order)."""
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab = tok.hf.get_vocab(with_added_tokens=False)
    pieces = sorted((i, bytes(byte_of[c] for c in piece)) for piece, i in vocab.items() if i >= 3)
    singles = sorted({p for _, p in pieces if len(p) == 1} | {bytes([b]) for b in range(256)})
    longer = [p for _, p in pieces if len(p) > 1]
    with open(path, "w") as f:
        for rank, piece in enumerate(singles + longer):
            f.write(f"{base64.b64encode(piece).decode()} {rank}\n")


def tiktoken_encoding(path: Path):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(path))
    return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens={name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)})


def assert_like_tiktoken(ours: Tokenizer, path: Path, lines: list[str]) -> None:
    theirs = tiktoken_encoding(path)
    assert ours.bos_id == theirs.encode("<|begin_of_text|>", allowed_special="all")[0]
    assert ours.eos_id == theirs.encode("<|end_of_text|>", allowed_special="all")[0]
    assert ours.vocab_size == theirs.n_vocab
    for line, mine in zip(lines, ours.encode_batch(lines)):
        assert mine == theirs.encode_ordinary(line), line
        assert ours.decode(mine) == theirs.decode(mine) == line


def test_tiktoken_file_encodes_like_tiktoken(lines, tmp_path):
    path = tmp_path / "tokenizer.model"
    write_tiktoken_file(Tokenizer(str(TINY)), path)
    ours = Tokenizer(str(path))
    assert ours.kind == "tiktoken"
    assert_like_tiktoken(ours, path, lines)


def test_llama3_tiktoken_file_equals_tiktoken_and_its_export_equals_auto_tokenizer(shared_data, tmp_path):
    path = shared_data / "tokenizers" / "llama3" / "tokenizer.tiktoken"
    lines = text_lines(shared_data)
    ours = Tokenizer(str(path))
    assert (ours.kind, ours.vocab_size, ours.bos_id, ours.eos_id) == ("tiktoken", 128256, 128000, 128001)
    assert ours.id_to_piece(128009) == "<|eot_id|>"
    assert_like_tiktoken(ours, path, lines)
    # What convert_to_hf writes for it loads in transformers and encodes the same, BOS included.
    to_hf._write_tokenizer(ours, ConfigDict(dict(max_position_embeddings=8192)), tmp_path)
    assert_like_auto_tokenizer(ours, tmp_path, lines)
    assert_like_auto_tokenizer(Tokenizer(str(tmp_path)), tmp_path, lines)


def test_shared_text_encodes_like_auto_tokenizer_with_the_tiny_bpe(shared_data):
    assert_like_auto_tokenizer(Tokenizer(str(TINY)), TINY, text_lines(shared_data))


def test_a_file_of_no_known_kind_is_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("just some words\nand more\n")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "bad.tiktoken").write_text("aGVsbG8= 0\n!!! 1\n")
    (tmp_path / "empty_dir").mkdir()
    for name, says in [("notes.txt", "SentencePiece model, a Hugging Face tokenizer.json"),
                       ("bad.json", "not a tokenizers JSON file"), ("bad.tiktoken", "line 2"),
                       ("empty_dir", "without tokenizer.json"), ("missing", "no such file")]:
        with pytest.raises(TokenizerError, match=says) as info:
            Tokenizer(str(tmp_path / name))
        assert "\n" not in str(info.value)


def test_a_vocabulary_without_bos_needs_add_bos_token_false(tmp_path):
    shutil.copy(TINY / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((TINY / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, bos_token=None)))  # as Qwen2's
    with pytest.raises(TokenizerError, match="add_bos_token=false"):
        Tokenizer(str(tmp_path))
    tok = Tokenizer(str(tmp_path), add_bos_token=False)
    assert tok.bos_id == -1 and tok.eos_id == 1


def test_a_directory_and_its_tokenizer_json_are_one_tokenizer_unless_the_config_says_otherwise(tmp_path):
    """The identity hashes tokenizer.json and records the special ids tokenizer_config.json picks."""
    same, other = tmp_path / "same", tmp_path / "other"
    for d in (same, other):
        shutil.copytree(TINY, d)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(dict(config, eos_token="<|pad|>")))
    bare = Tokenizer(str(same / "tokenizer.json")).identity()
    assert Tokenizer(str(same)).identity() == dict(bare, file=str(same))
    changed = Tokenizer(str(other)).identity()
    assert changed["sha256"] == bare["sha256"] and changed["eos_id"] != bare["eos_id"]
    with pytest.raises(TokenizerError, match="was trained with the tokenizer"):
        Tokenizer(str(other)).check_recorded(bare, "checkpoint X")
