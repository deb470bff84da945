r"""Extends a tokenizer with pieces trained on a target-language corpus; ids of the base never move.

    python -m easylm_align.tools.extend_vocab --base=tokenizer.model --corpus=hi.txt \
        --vocab_size=40000 --output=extended.model [--heldout=hi=hi_test.txt,en=en_test.txt]

Bases:

* a SentencePiece BPE model (LLaMA-2, Mistral): SentencePiece's own trainer learns a BPE model of
  the corpus with the base's normalisation; its pieces the base lacks are appended to the base's
  model proto, after every existing piece, with scores below all of the base's (so every merge the
  base makes is made first).
* a byte-level BPE `tokenizer.json` (`tokenizers`): a BPE is trained with the base's
  pre-tokenizer; its new tokens get the ids after the largest existing one and its merges are
  appended after the base's.

A new piece is kept only if it can be built by one merge of two pieces of the extended vocabulary
(so the encoder can reach it), and, unless `--keep_ascii`, only if it holds a non-ASCII
character: a piece of ASCII characters alone could merge English text, which must tokenize exactly
as before. For the same reason a single character a SentencePiece base lacks is added only when it
is a letter or a mark (Devanagari, Thai, Greek), never punctuation such as '—' or '’', which keep
their byte-fallback pieces; the corpus is read with such characters replaced by spaces, so no
new piece or byte-level merge holds them. New pieces are taken in the trained model's order (single characters the base lacks
first) until the extended vocabulary has `--vocab_size` entries.

The fertility report: tokens per whitespace word and per character of each `--heldout` file,
before and after (Thai writes no spaces between words, so its per-word figure counts phrases).
"""

from __future__ import annotations

import io
import json
import sys
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Sequence

from absl import app, flags

from easylm_align.errors import UserError, exit_on_user_error

SPACE = "\u2581"  # SentencePiece's word-boundary mark


class VocabError(UserError):
    pass


def _define_flags() -> None:
    """Defined only when the tool runs, so that importing its functions defines none."""
    flags.DEFINE_string("base", None, "The tokenizer to extend: a SentencePiece .model or a tokenizer.json.")
    flags.DEFINE_string("corpus", None, "Monolingual target-language text, one document or sentence per line.")
    flags.DEFINE_integer("vocab_size", None, "Size of the extended vocabulary (the base's size plus the new pieces).")
    flags.DEFINE_string("output", None, "Where to write the extended tokenizer (same kind as --base).")
    flags.DEFINE_string("heldout", "", "Comma-separated LANG=PATH text files for the fertility report.")
    flags.DEFINE_float("character_coverage", 0.9995, "SentencePiece trainer's character_coverage.")
    flags.DEFINE_integer("max_corpus_lines", 2_000_000, "Lines of --corpus the trainer reads at most.")
    flags.DEFINE_boolean("keep_ascii", False, "Also append pieces of ASCII characters alone (may change "
                         "how English text tokenizes).")


# ----------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------

def read_corpus(path: str, max_lines: int) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for _, line in zip(range(max_lines), f)]
    except (OSError, UnicodeDecodeError) as e:
        raise VocabError(f"--corpus={path!r}: cannot read it as UTF-8 text ({e})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise VocabError(f"--corpus={path!r} is empty: it needs target-language text, one sentence per line")
    return lines


def base_kind(path: str) -> str:
    """'sentencepiece' or 'bpe_json', or a one-line error naming what the file is not."""
    p = Path(path)
    if not p.is_file():
        raise VocabError(f"--base={path!r}: no such file")
    head = p.read_bytes()[:1]
    if head in (b"{", b"["):
        try:
            spec = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VocabError(f"--base={path!r} is not valid JSON ({e})") from None
        model = spec.get("model", {}) if isinstance(spec, dict) else {}
        if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
            raise VocabError(f"--base={path!r}: a tokenizer.json base must be a byte-level BPE (model.type 'BPE' "
                             f"with a ByteLevel pre-tokenizer); this one's model type is {model.get('type')!r}")
        return "bpe_json"
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(p.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf's DecodeError has no stable import path
        proto = None
    if proto is None or not proto.pieces:
        raise VocabError(f"--base={path!r} is neither a SentencePiece model nor a tokenizer.json")
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise VocabError(f"--base={path!r} is a SentencePiece {sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)} "
                         "model; only BPE bases (LLaMA, Mistral) can be extended without changing old tokenizations")
    return "sentencepiece"


def base_size(path: str) -> int:
    """Entries in the base's vocabulary: SentencePiece pieces, or a tokenizer.json's distinct ids."""
    if base_kind(path) == "sentencepiece":
        from sentencepiece import sentencepiece_model_pb2
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(path).read_bytes())
        return len(proto.pieces)
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    return len(set(spec["model"]["vocab"].values()) | {t["id"] for t in spec.get("added_tokens", [])})


def _wanted(base_size: int, vocab_size: int) -> int:
    if vocab_size <= base_size:
        raise VocabError(f"--vocab_size={vocab_size} leaves nothing to add: the base already has {base_size} pieces")
    return vocab_size - base_size


def _is_ascii(text: str) -> bool:
    return all(ord(c) < 128 or c == SPACE for c in text)


def _new_char_allowed(piece: str) -> bool:
    """A character the base lacks is added only if it is a letter or mark (Unicode L*, M*): punctuation and
    symbols keep their byte-fallback pieces, so text in the base's language that uses them is unchanged."""
    return len(piece) > 1 or piece == SPACE or unicodedata.category(piece)[0] in "LM"


def _letters_only(line: str) -> str:
    """The line with every non-ASCII character that is not a letter or mark replaced by a space, so no new
    piece or merge holds the bytes of punctuation such as '’' or '—' that English text uses too."""
    return "".join(c if ord(c) < 128 or unicodedata.category(c)[0] in "LM" else " " for c in line)


def _reachable(piece: str, vocab: set[str]) -> bool:
    """One merge of two pieces already in `vocab` makes `piece` (single characters always can)."""
    return len(piece) == 1 or any(piece[:i] in vocab and piece[i:] in vocab for i in range(1, len(piece)))


def _no_new_piece(corpus: str) -> VocabError:
    return VocabError(f"--corpus={corpus!r} yields no new piece: the base already covers its text (is it in the "
                      "base's own language?)")


# ----------------------------------------------------------------------------------------------
# SentencePiece bases
# ----------------------------------------------------------------------------------------------

def extend_sentencepiece(base: str, lines: Sequence[str], vocab_size: int, character_coverage: float = 0.9995,
                         keep_ascii: bool = False, corpus_name: str = "") -> tuple[bytes, int]:
    """The extended model proto's bytes and the number of pieces appended."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(base).read_bytes())
    wanted = _wanted(len(proto.pieces), vocab_size)
    norm = proto.normalizer_spec
    trained = io.BytesIO()
    # Twice the pieces wanted (the trainer stops early on a small corpus): many trained pieces, the
    # characters among them, are already in the base; the first `wanted` new ones in merge order are kept.
    spm.SentencePieceTrainer.train(
        sentence_iterator=map(_letters_only, lines), model_writer=trained, model_type="bpe", vocab_size=2 * wanted + 256,
        hard_vocab_limit=False, character_coverage=character_coverage, byte_fallback=False,
        normalization_rule_name=norm.name if norm.name in ("identity", "nmt_nfkc", "nfkc") else "identity",
        add_dummy_prefix=norm.add_dummy_prefix, remove_extra_whitespaces=norm.remove_extra_whitespaces,
        split_digits=proto.trainer_spec.split_digits, max_sentence_length=1 << 16, num_threads=1,
        minloglevel=2)
    target = pb.ModelProto()
    target.ParseFromString(trained.getvalue())
    normal = [p.piece for p in target.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL]
    # Characters first (the trainer lists them last), then merged pieces in merge order.
    ordered = [p for p in normal if len(p) == 1] + [p for p in normal if len(p) > 1]
    vocab = {p.piece for p in proto.pieces}
    added = _select(ordered, vocab, wanted, keep_ascii)
    if not added:
        raise _no_new_piece(corpus_name)
    low = min(p.score for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL)
    for k, piece in enumerate(added):
        proto.pieces.add(piece=piece, score=low - 1 - k, type=pb.ModelProto.SentencePiece.NORMAL)
    return proto.SerializeToString(), len(added)


def _select(candidates: Iterable[str], vocab: set[str], wanted: int, keep_ascii: bool) -> list[str]:
    """Candidates the base lacks, reachable by one merge and (unless keep_ascii) not all-ASCII."""
    vocab, added = set(vocab), []
    for piece in candidates:
        if len(added) == wanted:
            break
        if piece in vocab or (not keep_ascii and _is_ascii(piece)) or not _new_char_allowed(piece) or \
                not _reachable(piece, vocab):
            continue
        vocab.add(piece)
        added.append(piece)
    return added


# ----------------------------------------------------------------------------------------------
# Byte-level BPE bases (tokenizer.json)
# ----------------------------------------------------------------------------------------------

def _byte_chars() -> dict[str, int]:
    """The byte-level alphabet's character for each byte (GPT-2's table), inverted: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def extend_bpe_json(base: str, lines: Sequence[str], vocab_size: int, keep_ascii: bool = False,
                    corpus_name: str = "") -> tuple[str, int]:
    """The extended tokenizer.json's text and the number of tokens appended."""
    import tokenizers
    from tokenizers import models, trainers

    spec = json.loads(Path(base).read_text(encoding="utf-8"))
    base_tok = tokenizers.Tokenizer.from_file(base)
    vocab: dict[str, int] = spec["model"]["vocab"]
    all_ids = list(vocab.values()) + [t["id"] for t in spec.get("added_tokens", [])]
    wanted = _wanted(len(set(all_ids)), vocab_size)
    learner = tokenizers.Tokenizer(models.BPE())
    learner.pre_tokenizer = base_tok.pre_tokenizer
    learner.normalizer = base_tok.normalizer
    # Four times the tokens wanted (the trainer stops early on a small corpus): a base like Llama 3's
    # already holds many of them; the first `wanted` new ones in merge order are kept.
    learner.train_from_iterator(map(_letters_only, lines), trainers.BpeTrainer(
        vocab_size=256 + 4 * wanted, show_progress=False, initial_alphabet=sorted(_byte_chars())))
    trained = json.loads(learner.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained]
    ascii_bytes = {c for c, b in _byte_chars().items() if b < 128}
    added, merges, known = [], [], set(vocab)
    for a, b in pairs:
        token = a + b
        if len(added) == wanted:
            break
        if token in known or a not in known or b not in known:
            continue
        if not keep_ascii and all(c in ascii_bytes for c in token):
            continue
        known.add(token)
        added.append(token)
        merges.append((a, b))
    if not added:
        raise _no_new_piece(corpus_name)
    next_id = max(all_ids) + 1
    for k, token in enumerate(added):
        vocab[token] = next_id + k
    as_strings = bool(spec["model"]["merges"]) and isinstance(spec["model"]["merges"][0], str)
    spec["model"]["merges"] += [f"{a} {b}" if as_strings else [a, b] for a, b in merges]
    return json.dumps(spec, ensure_ascii=False), len(added)


# ----------------------------------------------------------------------------------------------
# Encoding and the fertility report
# ----------------------------------------------------------------------------------------------

def encoder(path: str, data: bytes | str | None = None) -> Any:
    """A function text -> ids for a tokenizer file (or its bytes/text), without BOS/EOS."""
    if str(path).endswith(".json") or isinstance(data, str):
        import tokenizers
        tok = tokenizers.Tokenizer.from_str(data) if data is not None else tokenizers.Tokenizer.from_file(str(path))
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=data) if data is not None else spm.SentencePieceProcessor(
        model_file=str(path))
    return sp.EncodeAsIds


def fertility(encode: Any, lines: Sequence[str]) -> dict[str, float]:
    tokens = sum(len(encode(line)) for line in lines)
    words = sum(len(line.split()) for line in lines)
    chars = sum(len(line) for line in lines)
    return {"tokens": tokens, "tokens_per_word": tokens / max(words, 1), "tokens_per_char": tokens / max(chars, 1)}


def parse_heldout(value: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        lang, sep, path = item.partition("=")
        if not sep or not lang or not path:
            raise VocabError(f"--heldout={value!r}: expected LANG=PATH[,LANG=PATH...], e.g. hi=hi_test.txt")
        out.append((lang, path))
    return out


def fertility_report(before: Any, after: Any, heldout: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    rows = []
    for lang, path in heldout:
        lines = read_corpus(path, 10**9)
        b, a = fertility(before, lines), fertility(after, lines)
        rows.append({"lang": lang, "lines": len(lines), "before": b, "after": a})
    return rows


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    out = ["lang  lines  tokens/word before -> after  tokens/char before -> after"]
    for r in rows:
        b, a = r["before"], r["after"]
        out.append(f"{r['lang']:<5} {r['lines']:>5}  {b['tokens_per_word']:>8.3f} -> {a['tokens_per_word']:<8.3f}"
                   f"        {b['tokens_per_char']:>6.3f} -> {a['tokens_per_char']:.3f}")
    return "\n".join(out)


def extend(base: str, corpus: str, vocab_size: int, output: str, heldout: str = "",
           character_coverage: float = 0.9995, keep_ascii: bool = False,
           max_corpus_lines: int = 2_000_000) -> tuple[int, list[dict[str, Any]]]:
    """Writes the extended tokenizer to `output`; returns (pieces added, fertility rows)."""
    kind = base_kind(base)
    held = parse_heldout(heldout)
    lines = read_corpus(corpus, max_corpus_lines)
    if kind == "sentencepiece":
        data, added = extend_sentencepiece(base, lines, vocab_size, character_coverage, keep_ascii, corpus)
        Path(output).write_bytes(data)
    else:
        data, added = extend_bpe_json(base, lines, vocab_size, keep_ascii, corpus)
        Path(output).write_text(data, encoding="utf-8")
    return added, fertility_report(encoder(base), encoder(output), held)


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    with exit_on_user_error():
        for name in ("base", "corpus", "vocab_size", "output"):
            if f[name].value is None:
                raise VocabError(f"--{name} is required")
        added, rows = extend(f.base, f.corpus, f.vocab_size, f.output, f.heldout, f.character_coverage,
                             f.keep_ascii, f.max_corpus_lines)
    print(f"appended {added} pieces to {f.base}; wrote {f.output}")
    if rows:
        print(format_report(rows))
    sys.stdout.flush()


if __name__ == "__main__":
    _define_flags()
    app.run(main)
