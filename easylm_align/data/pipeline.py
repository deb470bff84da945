"""The resumable pipeline: source → processor → batcher → global batches.

`--train_dataset.type` picks a source (`SOURCES`); the source supplies its processor and batcher
(sources.py, pairs.py). Records are read in source order, as EasyLM does, or shuffled within
windows (`shuffle_buffer`, shuffling.py); processing can run in `num_workers` processes with the
order preserved.

The layout is the reference's and does not depend on the number of hosts: every host reads and
processes the whole stream identically and builds the same global batch (`batch_size` rows); the
batch placement (`sharding.host_batch_to_global`) puts on each device only its own rows. So the
position (epoch, next record, packer buffer) is global: it is saved once with every checkpoint,
and a run resumed on any number of hosts sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from typing import Iterator, Optional

import numpy as np
from ml_collections import ConfigDict

from easylm_align import shuffling
from easylm_align.config import flatten
from easylm_align.data import processors
from easylm_align.data.mixture import MixtureSource
from easylm_align.data.pairs import AfpSource, CodemixPairsSource
from easylm_align.data.sources import HuggingfaceSource, JsonSource, Record, Source
from easylm_align.records import DataError
from easylm_align.tokenizer import Tokenizer

# MixtureSource draws from several text sources by weight (mixture.py).
SOURCES: dict[str, type[Source]] = {cls.name: cls for cls in (JsonSource, HuggingfaceSource, AfpSource,
                                                               CodemixPairsSource, MixtureSource)}


def default_config(dataset_type: str = "json") -> ConfigDict:
    """`--train_dataset.*` / `--eval_dataset.*`: source type, one group per source, the processor."""
    # separate_segments: False packs one causal stream per row, as the reference; True keeps packed
    # examples apart (own positions, no attention across them); packing.py says what changes.
    # shuffle_buffer: 0 reads records in source order (EasyLM's); N shuffles within windows of N
    # records, anew each epoch, from shuffle_seed (shuffling.py).
    # epoch_tail: the tokens left after an epoch's last full batch are dropped (`drop`: every epoch
    # starts afresh at its first record) or start the next epoch's first batch (`carry`); `auto` is
    # the reference's for the source (Source.epoch_tail: huggingface drops, json carries).
    cfg = dict(type=dataset_type, text_processor=processors.default_config(),
               separate_segments=False, num_workers=0, shuffle_buffer=0, shuffle_seed=0, epoch_tail="auto")
    cfg.update({cls.config_key: cls.default_config() for cls in SOURCES.values()})
    return ConfigDict(cfg)


# ----------------------------------------------------------------------------------------------
# Processing, in this process or in workers
# ----------------------------------------------------------------------------------------------

_WORKER_PROCESSOR: Optional[processors.TextProcessor] = None


def _init_worker(processor: processors.TextProcessor) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = processor


def _process(processor, number: int, index: int, record: Record):
    if record.example is None:
        return number, record, None
    try:
        return number, record, processor(record.example, index)
    except processors.ProcessorError as e:
        return number, record, e


def _process_chunk(chunk: list) -> list:
    return [_process(_WORKER_PROCESSOR, *item) for item in chunk]


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class DatasetIterator:
    """Yields global batches forever (epochs loop), the same on every host; `state_dict()` is its
    exact position, the same on every host too."""

    def __init__(self, config: ConfigDict, tokenizer: Tokenizer, flag: str = "--train_dataset"):
        source_cls = _source_class(config, flag)
        warn_unused_source_flags(config, flag)
        prefix, group = source_group(config, flag)
        self.seq_length, self.batch_size = group.seq_length, group.batch_size
        self.flag = flag
        self.source = source_cls(group, prefix)
        self.processor = self.source.processor(config.text_processor, tokenizer)
        self.stats: Counter = Counter()
        self.batcher = self.source.batcher(config.separate_segments, tokenizer, self.stats)
        if config.shuffle_buffer < 0:
            raise DataError(f"{flag}.shuffle_buffer={config.shuffle_buffer} must be >= 0 (0: source order)")
        self.shuffle_buffer, self.shuffle_seed = config.shuffle_buffer, config.shuffle_seed
        self.drop_tail = _epoch_tail(config.epoch_tail, source_cls, flag) == "drop"
        self.num_workers = config.num_workers
        self.epoch, self.next_record = 0, 0  # next_record counts records in reading order
        self._batches: Optional[Iterator] = None
        self._pool = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_record": self.next_record, "packer": self.batcher.state_dict(),
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.next_record = state["epoch"], state["next_record"]
        self.batcher.load_state_dict(state["packer"])
        self.stats.clear()
        self.stats.update(state["stats"])  # the batcher holds this Counter too
        self._batches = None

    def __iter__(self) -> "DatasetIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            self._batches = self._generate()
        return next(self._batches)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def _epoch_items(self, start: int) -> Iterator[tuple[int, int, Record]]:
        """(position in reading order, processing seed, record) from position `start`."""
        for position, number, record in shuffling.ordered(self.source.records, start, self.shuffle_buffer,
                                                          self.shuffle_seed, self.epoch):
            # Each epoch code-mixes differently, but identically on every rerun.
            yield position, self.epoch * 2**32 + number, record

    def _processed(self, start: int) -> Iterator:
        items = self._epoch_items(start)
        if self.num_workers <= 0:
            return (_process(self.processor, *item) for item in items)
        if self._pool is None:  # spawn: forking a process that runs JAX threads is unsafe
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.num_workers, initializer=_init_worker, initargs=(self.processor,))
        results = self._pool.imap(_process_chunk, _chunks(items, 64))
        return (r for chunk in results for r in chunk)

    def _generate(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            start, added, batches = self.next_record, 0, 0
            for number, record, result in self._processed(start):
                if isinstance(result, Exception):
                    record = self.source.reject(record, str(result))
                self.next_record = number + 1
                if record.example is None:
                    self.stats["skipped_lines"] += record.bad
                    continue
                added += 1
                self.stats["examples"] += 1
                self.stats.update(result.stats._asdict())
                for batch in self.batcher.add(result):
                    batches += 1
                    yield batch
            if start == 0 and added == 0:
                raise DataError(f"{self.source.flag}: the data set has no examples")
            for batch in self.batcher.end_epoch(self.drop_tail):
                batches += 1
                yield batch
            if start == 0 and batches == 0 and self.drop_tail:  # every epoch would end the same way
                raise DataError(f"{self.source.flag}: one epoch of the data set makes no batch of batch_size x "
                                f"seq_length = {self.batch_size} x {self.seq_length} tokens (plus one), and "
                                f"epoch_tail=drop starts every epoch afresh; use a smaller batch or "
                                f"{self.flag}.epoch_tail=carry")
            self.epoch, self.next_record = self.epoch + 1, 0


def _epoch_tail(name: str, source: type[Source], flag: str) -> str:
    if name not in ("auto", "drop", "carry"):
        raise DataError(f"{flag}.epoch_tail={name!r}: choose auto (the reference's for the source), drop or carry")
    return source.epoch_tail if name == "auto" else name


def _source_class(config: ConfigDict, flag: str) -> type[Source]:
    if config.type not in SOURCES:
        raise DataError(f"{flag}.type={config.type!r}: choose one of {sorted(SOURCES)}")
    return SOURCES[config.type]


def source_group(config: ConfigDict, flag: str = "--train_dataset") -> tuple[str, ConfigDict]:
    """The flag prefix and the settings of the source `config.type` names, e.g.
    (`--train_dataset.json_dataset`, its group); DataError for an unknown type."""
    key = _source_class(config, flag).config_key
    return f"{flag}.{key}", config[key]


def unused_source_flags(config: ConfigDict, flag: str = "--train_dataset") -> list[str]:
    """`--flag.group.key=value` for each value set in a source group that `config.type` does not read
    (a flagfile's `huggingface_dataset.*` under `--train_dataset.type=json`)."""
    used = _source_class(config, flag).config_key
    unused = []
    for cls in SOURCES.values():
        if cls.config_key != used:
            # Leaf by leaf: a nested group (the mixture's components) compares unequal as a whole.
            defaults, group = flatten(cls.default_config()), flatten(config[cls.config_key])
            unused += [f"{flag}.{cls.config_key}.{k}={group[k]}" for k in defaults if group.get(k) != defaults[k]]
    return unused


def warn_unused_source_flags(config: ConfigDict, flag: str = "--train_dataset") -> None:
    unused = unused_source_flags(config, flag)
    if unused:
        prefix, used = source_group(config, flag)
        logging.warning("%s.type=%s reads %s.* (seq_length=%d, batch_size=%d); these flags are for another "
                        "source and are not used: %s. To read a local file with the huggingface source's settings "
                        "(a recipe's flagfile), pass %s.huggingface_dataset.path=FILE instead of changing %s.type",
                        flag, config.type, prefix, used.seq_length, used.batch_size, ", ".join(unused), flag, flag)


def abstract_batch(config: ConfigDict, flag: str = "--train_dataset") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The global batch's (shape, dtype) per array for `config.type`, without opening any data."""
    source = _source_class(config, flag)
    return source.batch_spec(config[source.config_key])


def saved_position(saved: dict, checkpoint: str) -> dict:
    """The data position in a checkpoint's meta, for `DatasetIterator.load_state_dict`.

    Checkpoints hold one global position. Older ones held one per host (`{"0": …, "1": …}`),
    when each host read records `n mod hosts` and packed its own rows: one host's is the global
    position; several hosts' cannot be turned into one, so they are refused rather than half used.
    """
    if "next_record" in saved:
        return saved
    if set(saved) == {"0"}:
        return saved["0"]
    raise DataError(
        f"checkpoint {checkpoint}: its data position was saved per host by {len(saved)} hosts, in the former "
        f"layout where each host read every {len(saved)}-th record into its own rows; no position for all "
        "hosts follows from it, so the run cannot be resumed exactly. To continue from its weights, optimizer "
        "state and step with the data read from the start, run with a new --logger.output_dir and "
        f"--load_checkpoint=trainstate::{checkpoint}")
