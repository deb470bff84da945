"""MUSE bilingual dictionaries and the word-level code-mixer of COMMIT.

COMMIT (Lee, Jung and Hwang, NAACL 2024 Findings) swaps words of the training text for
dictionary translations with probability ``codemix_ratio``. By default this module applies the
original EasyLM-based implementation's rule (thnkinbtfly/COMMIT ``EasyLM/data.py``), so that
``codemix_ratio`` means what it meant there:

* **Words.** A text is split on ``' '`` only and rejoined with ``' '``. A piece glued to a
  newline or tab (``"task.\\n\\nWrite"``) is one word.
* **Skip characters.** Leading and trailing *skip characters* are kept in place and only the
  core between them is looked up. Skip characters are the reference's: whitespace (``' '``,
  ``\\t``, ``\\n``, ``\\r`` and Unicode ``Zs``) and punctuation (ASCII ``!``–``/``, ``:``–``@``,
  ``[``–`````, ``{``–``~``, and Unicode ``P*``). So ``"response.\\n\\n###"`` has the core
  ``"response"``, while ``"task.\\n\\nWrite"`` keeps ``"task.\\n\\nWrite"`` as its core and never
  matches. Inner punctuation (``don't``, ``well-known``) stays part of the core; a piece made
  only of skip characters (or empty) is not a word and is left alone.
* **Lookup.** Exact and case-sensitive: MUSE entries are lowercase, so ``"The"`` is not mixed.
* **Choice.** A replaced word gets a uniformly chosen translation from the dictionary's list,
  duplicates included (:func:`load_muse_dictionary` keeps duplicate pairs, as the reference's
  loader does; the shipped ``dicts/`` have none). Pairs whose translation equals the source
  (MUSE has many, e.g. names) are kept, and a replacement by one still counts as a replacement.

Two improvements are flags, off by default because they change how many words are mixed:

* ``lowercase_fallback`` (``--*.text_processor.codemix_lowercase_fallback``): look the core up
  exactly, then in lowercase, so sentence-initial and capitalised words are mixed too.
* ``whitespace_split`` (``--*.text_processor.codemix_whitespace_split``): split on any whitespace
  run (newlines, tabs, runs of spaces, Unicode spaces) and keep every run exactly, so a word
  next to a newline is looked up like any other.

One difference is not a flag, because it changes which words are drawn but not the
distribution: **randomness.** The original draws from the process-global :mod:`random` state,
so a resumed run or another worker mixes differently. Here each example gets its own generator
seeded by ``(seed, index)``; one uniform draw ``u`` per dictionary word decides both whether to
replace (``u < ratio``) and which translation (``u / ratio`` is uniform in ``[0, 1)`` given a
replacement).
"""

from __future__ import annotations

import os
import random
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from itertools import compress
from pathlib import Path
from typing import NamedTuple

from easylm_align import records
from easylm_align.errors import ConfigError
from easylm_align.records import DataError

__all__ = [
    "CodeMixer",
    "CoverageCheck",
    "DictionaryError",
    "MixStats",
    "load_muse_dictionary",
]


class DictionaryError(DataError):
    """A bilingual dictionary file is missing, unreadable, malformed or empty."""


# Keyed by (resolved path, mtime, size) so an edited file is read again.
_DICTIONARY_CACHE: dict[tuple[str, int, int], dict[str, tuple[str, ...]]] = {}


def load_muse_dictionary(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """Reads a MUSE dictionary: one ``source translation`` pair per line (space or tab).

    Returns source word -> its translations in file order. A pair listed twice is kept twice,
    as the reference's loader does, so it is twice as likely to be chosen. Blank lines and
    lines starting with ``#`` are skipped (the MUSE files contain a few pairs such as
    ``#aaa #aaa``; a leading ``#`` is a skip character, so those could never match anyway).
    Any other line (one word, three, a byte that is not UTF-8) is an error naming the file and
    line: a dictionary with such lines is most likely not a MUSE dictionary at all, so nothing is
    skipped. The result is cached per file and shared: treat it as read-only.
    """
    resolved = os.path.realpath(path)
    if not os.path.isfile(resolved):
        raise DictionaryError(f"{path}: dictionary file not found")
    stat = os.stat(resolved)
    key = (resolved, stat.st_mtime_ns, stat.st_size)
    if key in _DICTIONARY_CACHE:
        return _DICTIONARY_CACHE[key]
    pairs: dict[str, list[str]] = {}
    for lineno, line in records.lines(resolved):
        columns = line.split()
        if not columns or columns[0].startswith("#"):
            continue
        problem = records.not_utf8(line) or (
            "" if len(columns) == 2 else f"expected two columns 'source translation' separated by a space "
                                         f"or a tab, got {len(columns)}: {line.strip()[:80]!r}")
        if problem:
            raise DictionaryError(f"{path}:{lineno}: {problem}")
        source, target = columns
        pairs.setdefault(source, []).append(target)
    if not pairs:
        raise DictionaryError(f"{path}: dictionary is empty (no 'source translation' pairs)")

    dictionary = {source: tuple(targets) for source, targets in pairs.items()}
    _DICTIONARY_CACHE[key] = dictionary
    return dictionary


class MixStats(NamedTuple):
    """Word counts of one or more mixed texts; ``+`` (and ``sum``) add them field by field."""

    # Words as the active split defines them (pieces between ' ', or between whitespace runs
    # with whitespace_split) that have at least one character that is not a skip character.
    words_seen: int = 0
    words_in_dict: int = 0
    words_replaced: int = 0

    def __add__(self, other: tuple) -> MixStats:  # type: ignore[override]
        return MixStats(*(a + b for a, b in zip(self, other, strict=True)))

    def __radd__(self, other: object) -> MixStats:
        # Lets the builtin sum() start from its default 0.
        if other == 0:
            return self
        return NotImplemented

    @property
    def replaced_ratio(self) -> float:
        """Replaced / in-dictionary words: the realised code-mixing ratio (0 when none)."""
        return self.words_replaced / self.words_in_dict if self.words_in_dict else 0.0


class CoverageCheck:
    """Catches a dictionary in the wrong direction (``hi-en.txt`` on English text, an easy slip
    since COMMIT's two stages use opposite directions): once the first ``words`` words of a run's
    data are mixed, it prints the share found in the dictionary, and raises DictionaryError if it
    is below ``min_coverage`` (naming the reversed file when it exists). Counts one process's
    examples (each data worker checks its own)."""

    def __init__(self, path: str | os.PathLike, min_coverage: float, words: int = 1000):
        if not 0.0 <= float(min_coverage) <= 1.0:
            raise ConfigError(f"--*.text_processor.codemix_min_coverage={min_coverage!r}: must be in [0, 1]")
        self.path, self.min_coverage, self.words = str(path), float(min_coverage), words
        self.seen = self.found = 0
        self.done = False

    def add(self, stats: MixStats) -> None:
        if self.done:
            return
        self.seen += stats.words_seen
        self.found += stats.words_in_dict
        if self.seen < self.words:
            return
        self.done = True
        coverage = self.found / self.seen
        summary = f"{self.found} of the first {self.seen} words of the data ({coverage:.1%})"
        if coverage < self.min_coverage:
            raise DictionaryError(
                f"--*.text_processor.codemix_dict_path={self.path}: only {summary} are in the dictionary "
                f"(--*.text_processor.codemix_min_coverage={self.min_coverage:g}); {self._hint()}")
        print(f"codemix: {summary} are in {self.path}", flush=True)

    def _hint(self) -> str:
        """The reversed dictionary (`hi-en.txt` for `en-hi.txt`) if it exists."""
        path = Path(self.path)
        match = re.fullmatch(r"([^-.]+)-([^-.]+)(\..*)?", path.name)
        if match:
            reversed_path = path.with_name(f"{match[2]}-{match[1]}{match[3] or ''}")
            if reversed_path.is_file():
                return (f"is it in the wrong direction? {reversed_path} maps {match[2]} to {match[1]} "
                        "(the source language must be the data's)")
        return ("is it the dictionary for this data's language (source words on the left)? Set "
                "--*.text_processor.codemix_min_coverage=0 to train anyway")


_WHITESPACE_SPLIT = re.compile(r"(\s+)").split

# Memo entries for words that cannot be replaced; both are falsy, unlike a tuple of
# replacements, so `compress` can pick the replaceable words at C speed.
_NO_CORE = False  # the piece is only skip characters (or empty)
_NOT_IN_DICT: tuple[str, ...] = ()

# Bounds the per-mixer memo of analysed surface forms on open-ended corpora (Wikipedia).
_MEMO_LIMIT = 1 << 20

# The reference's ASCII skip characters: its four whitespace characters and code points
# 33-47, 58-64, 91-96 and 123-126, which are exactly string.punctuation.
_ASCII_SKIP = frozenset(" \t\n\r" + string.punctuation)


def _is_skip(char: str) -> bool:
    """The reference's skip character: whitespace (incl. Unicode Zs) or punctuation."""
    if char < "\x80":
        return char in _ASCII_SKIP
    category = unicodedata.category(char)
    return category == "Zs" or category[0] == "P"


class CodeMixer:
    """Replaces dictionary words with random translations, reproducibly per example.

    Args:
        dictionary: source word -> translations (see :func:`load_muse_dictionary`).
        ratio: probability that a word found in the dictionary is replaced (``codemix_ratio``).
        seed: combined with each example's index to seed that example's generator.
        lowercase_fallback: also look a word up in lowercase when its exact form is missing
            (the reference looks up the exact form only).
        whitespace_split: words are separated by any whitespace run, kept exactly (the
            reference splits on ``' '`` only).
    """

    def __init__(
        self,
        dictionary: Mapping[str, Sequence[str]],
        ratio: float,
        seed: int = 0,
        *,
        lowercase_fallback: bool = False,
        whitespace_split: bool = False,
    ):
        if not 0.0 <= float(ratio) <= 1.0:  # also rejects NaN
            raise ConfigError(f"codemix_ratio must be in [0, 1], got {ratio!r}")
        self.dictionary = dictionary
        self.ratio = float(ratio)
        self.seed = int(seed)
        self.lowercase_fallback = bool(lowercase_fallback)
        self.whitespace_split = bool(whitespace_split)
        # Surface word (with its skip characters) -> replacement strings, or a falsy marker.
        # Caching whole surface forms keeps the per-character work to the first occurrence.
        self._memo: dict[str, tuple[str, ...] | bool] = {"": _NO_CORE}

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        ratio: float,
        seed: int = 0,
        *,
        lowercase_fallback: bool = False,
        whitespace_split: bool = False,
    ) -> CodeMixer:
        """A mixer over the MUSE dictionary at ``path`` (loaded once per process)."""
        return cls(
            load_muse_dictionary(path),
            ratio,
            seed,
            lowercase_fallback=lowercase_fallback,
            whitespace_split=whitespace_split,
        )

    def _analyse(self, word: str) -> tuple[str, ...] | bool:
        """The replacement strings of ``word`` with its outer skip characters kept, or a marker."""
        start, end = 0, len(word)
        if not word.isalnum():  # most words are, and have no skip characters to strip
            while start < end and _is_skip(word[start]):
                start += 1
            if start == end:
                self._memo[word] = _NO_CORE
                return _NO_CORE
            while _is_skip(word[end - 1]):
                end -= 1
        core = word[start:end]
        translations = self.dictionary.get(core)
        if not translations and self.lowercase_fallback:
            translations = self.dictionary.get(core.lower())
        if not translations:
            entry: tuple[str, ...] = _NOT_IN_DICT
        elif start == 0 and end == len(word):
            entry = tuple(translations)
        else:
            lead, trail = word[:start], word[end:]
            entry = tuple(lead + t + trail for t in translations)
        self._memo[word] = entry
        return entry

    def mix_fields(self, texts: Sequence[str], index: int) -> tuple[list[str], MixStats]:
        """Code-mixes all text parts of the example at stream position ``index``.

        The output depends only on (seed, index, texts): the generator is
        ``random.Random(f"{seed}:{index}")`` (string seeds are hashed with SHA-512, the same on
        every platform and process), consumed by one draw per dictionary word in text order.
        """
        if len(self._memo) > _MEMO_LIMIT:
            self._memo = {"": _NO_CORE}
        memo_get = self._memo.get
        ratio = self.ratio
        draw = random.Random(f"{self.seed}:{index}").random
        seen = in_dict = replaced = 0
        mixed = []
        for text in texts:
            # The reference's split, and the whitespace split's fast path: when the only
            # whitespace is single ASCII spaces (isprintable() is False for every other
            # whitespace character), both splits agree and str.split is 2x faster than re.
            simple = not self.whitespace_split or (text.isprintable() and "  " not in text)
            if simple:
                words = text.split(" ")
            else:
                parts = _WHITESPACE_SPLIT(text)
                words = parts[::2]
            entries = list(map(memo_get, words))
            if None in entries:
                entries = [self._analyse(w) if e is None else e for w, e in zip(words, entries)]
            seen += len(words) - entries.count(_NO_CORE)
            hits = list(compress(range(len(words)), entries))
            in_dict += len(hits)
            changed = False
            if ratio > 0.0:
                for i in hits:
                    u = draw()
                    if u < ratio:
                        options = entries[i]
                        n = len(options)
                        words[i] = options[0] if n == 1 else options[min(int(u / ratio * n), n - 1)]
                        changed = True
                        replaced += 1
            if changed:
                if simple:
                    text = " ".join(words)
                else:
                    parts[::2] = words
                    text = "".join(parts)
            mixed.append(text)
        return mixed, MixStats(seen, in_dict, replaced)

    def mix(self, text: str, index: int) -> str:
        """Code-mixes one string as the single text part of example ``index``."""
        return self.mix_fields((text,), index)[0][0]
