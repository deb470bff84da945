"""Largest relative difference of the per-step losses: reference metrics (JSON list) vs our metrics.jsonl."""
import json, sys
ref = json.load(open(sys.argv[1]))
ours = [json.loads(l) for l in open(sys.argv[2])]
worst = 0
for i, (r, o) in enumerate(zip(ref, ours)):
    rel = abs(r["loss"] - o["loss"]) / abs(r["loss"])
    worst = max(worst, rel)
    if i in (0, 1, 19): print(i + 1, r["loss"], o["loss"], rel, r["gradient_norm"], o["gradient_norm"], r["accuracy"], o["accuracy"])
print("steps", len(ours), "max relative loss difference", worst)
