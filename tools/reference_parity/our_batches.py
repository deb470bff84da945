"""The first 20 batches of our pipeline for the reference comparison (docs/REFERENCE_CHECKS.md):
Alpaca or a text file, the LLaMA-2 tokenizer, 8 x 128, the reference's token stream.

    python our_batches.py alpaca ALPACA_JSON TOKENIZER
    python our_batches.py text TEXT_JSONL TOKENIZER
"""
import os
import sys

import numpy as np

from easylm_align.data import pipeline
from easylm_align.tokenizer import Tokenizer

OUT = os.environ.get("PARITY_DIR", "/tmp/refrun")
name, data, vocab_file = sys.argv[1:4]
cfg = pipeline.default_config("json")
processor = {"text_processor.alpaca": True} if name == "alpaca" else {"text_processor.fields": "text"}
cfg.update_from_flattened_dict({"json_dataset.path": data, "json_dataset.seq_length": 128, "json_dataset.batch_size": 8,
                                "text_processor.reference_token_stream": True, **processor})
iterator = pipeline.DatasetIterator(cfg, Tokenizer(vocab_file, add_bos_token=True, add_eos_token=True))
batches = [next(iterator) for _ in range(20)]
np.savez(f"{OUT}/batches_{name}.npz", **{k: np.stack([b[k] for b in batches])
                                         for k in ("input_tokens", "target_tokens", "loss_masks")})
