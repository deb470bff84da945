"""Pair sources for contrastive alignment: per step, sentence pairs plus a causal-LM batch.

Two source types share one batch layout (`PairBatcher`, which the pipeline's iterator uses):

* `afp` — AFP's training files (`tools/generate_afp_data.py`): JSON lines with `sent0`, `sent1`,
  `clm_text`, `clm_prompt_len` and optionally `hard_neg` (a third sentence, used as a hard
  negative when the data set's first example has it; then every example must). A `.tsv` file
  of `sent0<TAB>sent1[<TAB>hard_neg]` rows works too, with AFP's fallback CLM text
  `"{sent0} = {sent1}"` (prompt `"{sent0} = "`).
* `codemix_pairs` (an extension, not AFP's method; docs/AFP.md) — any text, JSON lines with a
  `text` field or a plain text file with one sentence per line; each sentence is paired with its
  COMMIT code-mixed version (`--*.text_processor.codemix_dict_path/ratio/seed`) and the CLM
  side trains on the code-mixed text.

Every step takes `batch_size` examples and yields, with that leading dimension:

* `cl_tokens`, `cl_masks` (batch, 2 or 3, pair_length), int32: the sentences, BOS-prefixed as the
  tokenizer flags say, never EOS (as AFP's Hugging Face tokenizers encode them), truncated and
  right-padded to `pair_length`; the mask is 1 on real tokens;
* `input_tokens`, `target_tokens`, `loss_masks`, `segment_ids`, `positions` (batch, seq_length):
  the same examples' CLM texts (AFP's `clm_block_size` is `seq_length`), laid out by
  `--*.clm_layout`:

  - `blocks` (AFP's `clm_tokens_block`, the default of `afp`): each text is BOS + tokens, no EOS,
    cut to `seq_length` tokens (AFP's `max_seq_length`, which its scripts set to the block size);
    the step's texts are concatenated and cut into `seq_length`-token blocks, the remainder
    dropped (`data/clm_tokens_dropped`) unless there is less than one block, which is then one
    short row. Targets are the output tokens and every BOS or EOS id, so each later text's BOS is
    predicted from the text before it; a block without any target gets its last token as one
    (AFP's guard against a NaN loss). The blocks fill the first rows; the other rows are padding.
    With `clm_groups=W` the step's examples are cut into W equal groups, each grouped into blocks
    alone and given batch/W rows: the CLM rows of a W-rank data-parallel AFP run (docs/AFP.md).
  - `rows` (this project's earlier layout): BOS + tokens + EOS as the tokenizer flags say, packed
    by `packing.Packer` into `batch` rows; what does not fit is dropped, a short step is padded
    with segment 0; only output tokens and EOS are targets, never BOS.

  Either way the CLM rows hold exactly this step's examples and packed texts attend to each
  other, as in AFP (`--*.separate_segments=True` keeps them apart).

The position in the stream is the pipeline's (epoch, next record), global as there (every host
builds the whole batch), so runs resume exactly, on any number of hosts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
from ml_collections import ConfigDict

from easylm_align import records
from easylm_align.codemix import MixStats
from easylm_align.data import processors
from easylm_align.data.packing import PackedBatcher, Packer
from easylm_align.data.processors import ProcessorError, get_field
from easylm_align.data.sources import DEMO_CORPUS, JsonSource, Record
from easylm_align.records import DataError
from easylm_align.tokenizer import ASSETS, Tokenizer, split_tokens

AFP_SAMPLE = ASSETS / "afp_sample.jsonl"
HARD_NEGATIVE = "hard_neg"
CLM_LAYOUTS = ("blocks", "rows")


class PairExample(NamedTuple):
    """One processed example: a `processors.Processed` (the CLM side) plus its sentences."""
    tokens: list[int]
    loss_mask: list[float]
    stats: MixStats
    sentences: list[list[int]]  # sent0, sent1[, hard_neg], each at most pair_length tokens
    truncated: int              # how many sentences were cut to pair_length


class PairProcessor(processors.TextProcessor):
    """Example → `PairExample`. Subclasses choose the texts (`texts`); tokenization is shared.

    The code-mix settings are the text processor's (`--*.text_processor.codemix_*`).
    """

    def __init__(self, config: ConfigDict, tokenizer: Tokenizer, pair_length: int, num_sentences: int = 2,
                 clm_layout: str = "rows", seq_length: int = 0):
        super().__init__(config, tokenizer)
        self.pair_length, self.num_sentences = pair_length, num_sentences
        if clm_layout == "blocks" and seq_length < 1:
            raise DataError(f"clm_layout='blocks' cuts each CLM text to seq_length, got {seq_length}")
        self.clm_layout, self.seq_length = clm_layout, seq_length

    def texts(self, example: dict, index: int) -> tuple[list[str], str, int, MixStats]:
        """(sentences, CLM text, its prompt length in characters, code-mix stats)."""
        raise NotImplementedError

    def __call__(self, example: dict, index: int) -> PairExample:
        sentences, clm_text, prompt_chars, stats = self.texts(example, index)
        bos = [self.tokenizer.bos_id] if self.tokenizer.add_bos_token else []
        eos = [self.tokenizer.eos_id] if self.tokenizer.add_eos_token else []
        encoded = [bos + ids for ids in self.tokenizer.encode_batch(sentences)]
        ids, n_prompt = split_tokens(self.tokenizer, clm_text, prompt_chars)
        if self.clm_layout == "blocks":
            tokens, mask = self._block_text(bos + ids, len(bos) + n_prompt)
        else:
            tokens = bos + ids + eos
            mask = [0.0] * (len(bos) + n_prompt) + [1.0] * (len(ids) - n_prompt + len(eos))
        truncated = sum(len(s) > self.pair_length for s in encoded)
        return PairExample(tokens, mask, stats, [s[:self.pair_length] for s in encoded], truncated)

    def _block_text(self, tokens: list[int], n_prompt: int) -> tuple[list[int], list[float]]:
        """AFP's CLM text: no EOS, cut to seq_length; the prompt is masked, but any BOS or EOS id is a
        target ("do not mask bos and eos"), so the text's own BOS is one once it follows another text."""
        tokens = tokens[:self.seq_length]
        special = (self.tokenizer.bos_id, self.tokenizer.eos_id)
        return tokens, [float(i >= n_prompt or t in special) for i, t in enumerate(tokens)]


def _sentence(example: dict, name: str) -> str:
    text = get_field(example, name)
    if not text.strip():
        raise ProcessorError(f"field {name!r} is empty")
    return text


class AfpProcessor(PairProcessor):
    """AFP's fields. With a code-mix dictionary, the CLM prompt and output are mixed (the pairs never)."""

    def texts(self, example: dict, index: int) -> tuple[list[str], str, int, MixStats]:
        names = ["sent0", "sent1"] + [HARD_NEGATIVE] * (self.num_sentences == 3)
        if self.num_sentences == 2 and HARD_NEGATIVE in example:
            raise ProcessorError(f"example has {HARD_NEGATIVE!r} but the data set's first example has not; "
                                 "give it to every example or to none")
        sentences = [_sentence(example, name) for name in names]
        clm_text = get_field(example, "clm_text")
        if "clm_prompt_len" not in example:
            raise ProcessorError(f"example has no field 'clm_prompt_len' (it has {sorted(example)})")
        prompt_chars = example["clm_prompt_len"]
        if not isinstance(prompt_chars, int) or isinstance(prompt_chars, bool) or prompt_chars < 0:
            raise ProcessorError(f"clm_prompt_len must be a non-negative integer, got {prompt_chars!r}")
        if prompt_chars > len(clm_text):
            raise ProcessorError(f"clm_prompt_len={prompt_chars} is longer than clm_text "
                                 f"({len(clm_text)} characters)")
        (prompt, output), stats = self.mix([clm_text[:prompt_chars], clm_text[prompt_chars:]], index)
        return sentences, prompt + output, len(prompt), stats


class CodemixPairProcessor(PairProcessor):
    """A sentence and its code-mixed version; the CLM text is the mixed one, all of it a target."""

    def __init__(self, config: ConfigDict, tokenizer: Tokenizer, pair_length: int, text_field: str,
                 clm_layout: str = "rows", seq_length: int = 0):
        super().__init__(config, tokenizer, pair_length, clm_layout=clm_layout, seq_length=seq_length)
        if self.mixer is None:
            raise DataError("codemix_pairs needs a dictionary: set --train_dataset.text_processor.codemix_dict_path "
                            "(and codemix_ratio)")
        self.text_field = text_field

    def texts(self, example: dict, index: int) -> tuple[list[str], str, int, MixStats]:
        text = _sentence(example, self.text_field)
        (mixed,), stats = self.mix([text], index)
        return [text, mixed], mixed, 0, stats


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------

class PairSource(JsonSource):
    """A source of pair examples: JSON files as JsonSource reads them, files of another format (by
    suffix) line by line; it builds the processor that turns its examples into `PairExample`s."""

    num_sentences = 2  # per example: sent0, sent1 (AFP adds a hard negative when its data has one)

    def __init__(self, config: ConfigDict, flag: str):
        super().__init__(config, flag)
        if config.pair_length < 1:
            raise DataError(f"{flag}.pair_length={config.pair_length} must be positive")
        if len({self.is_json(f) for f in self.files}) > 1:
            raise DataError(f"{flag}.path={config.path!r} mixes JSON and other files; use one format")
        if config.clm_layout not in CLM_LAYOUTS:
            raise DataError(f"{flag}.clm_layout={config.clm_layout!r}: use one of {CLM_LAYOUTS}")
        if config.clm_groups < 1 or config.batch_size % config.clm_groups:
            raise DataError(f"{flag}.clm_groups={config.clm_groups} must be positive and divide "
                            f"batch_size={config.batch_size}")
        if config.clm_groups > 1 and config.clm_layout != "blocks":
            raise DataError(f"{flag}.clm_groups={config.clm_groups} needs clm_layout='blocks'")

    def is_json(self, path: str) -> bool:
        raise NotImplementedError

    def text_record(self, fields: list[str]) -> dict:
        """The example of one non-blank line of a non-JSON file, split at tabs."""
        raise NotImplementedError

    # A line of a non-JSON file must have one of these numbers of tab-separated fields (None: any).
    num_fields: Optional[tuple[int, ...]] = None
    field_names = ""

    def records(self, start: int) -> Iterator[Record]:
        if self.is_json(self.files[0]):
            yield from super().records(start)
            return
        number = 0
        for path in self.files:
            for row in records.tsv_rows(path, self.bad_lines, self.num_fields, self.field_names, keep_blank=True):
                if number >= start:
                    example = None if row.value is None else self.text_record(row.value)
                    yield Record(example, row.location, row.bad)
                number += 1

    def processor(self, text_config: ConfigDict, tokenizer: Tokenizer) -> PairProcessor:
        raise NotImplementedError

    def batcher(self, separate_segments: bool, tokenizer: Tokenizer, stats: Counter) -> "PairBatcher":
        return PairBatcher(self.config, separate_segments, tokenizer.pad_id, self.num_sentences, stats)

    @staticmethod
    def batch_spec(group: ConfigDict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return PairBatcher.batch_spec(group)


class PairBatcher:
    """Batches of `batch_size` examples: their sentence pairs, and CLM rows packed from those
    examples alone (module docstring). Between batches nothing is pending, so its position is its
    (empty) packer's."""

    def __init__(self, group: ConfigDict, separate_segments: bool, pad_id: int, num_sentences: int,
                 stats: Counter):
        self.packer = Packer(group.seq_length, group.batch_size, separate_segments)
        self.pad_id, self.num_sentences, self.pair_length = pad_id, num_sentences, group.pair_length
        self.clm_layout, self.clm_groups = group.clm_layout, group.clm_groups
        self.stats = stats
        self._pending: list[PairExample] = []

    @staticmethod
    def batch_spec(group: ConfigDict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """The CLM rows plus the sentence pairs (two sentences: hard negatives are known only from the data)."""
        pairs = (group.batch_size, 2, group.pair_length)
        return dict(PackedBatcher.batch_spec(group), cl_tokens=(pairs, np.dtype(np.int32)),
                    cl_masks=(pairs, np.dtype(np.int32)))

    def add(self, example: PairExample) -> Iterator[dict[str, np.ndarray]]:
        self._pending.append(example)
        self.stats["truncated_sentences"] += example.truncated
        if len(self._pending) == self.packer.batch_size:
            yield self._pop()

    def end_epoch(self, drop_tail: bool) -> Iterator[dict[str, np.ndarray]]:
        """With `drop_tail` the examples short of a batch at the end of an epoch are dropped; else
        they start the next epoch's first batch."""
        if drop_tail:
            self._pending = []
        return iter(())

    def state_dict(self) -> dict:
        return self.packer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.packer.load_state_dict(state)

    def _pop(self) -> dict[str, np.ndarray]:
        examples, self._pending = self._pending, []
        shape = (len(examples), self.num_sentences, self.pair_length)
        cl_tokens, cl_masks = np.full(shape, self.pad_id, np.int32), np.zeros(shape, np.int32)
        for row, example in enumerate(examples):
            for col, ids in enumerate(example.sentences):
                cl_tokens[row, col, :len(ids)] = ids
                cl_masks[row, col, :len(ids)] = 1
        if self.clm_layout == "blocks":
            clm = self._blocks(examples)
        else:
            clm = self._rows(examples)
        return dict(clm, cl_tokens=cl_tokens, cl_masks=cl_masks)

    def _blocks(self, examples: list[PairExample]) -> dict[str, np.ndarray]:
        """AFP's block grouping (module docstring), per group of examples, into that group's rows."""
        length, rows = self.packer.seq_length, len(examples) // self.clm_groups
        shape = (len(examples), length)
        batch = {key: np.zeros(shape, np.int32) for key in ("input_tokens", "target_tokens", "segment_ids",
                                                            "positions")}
        batch["input_tokens"][:], batch["target_tokens"][:] = self.pad_id, self.pad_id
        batch["loss_masks"] = np.zeros(shape, np.float32)
        for group in range(self.clm_groups):
            chosen = examples[group * rows:(group + 1) * rows]
            tokens = np.concatenate([np.asarray(e.tokens, np.int64) for e in chosen])
            labels = np.concatenate([np.asarray(e.loss_mask, np.float32) for e in chosen])
            starts = np.zeros(len(tokens) + 1, bool)  # one spare slot: a text may be empty
            starts[np.cumsum([0] + [len(e.tokens) for e in chosen[:-1]])] = True
            starts = starts[:-1]
            total = len(tokens) if len(tokens) < length else len(tokens) // length * length
            self.stats["clm_tokens_dropped"] += len(tokens) - total
            for block, begin in enumerate(range(0, total, length)):
                end = min(begin + length, total)
                self._fill(batch, group * rows + block, tokens[begin:end], labels[begin:end], starts[begin:end])
        return batch

    def _fill(self, batch: dict, row: int, tokens: np.ndarray, labels: np.ndarray, starts: np.ndarray) -> None:
        """One block: inputs, the next token as target where its label is set (the block's first
        label predicts nothing, as Hugging Face's shift drops it), a fake last target if none."""
        n = len(tokens)
        targets = labels[1:].copy()
        if n > 1 and not targets.any():
            targets[-1] = 1.0
        batch["input_tokens"][row, :n] = tokens
        batch["target_tokens"][row, :n - 1] = tokens[1:]
        batch["loss_masks"][row, :n - 1] = targets
        if self.packer.separate_segments:  # each text its own segment, positions from its start
            segments = np.cumsum(starts) + (not starts[0])
            first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
            batch["segment_ids"][row, :n] = segments
            batch["positions"][row, :n] = np.arange(n) - first
            batch["loss_masks"][row, :n - 1] *= segments[1:] == segments[:-1]
        else:
            batch["segment_ids"][row, :n] = 1
            batch["positions"][row, :n] = np.arange(n)

    def _rows(self, examples: list[PairExample]) -> dict[str, np.ndarray]:
        """This project's earlier layout: the texts packed into `batch_size` rows by a fresh Packer."""
        real = 0
        for example in examples:
            self.packer.add(example.tokens, example.loss_mask)
            real += len(example.tokens)
        missing = self.packer.chunk + 1 - real  # pop() takes one token beyond the chunk (the last target)
        if missing > 0:
            self.packer.add([self.pad_id] * missing, [0.0] * missing)
        else:
            self.stats["clm_tokens_dropped"] += -missing
        batch = self.packer.pop()
        padding = np.arange(self.packer.chunk).reshape(batch["segment_ids"].shape) >= real
        batch["segment_ids"][padding] = 0
        batch["positions"][padding] = 0
        # A fresh packer: the rest of this step's CLM text is dropped, not carried over (AFP's rule),
        # so the CLM rows stay in step with the pairs and the packer is empty between batches.
        self.packer = Packer(self.packer.seq_length, self.packer.batch_size, self.packer.separate_segments)
        return batch


class AfpSource(PairSource):
    """AFP JSON lines (or `sent0<TAB>sent1[<TAB>hard_neg]` TSV); see the module docstring."""
    name, config_key = "afp", "afp_dataset"

    @staticmethod
    def default_config() -> ConfigDict:
        # clm_layout: "blocks" (AFP's CLM block grouping) or "rows" (packed rows, BOS never a target);
        # clm_groups: W groups each grouped alone, as each rank of a W-rank AFP run does.
        return ConfigDict(dict(path=str(AFP_SAMPLE), seq_length=512, batch_size=8, pair_length=128,
                               on_bad_line="error", clm_layout="blocks", clm_groups=1))

    def __init__(self, config: ConfigDict, flag: str):
        super().__init__(config, flag)
        self.num_sentences = 3 if HARD_NEGATIVE in (self._first_example() or {}) else 2

    def _first_example(self) -> Optional[dict]:
        records = self.records(0)
        try:
            return next((r.example for r in records if r.example is not None), None)
        finally:
            records.close()

    def is_json(self, path: str) -> bool:
        return not path.endswith(".tsv")

    num_fields = (2, 3)
    field_names = "sent0, sent1[, hard_neg]"

    def text_record(self, fields: list[str]) -> dict:
        example = dict(zip(("sent0", "sent1", HARD_NEGATIVE), fields))
        prompt = f"{fields[0]} = "
        return dict(example, clm_text=prompt + fields[1], clm_prompt_len=len(prompt))

    def processor(self, text_config: ConfigDict, tokenizer: Tokenizer) -> PairProcessor:
        return AfpProcessor(text_config, tokenizer, self.config.pair_length, self.num_sentences,
                            self.config.clm_layout, self.config.seq_length)


class CodemixPairsSource(PairSource):
    """Any text paired with its code-mixed version: `.json`/`.jsonl` files (field `text_field`) or
    plain text, one sentence per line."""
    name, config_key = "codemix_pairs", "codemix_pairs_dataset"

    @staticmethod
    def default_config() -> ConfigDict:
        return ConfigDict(dict(path=str(DEMO_CORPUS), text_field="text", seq_length=512, batch_size=8,
                               pair_length=128, on_bad_line="error", clm_layout="rows", clm_groups=1))

    def is_json(self, path: str) -> bool:
        return Path(path).suffix in (".json", ".jsonl")

    def text_record(self, fields: list[str]) -> dict:
        return {self.config.text_field: "\t".join(fields)}

    def processor(self, text_config: ConfigDict, tokenizer: Tokenizer) -> PairProcessor:
        return CodemixPairProcessor(text_config, tokenizer, self.config.pair_length, self.config.text_field,
                                    self.config.clm_layout, self.config.seq_length)
