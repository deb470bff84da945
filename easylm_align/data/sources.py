"""Where training records come from: local JSON files and Hugging Face data sets.

A source numbers its records in source order and yields them from any record number
(`records(start)`), which is what makes a data position resumable. Each source owns a flag group
(`--train_dataset.json_dataset.*`, `--train_dataset.huggingface_dataset.*`) that also carries
EasyLM's `seq_length` and `batch_size`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import ClassVar, Iterator, NamedTuple, Optional

import numpy as np
from ml_collections import ConfigDict

from easylm_align import records
from easylm_align.data import processors
from easylm_align.data.packing import PackedBatcher
from easylm_align.records import DataError
from easylm_align.tokenizer import ASSETS, Tokenizer

DEMO_CORPUS = ASSETS / "demo_corpus.jsonl"


class Record(NamedTuple):
    example: Optional[dict]  # None: a blank or skipped line (it still takes a record number)
    location: str            # "file:line" or "dataset[index]", for error messages
    bad: bool = False


class Source:
    """Where records come from (`records`), and how they become batches: the processor that turns a
    record into token ids and the batcher that lays those out. The defaults are the text recipes'
    (a `processors` processor, one packed stream); a source with its own layout (AFP's pairs plus
    CLM rows, `pairs.py`) supplies both."""
    name: ClassVar[str]        # `--*.type`
    config_key: ClassVar[str]  # its flag group, e.g. json_dataset
    # What the reference does with the tokens left after an epoch's last full batch
    # (`--*.epoch_tail=auto`): `carry` them into the next epoch (EasyLM's JsonDataset reads its file
    # in an endless loop with one buffer) or `drop` them (its HuggingfaceDataset empties its buffers
    # at the start of every epoch).
    epoch_tail: ClassVar[str] = "carry"

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

    def processor(self, text_config: ConfigDict, tokenizer: Tokenizer) -> processors.TextProcessor:
        return processors.build(text_config, tokenizer)

    def batcher(self, separate_segments: bool, tokenizer: Tokenizer, stats: Counter) -> PackedBatcher:
        return PackedBatcher(self.config.seq_length, self.config.batch_size, separate_segments)

    @staticmethod
    def batch_spec(group: ConfigDict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of each array of a global batch, from the source's config group alone."""
        return PackedBatcher.batch_spec(group)


def file_records(files: list[str], bad_lines: records.BadLines, start: int, kind: str = "") -> Iterator[Record]:
    """The records of local files, numbered across them, from record number `start` (`records.file_records`)."""
    number = 0
    for path in files:
        for row in records.file_records(path, bad_lines, first=max(start - number, 0), keep_blank=True, kind=kind):
            if number >= start:
                yield Record(row.value, row.location, row.bad)
            number += 1


class JsonSource(Source):
    """Local JSON-lines files (one example per line), JSON files holding a list (Alpaca's) or plain
    text files (`.txt`, one `text` record per line), read by `records` under the `on_bad_line`
    policy; every line of a JSON-lines or text file and every list element is one record."""
    name, config_key = "json", "json_dataset"

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
        return file_records(self.files, self.bad_lines, start)

    def reject(self, record: Record, problem: str) -> Record:
        self.bad_lines.check(record.location, problem)
        return Record(None, record.location, bad=True)


class HuggingfaceSource(Source):
    """`datasets.load_dataset(path, name, split=…, streaming=…, data_files=…)`: hub data sets and the
    local cache. Local JSON and text files (`path=FILE` or `DIR`, or `path=json`/`text` with
    `data_files=…`, the seed's route) are read as `JsonSource` reads them, so their records are
    checked the same way and errors name the file and line (the `datasets` loader would turn a
    missing field into null and a number into a string)."""
    name, config_key = "huggingface", "huggingface_dataset"
    epoch_tail = "drop"

    @staticmethod
    def default_config() -> ConfigDict:
        return ConfigDict(dict(path="", name="", split="train", streaming=True, data_files="",
                               seq_length=512, batch_size=8, on_bad_line="error"))

    def __init__(self, config: ConfigDict, flag: str):
        super().__init__(config, flag)
        if not config.path:
            raise DataError(f"{flag}.path is empty")
        data_files = config.data_files or None
        if data_files and not records.matching_files(data_files):
            raise DataError(f"{flag}.data_files={data_files!r} matches no file")
        self.files, self.kind = _local_files(config, flag)
        if Path(config.path).is_dir() and not self.files and not any(Path(config.path).iterdir()):
            raise DataError(f"{flag}.path={config.path!r}: the directory is empty")
        if self.files:
            if config.split != "train":
                raise DataError(f"{flag}.split={config.split!r}: local files have only the 'train' split")
            self.bad_lines = records.BadLines(config.on_bad_line, flag)
            return
        import datasets as hf_datasets  # heavy import, only when used

        try:
            self.dataset = hf_datasets.load_dataset(config.path, config.name or None, split=config.split,
                                                    streaming=config.streaming, data_files=data_files)
        except Exception as e:  # noqa: BLE001 - the datasets library raises many kinds
            raise DataError(f"{flag}: could not load data set path={config.path!r} name={config.name!r} "
                            f"split={config.split!r}: {type(e).__name__}: {e}") from None

    def records(self, start: int) -> Iterator[Record]:
        if self.files:
            yield from file_records(self.files, self.bad_lines, start, self.kind)
            return
        if self.config.streaming:
            data = self.dataset.skip(start) if start else self.dataset
        else:
            data = (self.dataset[i] for i in range(start, len(self.dataset)))
        for i, example in enumerate(data, start):
            yield Record(dict(example), f"{self.config.path}[{i}]")

    def reject(self, record: Record, problem: str) -> Record:
        if not self.files:
            return super().reject(record, problem)
        self.bad_lines.check(record.location, problem)
        return Record(None, record.location, bad=True)


# What the `datasets` library's `json` and `text` loaders read; other local files (CSV, Parquet, a
# saved data set) are left to it.
LOCAL_SUFFIXES = (".json", ".jsonl", ".txt")


def _local_files(config: ConfigDict, flag: str) -> tuple[list[str], str]:
    """(files, kind) when the source is local JSON or text files, else ([], '')."""
    if config.path in ("json", "text") and config.data_files:
        return records.matching_files(config.data_files), config.path
    path = Path(config.path)
    if path.is_file():
        return ([str(path)], "") if path.suffix in LOCAL_SUFFIXES else ([], "")
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES), ""
    if path.suffix in LOCAL_SUFFIXES:  # meant as a file; the hub would answer with a puzzling error
        raise DataError(f"{flag}.path={config.path!r}: no such file")
    return [], ""
