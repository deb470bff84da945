"""tools/extend_vocab: pieces appended after the base's, old text tokenized as before, bad input in one line."""

import json
import subprocess
import sys

import pytest
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, models, pre_tokenizers, trainers

from conftest import REPO_ROOT, TEST_DATA
from easylm_align.tokenizer import DEMO_TOKENIZER
from easylm_align.tools import extend_vocab

PUD = TEST_DATA / "parallel/pud.en-hi-th-zh.tsv"
MISTRAL = TEST_DATA / "tokenizers/mistral-7b-v0.1/tokenizer.model"  # LLaMA's format, 32000 pieces


def _column(name):
    rows = PUD.read_text(encoding="utf-8").splitlines()
    index = rows[0].split("\t").index(name)
    return [r.split("\t")[index] for r in rows[1:]]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    hindi = (TEST_DATA / "mono/hi.ud_pud.txt").read_text(encoding="utf-8").splitlines()
    (d / "hi.txt").write_text("\n".join(hindi[:120]) + "\n", encoding="utf-8")
    (d / "hi_heldout.txt").write_text("\n".join(_column("hi")[-40:]) + "\n", encoding="utf-8")
    (d / "en.txt").write_text("\n".join(_column("en")[:200]) + "\n", encoding="utf-8")
    return d


def _byte_level_base(path):
    """A small byte-level BPE tokenizer.json trained here on English (the shape of Llama 3's / Qwen2's)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_column("en"), trainers.BpeTrainer(
        vocab_size=700, show_progress=False, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def test_sentencepiece_base_keeps_ids_and_english(tmp_path, corpora):
    out = tmp_path / "extended.model"
    added, rows = extend_vocab.extend(str(MISTRAL), str(corpora / "hi.txt"), 32000 + 300, str(out),
                                      heldout=f"hi={corpora / 'hi_heldout.txt'},en={corpora / 'en.txt'}")
    base, new = sentencepiece_model_pb2.ModelProto(), sentencepiece_model_pb2.ModelProto()
    base.ParseFromString(MISTRAL.read_bytes())
    new.ParseFromString(out.read_bytes())
    assert added == 300 and len(new.pieces) == 32000 + added
    assert list(new.pieces)[:32000] == list(base.pieces)  # every old piece, score and type in place
    assert all(any(ord(c) > 127 for c in p.piece) for p in new.pieces[32000:])
    old_sp, new_sp = spm.SentencePieceProcessor(model_file=str(MISTRAL)), spm.SentencePieceProcessor(
        model_file=str(out))
    for line in _column("en"):  # English: exactly the same ids
        assert new_sp.EncodeAsIds(line) == old_sp.EncodeAsIds(line), line
    heldout = _column("hi")[-40:]
    assert sum(len(new_sp.EncodeAsIds(t)) for t in heldout) < 0.7 * sum(len(old_sp.EncodeAsIds(t)) for t in heldout)
    assert all(new_sp.DecodeIds(new_sp.EncodeAsIds(t)) == t for t in heldout)
    assert any(i >= 32000 for t in heldout for i in new_sp.EncodeAsIds(t))  # the new pieces are reachable
    # The report's figures, recounted here.
    hi = next(r for r in rows if r["lang"] == "hi")
    words = sum(len(t.split()) for t in heldout)
    assert hi["after"]["tokens_per_word"] == pytest.approx(sum(len(new_sp.EncodeAsIds(t)) for t in heldout) / words)
    en = next(r for r in rows if r["lang"] == "en")
    assert en["before"] == en["after"]


def test_byte_level_bpe_base_keeps_ids_merges_and_english(tmp_path, corpora):
    base_path = _byte_level_base(tmp_path / "base.json")
    out = tmp_path / "extended.json"
    added, _ = extend_vocab.extend(str(base_path), str(corpora / "hi.txt"), 700 + 400, str(out))
    base, new = json.loads(base_path.read_text()), json.loads(out.read_text())
    assert 0 < added <= 400
    assert {k: new["model"]["vocab"][k] for k in base["model"]["vocab"]} == base["model"]["vocab"]
    assert sorted(set(new["model"]["vocab"].values()) - set(base["model"]["vocab"].values())) == \
        list(range(700, 700 + added))  # after the special token's id 0..699
    assert new["model"]["merges"][:len(base["model"]["merges"])] == base["model"]["merges"]
    old_tok, new_tok = tokenizers.Tokenizer.from_file(str(base_path)), tokenizers.Tokenizer.from_file(str(out))
    for line in _column("en"):
        assert new_tok.encode(line).ids == old_tok.encode(line).ids, line
    heldout = _column("hi")[-40:]
    assert sum(len(new_tok.encode(t).ids) for t in heldout) < 0.5 * sum(len(old_tok.encode(t).ids) for t in heldout)
    assert all(new_tok.decode(new_tok.encode(t).ids) == t for t in heldout)


def _run(*args):
    return subprocess.run([sys.executable, "-m", "easylm_align.tools.extend_vocab", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_bad_inputs_are_one_line(tmp_path, corpora):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    not_a_tokenizer = tmp_path / "notes.txt"
    not_a_tokenizer.write_text("hello")
    cases = [
        ([f"--corpus={empty}", "--vocab_size=5000"], "is empty"),
        ([f"--corpus={corpora / 'en.txt'}", "--vocab_size=5000"], "yields no new piece"),
        ([f"--corpus={corpora / 'hi.txt'}", "--vocab_size=4096"], "leaves nothing to add"),
        ([f"--corpus={corpora / 'hi.txt'}", "--vocab_size=5000", f"--base={not_a_tokenizer}"],
         "neither a SentencePiece model nor a tokenizer.json"),
    ]
    for args, message in cases:
        result = _run(f"--base={DEMO_TOKENIZER}", f"--output={tmp_path / 'out.model'}", *args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
