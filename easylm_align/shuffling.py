"""The order records are read in: in source order (EasyLM's, the default) or shuffled.

`--train_dataset.shuffle_buffer=N` shuffles within windows of N records: window w holds records
[wN, (w+1)N) and is visited in a permutation drawn from (seed, epoch, w). That is a shuffle buffer
whose state is a single number, the position in the shuffled order, so a run resumes exactly
from a checkpoint on any number of hosts; and it works on streaming data sets, which have no
length. With N at least the data set's size every epoch is one full permutation, as the random
sampler of AFP's reference; each epoch draws a new one. N = 0 keeps the source order.
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


def window_permutation(seed: int, epoch: int, window: int, size: int) -> np.ndarray:
    """The order of the `size` records of window `window` in `epoch` (a permutation of 0..size-1)."""
    return np.random.default_rng([seed, epoch, window]).permutation(size)


def ordered(read_from: Callable[[int], Iterator[T]], start: int, buffer: int, seed: int,
            epoch: int) -> Iterator[tuple[int, int, T]]:
    """(position, record number, record) for one epoch, from shuffled position `start` on.

    `read_from(n)` yields the source's records in source order from record number n. The position
    counts records in the shuffled order (what a checkpoint saves); the record number is the
    record's place in the source (what seeds its processing, so an example is code-mixed the same
    way wherever the shuffle puts it).
    """
    if buffer <= 0:
        yield from ((number, number, record) for number, record in enumerate(read_from(start), start))
        return
    window, offset = divmod(start, buffer)
    while True:
        first = window * buffer
        records = []
        for record in read_from(first):
            records.append(record)
            if len(records) == buffer:
                break
        if not records:
            return
        order = window_permutation(seed, epoch, window, len(records))
        for i in range(offset, len(records)):
            yield first + i, first + int(order[i]), records[order[i]]
        if len(records) < buffer:
            return
        window, offset = window + 1, 0
