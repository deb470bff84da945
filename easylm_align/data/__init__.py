"""The data pipeline: sources, processors, packing, pairs, and the resumable iterator.

| module | what it is |
|---|---|
| `sources.py` | where records come from: local JSON files, Hugging Face data sets |
| `processors.py` | record → token ids and loss mask (`fields`, `alpaca`; code-mixing) |
| `packing.py` | token ids → fixed `batch × seq_length` rows (EasyLM's one stream) |
| `pairs.py` | AFP's pair sources and their batch layout (sentence pairs + CLM rows) |
| `pipeline.py` | the iterator: source → processor → batcher, shuffling, workers, exact position |

Nothing is registered on import: `pipeline.SOURCES` names the sources.
"""
