"""Largest relative difference of the per-step losses: afp_reference_run.py's ref_afp.json vs our
metrics.jsonl; prints both sides' CLM target counts per step and, given the data file our side read
and the tokenizer, checks that the reference's sentence rows (up to its attention mask) are BOS +
SentencePiece's tokens of that file's records in order: same records, same tokens.

    python afp_compare.py $PARITY_DIR/ref_afp.json OUR_DIR/metrics.jsonl [$PARITY_DIR/ordered.json TOKENIZER]
"""
import json
import sys

ref = json.load(open(sys.argv[1]))["steps"]
ours = [m for m in map(json.loads, open(sys.argv[2])) if "loss" in m]
worst = 0.0
for i, (r, o) in enumerate(zip(ref, ours)):
    targets = sum(label != -100 for row in r["clm_labels"] for label in row[1:])
    rel = abs(r["loss"] - o["loss"]) / abs(r["loss"])
    worst = max(worst, rel)
    print(f"step {i + 1:2d} ref {r['loss']:.7f} ours {o['loss']:.7f} rel {rel:.1e} "
          f"CLM targets ref {targets} ours {int(o['loss_tokens'])} "
          f"gradient norm ref {r['gradient_norm']:.6f} ours {o['gradient_norm']:.6f}")
print("steps", min(len(ref), len(ours)), "max relative loss difference", f"{worst:.2e}")

if len(sys.argv) > 3:
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=sys.argv[4])
    records = [json.loads(line) for line in open(sys.argv[3], encoding="utf-8")]
    for i, r in enumerate(ref):
        for b, (row, mask) in enumerate(zip(r["input_ids"], r["attention_mask"])):
            for k, key in enumerate(("sent0", "sent1")):
                expect = ([sp.bos_id()] + sp.encode(records[2 * i + b][key]))[:512]
                assert row[k][:sum(mask[k])] == expect, (i, b, key)
                assert mask[k] == sorted(mask[k], reverse=True), ("not right-padded", i, b, key)
    print("sentence rows of all", len(ref), "steps = BOS + SentencePiece tokens of", sys.argv[3],
          "in order, right-padded")
