"""Data sources and the resumable pipeline: source → text processor → packer → batches.

Sources are registered by name (`--train_dataset.type=json|huggingface|…`); each owns a flag
group (`--train_dataset.json_dataset.path`, `--train_dataset.huggingface_dataset.{path,name,…}`)
that also carries EasyLM's `seq_length` and `batch_size`. Records are numbered in source order.

The layout is the reference's and does not depend on the number of hosts: every host reads and
processes the whole stream identically and builds the same global batch (`batch_size` rows); the
batch placement (`sharding.host_batch_to_global`) puts on each device only its own rows. So the
position (epoch, next record, packer buffer) is global: it is saved once with every checkpoint,
and a run resumed on any number of hosts sees exactly the batches an uninterrupted one would.
Processing can run in `num_workers` processes; order is preserved.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from typing import ClassVar, Iterator, NamedTuple, Optional

import numpy as np
from ml_collections import ConfigDict

from easylm_align import records, text_processors
from easylm_align.packing import Packer
from easylm_align.records import DataError
from easylm_align.tokenizer import ASSETS, Tokenizer

DEMO_CORPUS = ASSETS / "demo_corpus.jsonl"
SOURCES: dict[str, type["Source"]] = {}


class Record(NamedTuple):
    example: Optional[dict]  # None: a blank or skipped line (it still takes a record number)
    location: str            # "file:line" or "dataset[index]", for error messages
    bad: bool = False


def register_source(name: str):
    def wrap(cls):
        cls.name = name
        SOURCES[name] = cls
        return cls
    return wrap


class Source:
    name: ClassVar[str]
    config_key: ClassVar[str]
    # The iterator that turns this source into batches; a source with its own batch layout (AFP's
    # pairs + CLM rows) names its own class with the same interface as DatasetIterator.
    iterator_cls: ClassVar[Optional[type]] = None

    @staticmethod
    def default_config() -> ConfigDict:
        raise NotImplementedError

    def __init__(self, config: ConfigDict, flag: str):
        self.config = config
        self.flag = flag  # e.g. "--train_dataset.json_dataset", for error messages
        for key in ("seq_length", "batch_size"):
            if config[key] < 1:
                raise DataError(f"{flag}.{key}={config[key]} must be positive")

    def records(self, start: int) -> Iterator[Record]:
        """One epoch of records, from record number `start`."""
        raise NotImplementedError

    def reject(self, record: Record, problem: str) -> Record:
        """A record its processor rejected: the skipped record under a skip policy, else DataError."""
        raise DataError(f"{record.location}: {problem}")


@register_source("json")
class JsonSource(Source):
    """Local JSON-lines files (one example per line) or JSON files holding a list (Alpaca's), read by
    `records` under the `on_bad_line` policy; every line of a JSON-lines file and every list element
    is one record."""
    config_key = "json_dataset"

    @staticmethod
    def default_config() -> ConfigDict:
        return ConfigDict(dict(path=str(DEMO_CORPUS), seq_length=128, batch_size=8, on_bad_line="error"))

    def __init__(self, config: ConfigDict, flag: str):
        super().__init__(config, flag)
        self.bad_lines = records.BadLines(config.on_bad_line, flag)
        self.files = records.matching_files(config.path)
        if not self.files:
            raise DataError(f"{flag}.path={config.path!r} matches no file")

    def records(self, start: int) -> Iterator[Record]:
        number = 0
        for path in self.files:
            for row in records.json_records(path, self.bad_lines, first=max(start - number, 0), keep_blank=True):
                if number >= start:
                    yield Record(row.value, row.location, row.bad)
                number += 1

    def reject(self, record: Record, problem: str) -> Record:
        self.bad_lines.check(record.location, problem)
        return Record(None, record.location, bad=True)


@register_source("huggingface")
class HuggingfaceSource(Source):
    """`datasets.load_dataset(path, name, split=…, streaming=…, data_files=…)`: hub data sets, the
    local cache, or local files (`path=json`, `data_files=…/alpaca_data.json`)."""
    config_key = "huggingface_dataset"

    @staticmethod
    def default_config() -> ConfigDict:
        return ConfigDict(dict(path="", name="", split="train", streaming=True, data_files="",
                               seq_length=512, batch_size=8))

    def __init__(self, config: ConfigDict, flag: str):
        super().__init__(config, flag)
        import datasets as hf_datasets  # heavy import, only when used

        if not config.path:
            raise DataError(f"{flag}.path is empty")
        data_files = config.data_files or None
        if data_files and not records.matching_files(data_files):
            raise DataError(f"{flag}.data_files={data_files!r} matches no file")
        try:
            self.dataset = hf_datasets.load_dataset(config.path, config.name or None, split=config.split,
                                                    streaming=config.streaming, data_files=data_files)
        except Exception as e:  # noqa: BLE001 - the datasets library raises many kinds
            raise DataError(f"{flag}: could not load data set path={config.path!r} name={config.name!r} "
                            f"split={config.split!r}: {type(e).__name__}: {e}") from None

    def records(self, start: int) -> Iterator[Record]:
        if self.config.streaming:
            data = self.dataset.skip(start) if start else self.dataset
        else:
            data = (self.dataset[i] for i in range(start, len(self.dataset)))
        for i, example in enumerate(data, start):
            yield Record(dict(example), f"{self.config.path}[{i}]")


def default_config(dataset_type: str = "json") -> ConfigDict:
    """`--train_dataset.*` / `--eval_dataset.*`: source type, one group per source, the processor."""
    # separate_segments: False packs one causal stream per row, as the reference; True keeps packed
    # examples apart (own positions, no attention across them); packing.py says what changes.
    cfg = dict(type=dataset_type, text_processor=text_processors.default_config(),
               separate_segments=False, num_workers=0)
    cfg.update({cls.config_key: cls.default_config() for cls in SOURCES.values()})
    return ConfigDict(cfg)


# ----------------------------------------------------------------------------------------------
# Processing, in this process or in workers
# ----------------------------------------------------------------------------------------------

_WORKER_PROCESSOR: Optional[text_processors.TextProcessor] = None


def _init_worker(processor: text_processors.TextProcessor) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = processor


def _process(processor, number: int, index: int, record: Record):
    if record.example is None:
        return number, record, None
    try:
        return number, record, processor(record.example, index)
    except text_processors.ProcessorError as e:
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
        if config.type not in SOURCES:
            raise DataError(f"{flag}.type={config.type!r}: choose one of {sorted(SOURCES)}")
        source_cls = SOURCES[config.type]
        group = config[source_cls.config_key]
        self.seq_length, self.batch_size = group.seq_length, group.batch_size
        self.source = source_cls(group, f"{flag}.{source_cls.config_key}")
        self.processor = text_processors.build(config.text_processor, tokenizer)
        self.packer = Packer(group.seq_length, group.batch_size, config.separate_segments)
        self.num_workers = config.num_workers
        self.epoch, self.next_record = 0, 0
        self.stats: Counter = Counter()
        self._batches: Optional[Iterator] = None
        self._pool = None

    @staticmethod
    def batch_spec(group: ConfigDict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of each array of a global batch, from the source's config group alone."""
        rows = (group.batch_size, group.seq_length)
        spec = {key: (rows, np.dtype(np.int32)) for key in ("input_tokens", "target_tokens", "segment_ids", "positions")}
        return dict(spec, loss_masks=(rows, np.dtype(np.float32)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_record": self.next_record, "packer": self.packer.state_dict(),
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.next_record = state["epoch"], state["next_record"]
        self.packer.load_state_dict(state["packer"])
        self.stats = Counter(state["stats"])
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
        for number, record in enumerate(self.source.records(start), start):
            # Each epoch code-mixes differently, but identically on every rerun.
            yield number, self.epoch * 2**32 + number, record

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
            start, added = self.next_record, 0
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
                yield from self._batches_from(result)
            if start == 0 and added == 0:
                raise DataError(f"{self.source.flag}: the data set has no examples")
            self.epoch, self.next_record = self.epoch + 1, 0

    def _batches_from(self, result) -> Iterator[dict[str, np.ndarray]]:
        """Takes one processed example; yields the batches it completes (subclasses batch differently)."""
        self.packer.add(result.tokens, result.loss_mask)
        while self.packer.ready():
            yield self.packer.pop()


def build_iterator(config: ConfigDict, tokenizer: Tokenizer, flag: str = "--train_dataset") -> DatasetIterator:
    """The batch iterator for `config.type`: the source's own, or the packing DatasetIterator."""
    if config.type not in SOURCES:
        raise DataError(f"{flag}.type={config.type!r}: choose one of {sorted(SOURCES)}")
    cls = SOURCES[config.type].iterator_cls or DatasetIterator
    return cls(config, tokenizer, flag)


def abstract_batch(config: ConfigDict, flag: str = "--train_dataset") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The global batch's (shape, dtype) per array for `config.type`, without opening any data."""
    if config.type not in SOURCES:
        raise DataError(f"{flag}.type={config.type!r}: choose one of {sorted(SOURCES)}")
    source = SOURCES[config.type]
    return (source.iterator_cls or DatasetIterator).batch_spec(config[source.config_key])


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


# Sources defined in other modules register themselves on import.
from easylm_align import afp_data  # noqa: E402,F401  (afp, codemix_pairs)
