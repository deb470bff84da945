r"""Code-mixes a text or JSON file with a MUSE dictionary and prints word statistics.

    python -m easylm_align.tools.codemix_file --dict=dicts/en-hi.txt --ratio=0.5 --seed=0 \
        --input=FILE --output=FILE [--field=text[,title]] [--format=auto] \
        [--lowercase_fallback] [--whitespace_split]

Formats: ``text`` (each line is one example; its 0-based line number is the example index),
``jsonl`` (one JSON object per line; the index counts records, blank lines skipped) and
``json`` (a JSON list of objects; the index is the list position). ``auto`` picks ``jsonl``
or ``json`` for ``.jsonl`` / ``.json`` files (a ``.json`` file that does not start with ``[``
is read as JSON lines) and ``text`` otherwise. In JSON records only the ``--field``s are
mixed; they are mixed together as one example, like :meth:`CodeMixer.mix_fields`, so the
output matches what a training run with the same seed sees for that example.
Words are split and looked up by the reference's rule unless ``--lowercase_fallback`` /
``--whitespace_split`` are given, the text processor's ``codemix_lowercase_fallback`` /
``codemix_whitespace_split`` (see :mod:`easylm_align.codemix`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence

from absl import app, flags

from easylm_align import records
from easylm_align.codemix import CodeMixer, MixStats
from easylm_align.records import DataError


def _define_flags() -> None:
    """The tool's flags, defined only when it runs, so that importing its functions defines none."""
    flags.DEFINE_string("dict", None, "MUSE dictionary: one 'source translation' per line.")
    flags.DEFINE_float("ratio", None, "codemix_ratio: chance of replacing a dictionary word.")
    flags.DEFINE_integer("seed", 0, "With each example's index, fixes that example's mixing.")
    flags.DEFINE_string("input", None, "File to code-mix.")
    flags.DEFINE_string("output", None, "Where to write the code-mixed file.")
    flags.DEFINE_string("field", "text", "Comma-separated fields to mix in JSON records.")
    flags.DEFINE_enum("format", "auto", ["auto", "text", "jsonl", "json"], "Input format.")
    flags.DEFINE_boolean(
        "lowercase_fallback", False,
        "Also look a word up in lowercase (codemix_lowercase_fallback); the reference does not.")
    flags.DEFINE_boolean(
        "whitespace_split", False,
        "Split words on any whitespace run, kept exactly (codemix_whitespace_split); the "
        "reference splits on ' ' only.")


def _detect_format(path: str, head: str) -> str:
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".json"):
        return "json" if head.lstrip().startswith("[") else "jsonl"
    return "text"


def _mix_record(
    mixer: CodeMixer, record: dict, fields: Sequence[str], index: int, where: str
) -> tuple[dict, MixStats]:
    for field in fields:
        if not isinstance(record.get(field), str):
            problem = "missing" if field not in record else "not a string"
            raise DataError(
                f"{where}: field {field!r} is {problem} (record keys: {', '.join(record)})"
            )
    mixed, stats = mixer.mix_fields([record[f] for f in fields], index)
    return {**record, **dict(zip(fields, mixed))}, stats


def _lines(content: str) -> list[str]:
    """Lines split on "\n" only, with their ends: str.splitlines would also split on
    characters such as U+2028, which JSON strings may hold unescaped."""
    lines = [line + "\n" for line in content.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _mix_text(mixer: CodeMixer, content: str, path: str) -> Iterator[tuple[str, MixStats]]:
    for index, line in enumerate(_lines(content)):
        problem = records.not_utf8(line)
        if problem:
            raise DataError(f"{path}:{index + 1}: {problem}")
        mixed, stats = mixer.mix_fields((line,), index)
        yield mixed[0], stats


def _mix_jsonl(
    mixer: CodeMixer, content: str, fields: Sequence[str], path: str
) -> Iterator[tuple[str, MixStats]]:
    index = 0
    for lineno, line in enumerate(_lines(content), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        record, problem = records.parse_object(line)
        if problem:
            raise DataError(f"{where}: {problem}")
        mixed, stats = _mix_record(mixer, record, fields, index, where)
        index += 1
        yield json.dumps(mixed, ensure_ascii=False) + "\n", stats


def codemix_file(
    mixer: CodeMixer, input_path: str, output_path: str, fields: Sequence[str], fmt: str = "auto"
) -> MixStats:
    """Code-mixes ``input_path`` into ``output_path``; returns the summed statistics."""
    if not os.path.isfile(input_path):
        raise DataError(f"{input_path}: input file not found")
    content = records.read_text(input_path)
    if fmt == "auto":
        fmt = _detect_format(input_path, content[:100])

    total = MixStats()
    if fmt == "json":
        mixed_records = []
        for index, row in enumerate(records.json_list(content, input_path, records.BadLines())):
            mixed, stats = _mix_record(mixer, row.value, fields, index, row.location)
            mixed_records.append(mixed)
            total += stats
        out = json.dumps(mixed_records, ensure_ascii=False, indent=4) + "\n"
    else:
        pieces = (
            _mix_text(mixer, content, input_path)
            if fmt == "text"
            else _mix_jsonl(mixer, content, fields, input_path)
        )
        chunks = []
        for chunk, stats in pieces:
            chunks.append(chunk)
            total += stats
        out = "".join(chunks)
    try:
        # A JSON escape such as "\udc80" decodes to a lone surrogate, which UTF-8 cannot encode;
        # written back as the same escape, the output's JSON reads as the input's did.
        with open(output_path, "w", encoding="utf-8", errors="backslashreplace", newline="") as f:
            f.write(out)
    except OSError as e:
        raise DataError(f"{output_path}: cannot write: {e}") from None
    return total


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    fields = [f.strip() for f in FLAGS.field.split(",") if f.strip()]
    if not fields:
        raise app.UsageError("--field must name at least one field")
    try:
        mixer = CodeMixer.from_file(FLAGS.dict, FLAGS.ratio, FLAGS.seed, lowercase_fallback=FLAGS.lowercase_fallback,
                                    whitespace_split=FLAGS.whitespace_split)
        stats = codemix_file(mixer, FLAGS.input, FLAGS.output, fields, FLAGS.format)
    except ValueError as e:  # DataError (DictionaryError too) and a bad ratio
        sys.exit(f"codemix_file: error: {e}")
    in_dict_share = stats.words_in_dict / stats.words_seen if stats.words_seen else 0.0
    print(f"words seen:               {stats.words_seen:,}")
    print(f"words in dictionary:      {stats.words_in_dict:,} ({in_dict_share:.1%} of seen)")
    print(f"words replaced:           {stats.words_replaced:,}")
    print(f"replaced / in dictionary: {stats.replaced_ratio:.4f} (codemix_ratio {mixer.ratio})")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["dict", "ratio", "input", "output"])
    app.run(main)
