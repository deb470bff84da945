"""Packs tokenized examples into fixed `batch × seq_length` rows.

Examples are concatenated into one stream; a batch takes the next `batch·seq_length + 1` tokens
and row r holds inputs `stream[rS:(r+1)S]` and targets shifted by one (EasyLM's packing, as
COMMIT trains). The last token is kept as the next batch's first input. As in EasyLM, a batch is
made once the stream holds more than `batch·seq_length + 1` tokens: the contents are the same as
with "at least", but which tokens are left when an epoch ends (and dropped, under
`epoch_tail=drop`) is the reference's.

`separate_segments=False` (the default) is the reference's layout: each row is one causal stream,
positions run 0..seq_length-1 and every token attends to all earlier tokens of the row, across
example boundaries (`segment_ids` are all 1). `separate_segments=True` gives every example its own
segment id, positions that restart at 0 and attention within the example only, and drops the
target that crosses into the next example (the previous example's last token predicting the next
one's BOS).

The packer's buffer is part of the dataset position saved in checkpoints.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from easylm_align.errors import ConfigError


class Packer:
    def __init__(self, seq_length: int, batch_size: int, separate_segments: bool = False):
        if seq_length < 1 or batch_size < 1:
            raise ConfigError(f"seq_length={seq_length} and batch_size={batch_size} must be positive")
        self.seq_length = seq_length
        self.batch_size = batch_size
        self.separate_segments = separate_segments
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._segments: list[np.ndarray] = []
        self._size = 0
        self._next_segment = 1

    @property
    def chunk(self) -> int:
        return self.seq_length * self.batch_size

    def add(self, tokens: list[int], loss_mask: list[float]) -> None:
        if not tokens:
            return
        self._tokens.append(np.asarray(tokens, np.int32))
        self._masks.append(np.asarray(loss_mask, np.float32))
        self._segments.append(np.full(len(tokens), self._next_segment, np.int64))
        self._next_segment += 1
        self._size += len(tokens)

    def ready(self) -> bool:
        """EasyLM's `while len(token_buffer) > chunk_size + 1`."""
        return self._size > self.chunk + 1

    def pop(self) -> dict[str, np.ndarray]:
        """The next batch; keeps the last token of the chunk as the start of the next one."""
        assert self._size >= self.chunk + 1
        tokens, masks, segments = (np.concatenate(x) for x in (self._tokens, self._masks, self._segments))
        n, shape = self.chunk, (self.batch_size, self.seq_length)
        inputs, targets = tokens[:n].reshape(shape), tokens[1:n + 1].reshape(shape)
        loss_masks = masks[1:n + 1].reshape(shape)
        in_seg, tgt_seg = segments[:n].reshape(shape), segments[1:n + 1].reshape(shape)
        if self.separate_segments:
            loss_masks = loss_masks * (in_seg == tgt_seg)  # never predict the next example's start
            segment_ids, positions = _row_segments(in_seg)
        else:
            segment_ids = np.ones(shape, np.int32)
            positions = np.broadcast_to(np.arange(self.seq_length, dtype=np.int32), shape).copy()
        self._tokens, self._masks, self._segments = [tokens[n:]], [masks[n:]], [segments[n:]]
        self._size -= n
        return dict(input_tokens=inputs, target_tokens=targets, loss_masks=loss_masks.astype(np.float32),
                    segment_ids=segment_ids, positions=positions)

    def state_dict(self) -> dict:
        if not self._tokens:
            return {"tokens": [], "loss_mask": [], "segments": [], "next_segment": self._next_segment}
        return {"tokens": np.concatenate(self._tokens).tolist(), "loss_mask": np.concatenate(self._masks).tolist(),
                "segments": np.concatenate(self._segments).tolist(), "next_segment": self._next_segment}

    def load_state_dict(self, state: dict) -> None:
        self._tokens = [np.asarray(state["tokens"], np.int32)]
        self._masks = [np.asarray(state["loss_mask"], np.float32)]
        self._segments = [np.asarray(state["segments"], np.int64)]
        self._size = len(state["tokens"])
        self._next_segment = state["next_segment"]


def _row_segments(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumbers segments 1.. within each row; positions count from each segment's first token."""
    rows, cols = seg.shape
    starts = np.ones_like(seg, dtype=bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
    index = np.broadcast_to(np.arange(cols), seg.shape)
    start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return segment_ids, (index - start_index).astype(np.int32)


class PackedBatcher:
    """The default batch layout: processed examples packed into one stream (`Packer`)."""

    def __init__(self, seq_length: int, batch_size: int, separate_segments: bool = False):
        self.packer = Packer(seq_length, batch_size, separate_segments)

    @staticmethod
    def batch_spec(group) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of each array of a global batch, from the source's config group alone."""
        rows = (group.batch_size, group.seq_length)
        spec = {key: (rows, np.dtype(np.int32)) for key in ("input_tokens", "target_tokens", "segment_ids", "positions")}
        return dict(spec, loss_masks=(rows, np.dtype(np.float32)))

    def add(self, example) -> Iterator[dict[str, np.ndarray]]:
        """Takes one processed example (tokens, loss_mask); yields the batches it completes."""
        self.packer.add(example.tokens, example.loss_mask)
        yield from self._ready_batches()

    def end_epoch(self, drop_tail: bool) -> Iterator[dict[str, np.ndarray]]:
        """At the end of an epoch: the batches still held (a run resumed between two batches of one
        example holds them), then, with `drop_tail`, an empty stream for the next epoch."""
        yield from self._ready_batches()
        if drop_tail:
            p = self.packer
            self.packer = Packer(p.seq_length, p.batch_size, p.separate_segments)

    def _ready_batches(self) -> Iterator[dict[str, np.ndarray]]:
        while self.packer.ready():
            yield self.packer.pop()

    def state_dict(self) -> dict:
        return self.packer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.packer.load_state_dict(state)
