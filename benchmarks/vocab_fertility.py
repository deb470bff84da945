r"""Fertility of the LLaMA-2, Mistral v0.3 and Llama 3 tokenizers on Hindi, Thai and Greek, before and
after `tools/extend_vocab`, on the shared data (docs/VOCABULARY.md quotes its output).

    python benchmarks/vocab_fertility.py --data=../shared/data --sizes=1000,4000 --out=/tmp/fertility.json

For each base and language an extension is trained on the first 80% of `mono/<lang>.*.txt` and
measured on the last 20% (held out) and on the target side of `parallel/tatoeba.en-<lang>.tsv`;
the English side of the same file checks that English tokenizes exactly as before.

Llama 3 ships as a tiktoken file (ranks, no merges); it is turned here into an equivalent byte-level
BPE `tokenizer.json` (every token's merge: its two-part splits into tokens of lower rank, ordered
by rank; Llama 3's split pattern; `ignore_merges`, as Hugging Face's release). With `tiktoken`
installed the conversion is checked against it on the measured text first.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
from pathlib import Path

from easylm_align.tools import extend_vocab

LANGS = ("hi", "th", "el")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_tokenizer_json(path: Path) -> str:
    """The tiktoken file as a `tokenizers` byte-level BPE (ids = ranks; special tokens left out)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = {b: c for c, b in extend_vocab._byte_chars().items()}
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    as_text = lambda b: "".join(chars[x] for x in b)
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks and ranks[left] < rank and ranks[right] < rank:
                merges.append((rank, ranks[left], ranks[right], as_text(left), as_text(right)))
    merges.sort()
    vocab = {as_text(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def check_against_tiktoken(path: Path, tokenizer_json: str, texts: list[str]) -> str:
    try:
        import tiktoken
    except ImportError:
        return "tiktoken not installed: conversion not cross-checked"
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in path.read_text().splitlines())}
    reference = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    ours = extend_vocab.encoder("x.json", tokenizer_json)
    bad = sum(reference.encode(t) != ours(t) for t in texts)
    if bad:
        raise SystemExit(f"the converted Llama 3 tokenizer differs from tiktoken on {bad} of {len(texts)} texts")
    return f"equal to tiktoken on all {len(texts)} texts"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--sizes", default="1000,4000", help="pieces to add (requested; fewer if the corpus runs out)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    data = Path(args.data)
    work = Path(tempfile.mkdtemp())
    mono = {lang: next((data / "mono").glob(f"{lang}.*.txt")).read_text(encoding="utf-8").splitlines()
            for lang in LANGS}
    pairs = {lang: [line.split("\t") for line in (data / f"parallel/tatoeba.en-{lang}.tsv").read_text(
        encoding="utf-8").splitlines() if "\t" in line] for lang in LANGS}
    llama3 = llama3_tokenizer_json(data / "tokenizers/llama3/tokenizer.tiktoken")
    (work / "llama3.json").write_text(llama3, encoding="utf-8")
    all_text = [t for lang in LANGS for t in mono[lang] + [x for p in pairs[lang] for x in p]]
    print("llama3 conversion:", check_against_tiktoken(data / "tokenizers/llama3/tokenizer.tiktoken", llama3,
                                                       all_text), flush=True)
    bases = {"llama2": data / "tokenizers/llama2/tokenizer.model",
             "mistral-v0.3": data / "tokenizers/mistral-7b-v0.3/tokenizer.model", "llama3": work / "llama3.json"}
    rows = []
    for name, base in bases.items():
        base_size = extend_vocab.base_size(str(base))
        before = extend_vocab.encoder(str(base))
        for lang in LANGS:
            cut = int(len(mono[lang]) * 0.8)
            corpus, heldout = work / f"{lang}.train.txt", mono[lang][cut:]
            corpus.write_text("\n".join(mono[lang][:cut]) + "\n", encoding="utf-8")
            target, english = [p[1] for p in pairs[lang]], [p[0] for p in pairs[lang]]
            row = {"base": name, "lang": lang, "base_size": base_size,
                   "mono_heldout": {"0": extend_vocab.fertility(before, heldout)},
                   "tatoeba": {"0": extend_vocab.fertility(before, target)}, "english_unchanged": {}}
            for size in (int(s) for s in args.sizes.split(",")):
                out = work / f"{name}.{lang}.{size}{base.suffix}"
                added, _ = extend_vocab.extend(str(base), str(corpus), base_size + size, str(out))
                after = extend_vocab.encoder(str(out))
                key = str(added)
                row["mono_heldout"][key] = extend_vocab.fertility(after, heldout)
                row["tatoeba"][key] = extend_vocab.fertility(after, target)
                row["english_unchanged"][key] = all(before(t) == after(t) for t in english)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
