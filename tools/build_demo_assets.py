"""Builds the demo corpus and the demo SentencePiece tokenizer shipped in easylm_align/assets/.

Run once by maintainers (the outputs are committed):
    python tools/build_demo_assets.py --shared_data=../shared/data

The corpus mixes English (Alpaca responses) with Hindi, Greek and Thai sentences (Universal
Dependencies treebanks) so the tiny default run sees the languages the recipes target. The
tokenizer is a 4,096-piece BPE model with byte fallback, no normalisation (newlines survive) and
LLaMA's special ids (unk 0, bos 1, eos 2).
"""

import argparse
import io
import json
import random
from pathlib import Path

import sentencepiece as spm

ASSETS = Path(__file__).resolve().parents[1] / "easylm_align" / "assets"


def build_corpus(shared: Path) -> list[str]:
    alpaca = json.loads((shared / "alpaca" / "alpaca_data.json").read_text())
    texts = [r["output"] for r in alpaca[:1500] if len(r["output"]) > 40]
    for name, limit in (("hi.ud_pud.txt", 1000), ("th.ud_pud.txt", 1000), ("el.ud_gdt.txt", 800)):
        lines = (shared / "mono" / name).read_text(encoding="utf-8").splitlines()
        # Five consecutive sentences make one document, closer to the Wikipedia text of the recipe.
        lines = [line for line in lines[:limit] if line.strip()]
        texts += [" ".join(lines[i:i + 5]) for i in range(0, len(lines), 5)]
    random.Random(0).shuffle(texts)  # languages interleaved, so the demo's loss curve is smooth
    return texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared_data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()
    texts = build_corpus(Path(args.shared_data))
    with open(ASSETS / "demo_corpus.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=4096, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        # As LLaMA's tokenizer: no normalisation, newlines and runs of spaces kept (prompts need them).
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        num_threads=2, max_sentence_length=100000, minloglevel=2)
    (ASSETS / "demo_tokenizer.model").write_bytes(model.getvalue())
    print(f"wrote {len(texts)} documents and a 4096-piece tokenizer to {ASSETS}")


if __name__ == "__main__":
    main()
