"""The `json` source on bytes that are not UTF-8: the error names the file, line and column."""

import json

import pytest

from easylm_align.data import pipeline
from easylm_align.tokenizer import DEMO_TOKENIZER, Tokenizer

GOOD = json.dumps({"text": "hello world " * 20}).encode()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(str(DEMO_TOKENIZER))


def iterator(path, tok, **json_dataset):
    cfg = pipeline.default_config()
    cfg.json_dataset.update(dict(path=str(path), seq_length=32, batch_size=2, **json_dataset))
    return pipeline.DatasetIterator(cfg, tok)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_json_lines_name_the_line_and_column_of_the_bad_byte(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    bad = b'{"text": "caf\xff au lait"}'  # 0xff starts no UTF-8 sequence
    path.write_bytes(b"\n".join([GOOD, GOOD, bad, GOOD]) + b"\n")
    with pytest.raises(pipeline.DataError) as info:
        take(iterator(path, tok), 8)  # far enough to reach line 3
    assert str(info.value) == (f"{path}:3: byte 0xff at column 14 is not UTF-8 (the file must be UTF-8); "
                               "pass --train_dataset.json_dataset.on_bad_line=skip to skip such lines")
    # Like any bad line, it can be skipped; the good lines around it are read unchanged.
    it = iterator(path, tok, on_bad_line="skip")
    while it.epoch == 0 and it.next_record < 4:
        next(it)
    assert it.stats["skipped_lines"] == 1 and it.stats["examples"] == 3


def test_json_list_names_the_line_and_column_of_the_bad_byte(tmp_path, tok):
    path = tmp_path / "d.json"
    records = [{"text": "a"}] * 3
    text = json.dumps(records, indent=2).encode()
    lines = text.split(b"\n")
    n = [i for i, line in enumerate(lines) if b'"text"' in line][1]  # the second record's
    lines[n] = lines[n].replace(b'"a"', b'"\xe9"')  # Latin-1 é: a lead byte without its continuation
    path.write_bytes(b"\n".join(lines))
    column = lines[n].index(b"\xe9") + 1
    with pytest.raises(pipeline.DataError, match=rf"^{path}:{n + 1}: byte 0xe9 at column {column} is not UTF-8"):
        take(iterator(path, tok), 8)


def test_valid_utf8_and_escapes_still_read(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "नमस्ते दुनिया " * 10}, ensure_ascii=False),
             json.dumps({"text": "\\udc80 is text here, not an escape " * 3})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert next(iterator(path, tok))["input_tokens"].shape == (2, 32)
