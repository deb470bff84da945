"""Trains the tiny byte-level BPE shipped as tests/data/tokenizers/tiny-bpe/ (tokenizer.json and
tokenizer_config.json), the always-on tests' Hugging Face tokenizer.

Llama 3's layout at a toy size: its pre-tokenizer pattern and byte-level pieces, BOS/EOS named as
Llama 3 names them (ids 0 and 1 here), a post-processor that adds BOS as Llama 3's tokenizer.json
does, 1,000 entries learnt from the Hindi, Thai, Chinese and English text in tests/data.

    python tools/make_test_tokenizer.py
"""

import json
from pathlib import Path

import tokenizers

from easylm_align.tokenizer import LLAMA3_PATTERN

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
OUT = DATA / "tokenizers" / "tiny-bpe"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]


def main() -> None:
    files = [DATA / "mono" / "hi.ud_pud.txt", DATA / "parallel" / "pud.en-hi-th-zh.tsv",
             DATA / "parallel" / "tatoeba.en-zh.tsv"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(ignore_merges=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A:0", pair=f"{SPECIALS[0]} $A:0 {SPECIALS[0]}:1 $B:1",
        special_tokens=[(SPECIALS[0], tok.token_to_id(SPECIALS[0]))])
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"), pretty=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[1],
              "pad_token": SPECIALS[2], "clean_up_tokenization_spaces": False, "model_max_length": 1024}
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT} ({tok.get_vocab_size()} entries)")


if __name__ == "__main__":
    main()
