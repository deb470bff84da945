"""`--train_dataset.type=mixture`: several text sources, each with its own processor, drawn by weight.

Flags: `--train_dataset.mixture_dataset.{seq_length,batch_size,seed}` and, for each of up to
`MAX_COMPONENTS` components, `--train_dataset.mixture_dataset.component_K.*`: its `weight` (0 leaves
the slot unused), its source `type` (json or huggingface) with that source's group, and its own
`text_processor`. The mixture's own `--train_dataset.text_processor` is not used.

Draws: the mixture's record n comes from the component that draw n names. Draws are made in blocks of
`BLOCK` = 1000: each block holds exactly each component's share of the block (largest remainders;
ties to the lower index), in an order shuffled from (seed, block). So the realised proportions are
the weights to within 1/BLOCK at every block boundary and the draws are a pure function of
(seed, weights, n). Each component is read as an endless stream of its epochs; its records are
processed with the index (its epoch, its record number), exactly as when it is the only source, so
its code-mixing does not depend on what it is mixed with.

Resume: the pipeline saves the mixture's record number n (with the packer and the statistics);
every component's position follows from the draws before n: its count c of draws is the number of
its records read, i.e. epoch c // L and record c % L of an epoch of L records (L is counted by
reading the component once if the resume lies past its first epoch). So the position of every
component is restored exactly on any number of hosts. A blank or skipped line of a component uses
up its draw.

Each example adds to the statistics `mixture_K_examples` and `mixture_K_tokens` (its tokens as
processed, BOS/EOS included), which the trainer logs as `data/mixture_K_*`.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, NamedTuple, Optional

import numpy as np
from ml_collections import ConfigDict

from easylm_align.codemix import MixStats
from easylm_align.data import processors
from easylm_align.data.sources import HuggingfaceSource, JsonSource, Record, Source
from easylm_align.records import DataError
from easylm_align.tokenizer import Tokenizer

MAX_COMPONENTS = 4
BLOCK = 1000
COMPONENT_SOURCES: dict[str, type[Source]] = {cls.name: cls for cls in (JsonSource, HuggingfaceSource)}

# The per-example statistics: the code-mixing counts plus each component's examples and tokens.
MixtureStats = NamedTuple("MixtureStats", [(f, int) for f in MixStats._fields] + [
    (f"mixture_{k}_{what}", int) for k in range(MAX_COMPONENTS) for what in ("examples", "tokens")])


def component_config() -> ConfigDict:
    cfg = dict(weight=0.0, type="json", text_processor=processors.default_config())
    cfg.update({cls.config_key: cls.default_config() for cls in COMPONENT_SOURCES.values()})
    return ConfigDict(cfg)


def block_counts(weights: np.ndarray) -> np.ndarray:
    """Each component's draws in a block of BLOCK: floor(w·BLOCK), remainders to the largest fractions."""
    share = weights / weights.sum() * BLOCK
    counts = np.floor(share).astype(np.int64)
    order = sorted(range(len(share)), key=lambda k: (-(share[k] - counts[k]), k))
    for k in order[:BLOCK - int(counts.sum())]:
        counts[k] += 1
    return counts


def block_draws(seed: int, block: int, counts: np.ndarray) -> np.ndarray:
    """The components of draws block·BLOCK … block·BLOCK+BLOCK-1."""
    draws = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng([seed, block]).permutation(draws)


class _Component:
    """One component: its source, processor and a reader of its endless stream of epochs."""

    def __init__(self, k: int, config: ConfigDict, flag: str):
        if config.type not in COMPONENT_SOURCES:
            raise DataError(f"{flag}.type={config.type!r}: a mixture component is one of {sorted(COMPONENT_SOURCES)}")
        cls = COMPONENT_SOURCES[config.type]
        self.k, self.config, self.flag = k, config, flag
        self.source = cls(config[cls.config_key], f"{flag}.{cls.config_key}")
        self.epoch_length: Optional[int] = None

    def _count_epoch(self) -> int:
        if self.epoch_length is None:
            self.epoch_length = sum(1 for _ in self.source.records(0))
            if not self.epoch_length:
                raise DataError(f"{self.flag}: the data set has no records")
        return self.epoch_length

    def stream(self, consumed: int) -> Iterator[tuple[int, Record]]:
        """(processing index, record) from the `consumed`-th record of the endless stream on."""
        epoch, start = divmod(consumed, self._count_epoch()) if consumed else (0, 0)
        while True:
            read = 0
            for number, record in enumerate(self.source.records(start), start):
                read += 1
                yield epoch * 2**32 + number, record
            if start == 0:  # a whole epoch was read: its length is known now
                if not read:
                    raise DataError(f"{self.flag}: the data set has no records")
                self.epoch_length = read
            epoch, start = epoch + 1, 0


class MixtureProcessor:
    """Runs the component's own processor and adds the component's counts to the statistics."""

    def __init__(self, processors_: list[Optional[processors.TextProcessor]]):
        self.processors = processors_

    def __call__(self, example: dict, index: int) -> processors.Processed:
        k = example["component"]
        out = self.processors[k](example["example"], example["index"])
        counts = dict(out.stats._asdict(), **{f"mixture_{k}_examples": 1, f"mixture_{k}_tokens": len(out.tokens)})
        return processors.Processed(out.tokens, out.loss_mask, MixtureStats(**{
            f: counts.get(f, 0) for f in MixtureStats._fields}))


class MixtureSource(Source):
    name, config_key = "mixture", "mixture_dataset"

    @staticmethod
    def default_config() -> ConfigDict:
        cfg = dict(seq_length=512, batch_size=8, seed=0)
        cfg.update({f"component_{k}": component_config() for k in range(MAX_COMPONENTS)})
        return ConfigDict(cfg)

    def __init__(self, config: ConfigDict, flag: str):
        super().__init__(config, flag)
        slots = [(k, config[f"component_{k}"]) for k in range(MAX_COMPONENTS)]
        for k, c in slots:
            if c.weight < 0:
                raise DataError(f"{flag}.component_{k}.weight={c.weight} must be >= 0")
        self.components = {k: _Component(k, c, f"{flag}.component_{k}") for k, c in slots if c.weight > 0}
        if not self.components:
            raise DataError(f"{flag}: give at least one component a positive weight "
                            f"({flag}.component_0.weight=..., up to component_{MAX_COMPONENTS - 1})")
        self.weights = np.asarray([config[f"component_{k}"].weight for k in range(MAX_COMPONENTS)], np.float64)
        self.counts = block_counts(self.weights)

    def _draws_before(self, n: int) -> np.ndarray:
        """How many of draws 0 … n-1 each component got."""
        full, rest = divmod(n, BLOCK)
        before = self.counts * full
        if rest:
            before = before + np.bincount(block_draws(self.config.seed, full, self.counts)[:rest],
                                          minlength=MAX_COMPONENTS)
        return before

    def records(self, start: int) -> Iterator[Record]:
        """Endless: the mixture has no epochs of its own (each component loops over its own)."""
        consumed = self._draws_before(start)
        streams = {k: c.stream(int(consumed[k])) for k, c in self.components.items()}
        n = start
        while True:
            block, offset = divmod(n, BLOCK)
            for k in block_draws(self.config.seed, block, self.counts)[offset:]:
                index, record = next(streams[int(k)])
                example = None if record.example is None else {"component": int(k), "index": index,
                                                                "example": record.example}
                yield Record(example, record.location, record.bad)
            n = (block + 1) * BLOCK

    def reject(self, record: Record, problem: str) -> Record:
        component = self.components[record.example["component"]].source
        return component.reject(Record(record.example["example"], record.location, record.bad), problem)

    def processor(self, text_config: ConfigDict, tokenizer: Tokenizer) -> MixtureProcessor:
        del text_config  # each component has its own
        return MixtureProcessor([processors.build(self.config[f"component_{k}"].text_processor, tokenizer)
                                 if k in self.components else None for k in range(MAX_COMPONENTS)])


def component_metrics(stats: Counter) -> dict[str, float]:
    """Each used component's examples and tokens so far, for the trainer's metrics row."""
    return {f"data/{key}": stats[key] for key in MixtureStats._fields if key.startswith("mixture_") and stats[key]}
