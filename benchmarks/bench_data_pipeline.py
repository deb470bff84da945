"""Throughput of the whole COMMIT data pipeline: read → code-mix → tokenize → pack.

    python benchmarks/bench_data_pipeline.py [--examples=2000] [--workers=0,1,2]

Alpaca (the shared JSON list, read through the `json` source), MUSE en-hi at ratio 0.9 with the
template blocked, the LLaMA-2 SentencePiece tokenizer, packed into 16 × 512 batches — exactly
what `python -m easylm_align.train` does before each step. With 0 workers everything runs in
this process (the per-core figure: rates are per CPU second of the process); with N workers
processing runs in N spawned processes and the rate is wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from easylm_align.data import pipeline
from easylm_align.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EASYLM_ALIGN_SHARED_DATA", REPO.parent / "shared" / "data"))


def run(path: Path, tokenizer: Tokenizer, workers: int, n_examples: int) -> dict:
    cfg = pipeline.default_config("json")
    cfg.update_from_flattened_dict({
        "json_dataset.path": str(path), "json_dataset.seq_length": 512, "json_dataset.batch_size": 16,
        "text_processor.alpaca": True, "text_processor.codemix_dict_path": str(REPO / "dicts/en-hi.txt"),
        "text_processor.codemix_ratio": 0.9, "text_processor.block_codemix_in_template": True,
        "num_workers": workers})
    it = pipeline.DatasetIterator(cfg, tokenizer)
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    while it.stats["examples"] < n_examples:
        tokens += next(it)["input_tokens"].size
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    it.close()
    return {"workers": workers, "examples": it.stats["examples"], "tokens": tokens, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s_wall": tokens / wall, "tokens_per_cpu_s": tokens / cpu}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = Tokenizer(str(SHARED / "tokenizers/llama2/tokenizer.model"))
    records = json.loads((SHARED / "alpaca/alpaca_data.json").read_text())[: args.examples + 400]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "alpaca.json"
        path.write_text(json.dumps(records))
        print(f"{'workers':>7} {'examples':>8} {'tokens':>9} {'wall s':>7} {'tokens/s wall':>14} {'tokens/CPU s':>13}")
        for workers in (int(w) for w in args.workers.split(",")):
            best = max((run(path, tokenizer, workers, args.examples) for _ in range(args.repeats)),
                       key=lambda r: r["tokens_per_s_wall"])
            print(f"{best['workers']:>7} {best['examples']:>8} {best['tokens']:>9} {best['wall_s']:>7.2f} "
                  f"{best['tokens_per_s_wall']:>14,.0f} {best['tokens_per_cpu_s']:>13,.0f}")


if __name__ == "__main__":
    main()
