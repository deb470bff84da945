"""Records from JSON-lines, JSON-list and TSV files: the one reader every data reader uses.

Each record comes with its file and line, and every problem is a `DataError` worded
`file:line: what is wrong; what was expected`. Files must be UTF-8: they are decoded with
`errors="surrogateescape"`, so a byte that is not UTF-8 becomes a code point that valid UTF-8 never
decodes to, and is reported with its line and column instead of as a `UnicodeDecodeError`. A UTF-8
byte-order mark at the start of a file is dropped. Lines end at `\\n`, `\\r\\n` or `\\r` (in a JSON list,
where line ends are kept, lines are counted at `\\n`).

A bad line (not UTF-8, not a JSON object, a wrong number of TSV fields, or a record its consumer
rejects) is handled by one policy, `BadLines`: `error` stops at it; `skip` passes it on as a row
marked `bad` and goes on, and the caller counts and reports those (training logs `data/skipped_lines`). A JSON list whose structure is broken is an error under either policy:
after it nothing can be read reliably.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Collection, Iterator, NamedTuple, Optional

from easylm_align.errors import UserError

ON_BAD_LINE = ("error", "skip")
# A byte that is not UTF-8, decoded with errors="surrogateescape".
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_DECODER = json.JSONDecoder()
# A \u escape of a UTF-16 surrogate; JSON decodes a pair of them to one character, a lone one to a
# surrogate code point, which is not text (UTF-8 cannot encode it, tokenizers fail on it).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SPACE = re.compile("[ \t\r\n]*")


class DataError(UserError):
    """Bad input data (a user mistake); the message names the file and line and what was expected."""


class Row(NamedTuple):
    """One record: a JSON value or a TSV row's fields; None for a blank line or a skipped bad one."""
    path: str
    line: int
    value: Any
    bad: bool = False

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line}"


class BadLines:
    """The bad-line policy: `error` raises DataError; `skip` lets the caller skip (and count) the line.

    `flag` (e.g. `--train_dataset.json_dataset`) names the flag group holding `on_bad_line`, so the
    error can say how to skip such lines.
    """

    def __init__(self, on_bad_line: str = "error", flag: str = ""):
        if on_bad_line not in ON_BAD_LINE:
            raise DataError(f"{flag}.on_bad_line={on_bad_line!r}: use 'error' or 'skip'")
        self.skip, self.flag = on_bad_line == "skip", flag

    def check(self, location: str, problem: str) -> None:
        """Under `error`, raises DataError naming `location` (file:line), `problem` and how to skip."""
        if not self.skip:
            hint = f"; pass {self.flag}.on_bad_line=skip to skip such lines" if self.flag else ""
            raise DataError(f"{location}: {problem}{hint}")

    def reject(self, path: str, line: int, problem: str) -> Row:
        """The skipped row for a bad line, or DataError under the `error` policy."""
        self.check(f"{path}:{line}", problem)
        return Row(path, line, None, bad=True)


def not_utf8(text: str) -> str:
    """What is wrong with `text` if a byte of it was not UTF-8 (its value and column), else ""."""
    bad = _UNDECODABLE.search(text)
    return _byte_problem(text, bad.start()) if bad else ""


def _byte_problem(text: str, index: int) -> str:
    """Names the byte that `text[index]` (a surrogate escape) stands for and its column in its line."""
    column = index - text.rfind("\n", 0, index)
    return f"byte 0x{ord(text[index]) - 0xDC00:02x} at column {column} is not UTF-8 (the file must be UTF-8)"


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


# Linux's limits on a file name and a path; a pattern beyond them names no file.
_NAME_MAX, _PATH_MAX = 255, 4096


def matching_files(pattern: str) -> list[str]:
    """The files a path or glob pattern (one with `*?[`) names, sorted.

    A pattern no file could match (a name or path over the file system's limits) is not globbed:
    Python's glob takes time quadratic in the length of a run of `[`, so a junk flag value could hang.
    """
    encoded = os.fsencode(pattern)
    if not pattern or len(encoded) > _PATH_MAX or any(len(name) > _NAME_MAX for name in encoded.split(b"/")):
        return []
    files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    return [f for f in files if Path(f).is_file()]


def _check_file(path: str | Path) -> str:
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    return str(path)


def read_text(path: str | Path) -> str:
    """The whole file, decoded as the module docstring says (line ends kept as they are)."""
    try:
        with open(_check_file(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) for every line of a file, blank ones included."""
    path = _check_file(path)
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                yield number, line.rstrip("\n")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def parse_object(line: str) -> tuple[Optional[dict], str]:
    """The JSON object on one line, or what is wrong with the line."""
    problem = not_utf8(line)
    if problem:
        return None, problem
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON line ({e.msg} at column {e.colno}); expected one JSON object per line"
    except RecursionError:
        return None, "JSON nested too deeply"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {_json_type(value)}"
    return value, lone_surrogate(line, value)


def lone_surrogate(text: str, value: Any) -> str:
    """What is wrong if `value`, parsed from `text`, holds a string with a lone surrogate escape."""
    if not _SURROGATE_ESCAPE.search(text):  # the walk below is needed only where such escapes occur
        return ""
    bad = _SURROGATE.search(json.dumps(value, ensure_ascii=False))
    if not bad:
        return ""
    return (f"the escape \\u{ord(bad.group()):04x} is a lone UTF-16 surrogate, not a character; "
            "expected text (surrogate escapes come in pairs)")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def json_lines(path: str | Path, policy: BadLines, first: int = 0, keep_blank: bool = False) -> Iterator[Row]:
    """One row per line holding a JSON object. Lines before line `first + 1` are passed over unparsed
    (rows with value None), for resuming; blank lines are rows with value None if `keep_blank`."""
    for number, line in lines(path):
        if number <= first or not line.strip():
            if keep_blank or number <= first:
                yield Row(str(path), number, None)
            continue
        value, problem = parse_object(line)
        yield policy.reject(str(path), number, problem) if problem else Row(str(path), number, value)


def json_list(text: str, path: str | Path, policy: BadLines) -> Iterator[Row]:
    """The objects of a JSON list held in `text` (the file `path`), each with the line it starts on."""
    path, line_of = str(path), _LineCounter(text)
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise DataError(f"{path}:{line_of(pos)}: expected a JSON list ('[')")
    pos = _skip_space(text, pos + 1)
    while not text.startswith("]", pos):
        start = pos
        try:
            value, pos = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError as e:
            raise _list_error(text, path, start, e.pos, f"invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{line_of(start)}: JSON nested too deeply") from None
        bad = _UNDECODABLE.search(text, start, pos)
        if bad:
            yield policy.reject(path, line_of(bad.start()), _byte_problem(text, bad.start()))
        else:
            problem = (f"expected a list of JSON objects, got {_json_type(value)}" if not isinstance(value, dict)
                       else lone_surrogate(text[start:pos], value))
            yield policy.reject(path, line_of(start), problem) if problem else Row(path, line_of(start), value)
        pos = _skip_space(text, pos)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            raise _list_error(text, path, pos, pos, "expected ',' or ']' after a list element")
    end = _skip_space(text, pos + 1)
    if end < len(text):
        raise DataError(f"{path}:{line_of(end)}: unexpected text after the JSON list; expected one list")


class _LineCounter:
    """Line numbers of positions in `text`, counted on from the last position asked (elements come in order)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, index: int) -> int:
        if index < self.pos:
            return _line_of(self.text, index)
        self.line += self.text.count("\n", self.pos, index)
        self.pos = index
        return self.line


def _skip_space(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()


def _list_error(text: str, path: str, start: int, error_pos: int, message: str) -> DataError:
    """A broken JSON list. A byte that is not UTF-8 is the likelier cause, so it is named first."""
    bad = _UNDECODABLE.search(text, start, error_pos + 1)
    if bad:
        return DataError(f"{path}:{_line_of(text, bad.start())}: {_byte_problem(text, bad.start())}")
    if error_pos >= len(text):
        return DataError(f"{path}:{_line_of(text, error_pos)}: unterminated JSON list; expected ']' at the end")
    column = error_pos - text.rfind("\n", 0, error_pos)
    return DataError(f"{path}:{_line_of(text, error_pos)}: {message} at column {column}")


def json_records(path: str | Path, policy: BadLines, first: int = 0, keep_blank: bool = False) -> Iterator[Row]:
    """The objects of a JSON list file (it starts with `[`) or a JSON-lines file, in file order.

    For a list, `first` list elements are passed over (rows with value None) and blank lines are not
    records; for JSON lines see `json_lines`.
    """
    if _starts_with_bracket(path):
        for i, row in enumerate(json_list(read_text(path), path, policy)):
            yield row._replace(value=None) if i < first else row
    else:
        yield from json_lines(path, policy, first, keep_blank)


def _starts_with_bracket(path: str | Path) -> bool:
    for _, line in lines(path):
        if line.strip():
            return line.lstrip().startswith("[")
    return False


def tsv_rows(path: str | Path, policy: BadLines, num_fields: Optional[Collection[int]] = None,
             names: str = "", keep_blank: bool = False) -> Iterator[Row]:
    """The tab-separated fields of each line; with `num_fields`, a line with another count is bad
    (`names` describes the expected fields in the message, e.g. "sent0, sent1[, hard_neg]")."""
    for number, line in lines(path):
        if not line.strip():
            if keep_blank:
                yield Row(str(path), number, None)
            continue
        problem = not_utf8(line)
        fields = line.split("\t")
        if not problem and num_fields is not None and len(fields) not in num_fields:
            counts = " or ".join(map(str, sorted(num_fields)))
            problem = f"expected {counts} tab-separated fields{f' ({names})' if names else ''}, got {len(fields)}"
        yield policy.reject(str(path), number, problem) if problem else Row(str(path), number, fields)


def text_lines(path: str | Path, policy: BadLines, first: int = 0, keep_blank: bool = False) -> Iterator[Row]:
    """Plain text, one record per line: `{"text": line}` (the field the `datasets` text loader
    names). Blank lines and lines before line `first + 1` as in `json_lines`."""
    for number, line in lines(path):
        if number <= first or not line.strip():
            if keep_blank or number <= first:
                yield Row(str(path), number, None)
            continue
        problem = not_utf8(line)
        yield policy.reject(str(path), number, problem) if problem else Row(str(path), number, {"text": line})


# File suffixes read as plain text (one record per line); every other file is JSON.
TEXT_SUFFIXES = (".txt",)


def file_records(path: str | Path, policy: BadLines, first: int = 0, keep_blank: bool = False,
                 kind: str = "") -> Iterator[Row]:
    """The records of a data file: `kind` 'text' (`text_lines`), 'json' (`json_records`), or by the
    file's suffix when '' (`.txt` is text)."""
    if kind == "text" or (not kind and str(path).endswith(TEXT_SUFFIXES)):
        return text_lines(path, policy, first, keep_blank)
    return json_records(path, policy, first, keep_blank)
