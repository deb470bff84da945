"""MUSE bilingual dictionaries and the word-level code-mixer of COMMIT.

COMMIT (Lee, Jung and Hwang, NAACL 2024 Findings) swaps words of the training text for
dictionary translations with probability ``codemix_ratio``. This module reproduces that
mixer with these deliberate differences from the original EasyLM-based implementation:

* **Whitespace.** The original splits on ``' '`` only and rejoins with ``' '``, so a word
  glued to a newline or tab (``"task.\\n\\nWrite"``) is one "word" that never matches. Here
  text is split on any whitespace run, and every whitespace run is kept exactly.
* **Casing.** The original looks the word up exactly, so ``"The"`` is never mixed (MUSE
  entries are lowercase). Here the exact form is tried first, then its lowercase form.
* **Punctuation.** Unchanged in spirit: leading and trailing characters that are Unicode
  punctuation (category ``P*``) or ASCII non-alphanumerics (``$``, ``^``, ``+``, …) are
  kept in place and only the core is looked up; inner punctuation (``don't``,
  ``well-known``) stays part of the core. Symbols outside ASCII (``©``, emoji) are not
  stripped.
* **Randomness.** The original draws from the process-global :mod:`random` state, so a
  resumed run or another worker mixes differently. Here each example gets its own
  generator seeded by ``(seed, index)``; one uniform draw ``u`` per dictionary word decides
  both whether to replace (``u < ratio``) and which translation (``u / ratio`` is uniform
  in ``[0, 1)`` given a replacement).

Dictionary pairs whose translation equals the source (MUSE has many, e.g. names) are kept,
as in the original, and a replacement by such a pair still counts as a replacement.
"""

from __future__ import annotations

import os
import random
import re
import unicodedata
from collections.abc import Mapping, Sequence
from itertools import compress
from typing import NamedTuple

__all__ = [
    "CodeMixer",
    "DictionaryError",
    "MixStats",
    "load_muse_dictionary",
]


class DictionaryError(ValueError):
    """A bilingual dictionary file is missing, unreadable, malformed or empty."""


# Keyed by (resolved path, mtime, size) so an edited file is read again.
_DICTIONARY_CACHE: dict[tuple[str, int, int], dict[str, tuple[str, ...]]] = {}


def load_muse_dictionary(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """Reads a MUSE dictionary: one ``source translation`` pair per line (space or tab).

    Returns source word -> its translations in file order, without duplicates. Blank lines
    and lines starting with ``#`` are skipped (the MUSE files contain a few pairs such as
    ``#aaa #aaa``; the mixer strips leading punctuation before lookup, so those could never
    match anyway). The result is cached per file and shared: treat it as read-only.
    """
    try:
        resolved = os.path.realpath(path)
        stat = os.stat(resolved)
        key = (resolved, stat.st_mtime_ns, stat.st_size)
        if key in _DICTIONARY_CACHE:
            return _DICTIONARY_CACHE[key]
        with open(resolved, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise DictionaryError(f"{path}: dictionary file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DictionaryError(f"{path}: cannot read dictionary: {e}") from None

    pairs: dict[str, list[str]] = {}
    for lineno, line in enumerate(lines, start=1):
        columns = line.split()
        if not columns or columns[0].startswith("#"):
            continue
        if len(columns) != 2:
            raise DictionaryError(
                f"{path}:{lineno}: expected two columns 'source translation' separated by a "
                f"space or a tab, got {len(columns)}: {line.strip()!r}"
            )
        source, target = columns
        targets = pairs.get(source)
        if targets is None:
            pairs[source] = [target]
        elif target not in targets:
            targets.append(target)
    if not pairs:
        raise DictionaryError(f"{path}: dictionary is empty (no 'source translation' pairs)")

    dictionary = {source: tuple(targets) for source, targets in pairs.items()}
    _DICTIONARY_CACHE[key] = dictionary
    return dictionary


class MixStats(NamedTuple):
    """Word counts of one or more mixed texts; ``+`` (and ``sum``) add them field by field."""

    words_seen: int = 0  # whitespace-separated tokens with at least one non-punctuation char
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


_WHITESPACE_SPLIT = re.compile(r"(\s+)").split

# Memo entries for words that cannot be replaced; both are falsy, unlike a tuple of
# replacements, so `compress` can pick the replaceable words at C speed.
_NO_CORE = False  # the token is only punctuation
_NOT_IN_DICT: tuple[str, ...] = ()

# Bounds the per-mixer memo of analysed surface forms on open-ended corpora (Wikipedia).
_MEMO_LIMIT = 1 << 20


def _is_punctuation(char: str) -> bool:
    if char < "\x80":
        return not char.isalnum()
    return unicodedata.category(char)[0] == "P"


class CodeMixer:
    """Replaces dictionary words with random translations, reproducibly per example.

    Args:
        dictionary: source word -> translations (see :func:`load_muse_dictionary`).
        ratio: probability that a word found in the dictionary is replaced (``codemix_ratio``).
        seed: combined with each example's index to seed that example's generator.
    """

    def __init__(self, dictionary: Mapping[str, Sequence[str]], ratio: float, seed: int = 0):
        if not 0.0 <= float(ratio) <= 1.0:  # also rejects NaN
            raise ValueError(f"codemix_ratio must be in [0, 1], got {ratio!r}")
        self.dictionary = dictionary
        self.ratio = float(ratio)
        self.seed = int(seed)
        # Surface word (with its punctuation) -> replacement strings, or a falsy marker.
        # Caching whole surface forms keeps the per-character work to the first occurrence.
        self._memo: dict[str, tuple[str, ...] | bool] = {"": _NO_CORE}

    @classmethod
    def from_file(cls, path: str | os.PathLike, ratio: float, seed: int = 0) -> CodeMixer:
        """A mixer over the MUSE dictionary at ``path`` (loaded once per process)."""
        return cls(load_muse_dictionary(path), ratio, seed)

    def _analyse(self, word: str) -> tuple[str, ...] | bool:
        """The replacement strings of ``word`` with its outer punctuation kept, or a marker."""
        start, end = 0, len(word)
        if not word.isalnum():  # most words are, and have no punctuation to strip
            while start < end and _is_punctuation(word[start]):
                start += 1
            if start == end:
                self._memo[word] = _NO_CORE
                return _NO_CORE
            while _is_punctuation(word[end - 1]):
                end -= 1
        core = word[start:end]
        translations = self.dictionary.get(core) or self.dictionary.get(core.lower())
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
            # Fast path: when the only whitespace is single ASCII spaces (isprintable() is
            # False for every other whitespace character), str.split is 2x faster than re.
            simple = text.isprintable() and "  " not in text
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
