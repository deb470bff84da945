"""Every reader fuzzed with hypothesis: random bytes, truncated and corrupted files, bytes that are not
UTF-8, empty files, very long lines, wrong JSON types, and flag values.

The property: a reader either reads the file, or skips bad lines under `on_bad_line=skip` and counts
them, or raises the project's own error (a ValueError subclass) whose message names the file and a
line (`file:line:`). Any other exception (KeyError, TypeError, UnicodeDecodeError, a leaked
JSONDecodeError, ...) fails the test. Example counts are bounded and derandomized, so CI is fast
and reproducible; files are at most a few hundred kilobytes, so nothing can hang.
"""

import itertools
import json
import re
import string

import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ml_collections import config_flags

from easylm_align import config, model, records, sharding

from easylm_align.data import pipeline
from easylm_align.codemix import CodeMixer, load_muse_dictionary
from easylm_align.evaluation import icl_tasks, squad
from easylm_align.tokenizer import DEMO_TOKENIZER, Tokenizer
from easylm_align.tools import codemix_file, generate_afp_data

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OWN_ERRORS = (records.DataError, squad.SquadFormatError)
_names = itertools.count()

# ---------------------------------------------------------------------------------------------
# What a fuzzed file holds
# ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def records_of(fields: dict) -> st.SearchStrategy[dict]:
    """Records with these fields, each holding a value of its documented type or, sometimes, any JSON value."""
    return st.fixed_dictionaries({name: kind | json_values for name, kind in fields.items()})


@st.composite
def corrupted(draw, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid file, or one truncated, with random bytes inserted, or with a byte replaced; random
    bytes; an empty file; or a very long line."""
    data = draw(valid)
    how = draw(st.sampled_from(["valid", "truncate", "insert", "replace", "random", "empty", "long"]))
    at = draw(st.integers(0, len(data)))
    if how == "truncate":
        return data[:at]
    if how == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    if how == "replace" and data:
        at = min(at, len(data) - 1)
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1:]
    if how == "random":
        return draw(st.binary(max_size=200))
    if how == "empty":
        return b""
    if how == "long":
        return data[:at] + b"word " * 4000 + data[at:]
    return data


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def json_list(rows: list) -> bytes:
    return json.dumps(rows, ensure_ascii=False, indent=1).encode()


def tsv(rows: list[list[str]]) -> bytes:
    return "".join("\t".join(r) + "\n" for r in rows).encode()


words = st.text(string.ascii_letters + " éन", min_size=1, max_size=12)
cells = st.text(string.ascii_letters + " é", min_size=1, max_size=8)


def write(tmp_dir, suffix: str, data: bytes, name: str = ""):
    path = tmp_dir / f"{name or next(_names)}{suffix}"
    path.write_bytes(data)
    return path


def expect_read_or_own_error(read, path) -> None:
    """`read()` succeeds, or raises the project's error naming `path` and a line."""
    try:
        read()
    except OWN_ERRORS as e:
        assert re.search(rf"{re.escape(str(path))}:\d+: ", str(e)), str(e)


# ---------------------------------------------------------------------------------------------
# Training data: the json source (JSON lines, JSON lists with the Alpaca processor), afp,
# codemix_pairs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return Tokenizer(str(DEMO_TOKENIZER))


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def dictionary(tmp_dir):
    path = tmp_dir / "dict.txt"
    path.write_text("hello नमस्ते\nworld दुनिया\n", encoding="utf-8")
    return path


def one_epoch(cfg, tok) -> dict:
    """Builds the iterator (a pair source reads its first example then) and reads one epoch (or
    until it has a batch); returns the data stats."""
    data = pipeline.DatasetIterator(cfg, tok)
    try:
        while data.epoch == 0:
            next(data)
        return dict(data.stats)
    finally:
        data.close()


def expect_epoch_or_own_error(cfg, tok, path) -> None:
    try:
        one_epoch(cfg, tok)
    except records.DataError as e:
        # Only an epoch without one example is reported for the data set as a whole.
        assert re.search(rf"{re.escape(str(path))}:\d+: ", str(e)) or "has no examples" in str(e), str(e)


def json_config(path, **text_processor):
    cfg = pipeline.default_config()
    cfg.json_dataset.update(path=str(path), seq_length=64, batch_size=2)
    cfg.text_processor.update(text_processor)
    return cfg


@FUZZ
@given(corrupted(st.lists(records_of({"text": words}), max_size=4).map(jsonl)))
def test_json_lines(tok, tmp_dir, data):
    path = write(tmp_dir, ".jsonl", data)
    expect_epoch_or_own_error(json_config(path), tok, path)


@FUZZ
@given(corrupted(st.lists(records_of({"instruction": words, "input": words | st.none(), "output": words}),
                          max_size=3).map(json_list)))
def test_alpaca_json_list(tok, tmp_dir, data):
    path = write(tmp_dir, ".json", data)
    expect_epoch_or_own_error(json_config(path, alpaca=True), tok, path)


@FUZZ
@given(st.lists(st.tuples(st.booleans(), records_of({"text": words})), max_size=6))
def test_skipped_lines_are_counted(tok, tmp_dir, lines):
    """Under on_bad_line=skip every bad line (broken JSON, or a record the processor rejects) is
    counted and every good one read. The last line fills a batch, so one epoch is one pass."""
    texts = [json.dumps(r) if ok else json.dumps(r)[:-1] for ok, r in lines]
    texts.append(json.dumps({"text": "hello world " * 100}))
    good = 1 + sum(ok and isinstance(r["text"], (str, type(None))) for ok, r in lines)
    cfg = json_config(write(tmp_dir, ".jsonl", "\n".join(texts).encode()))
    cfg.json_dataset.on_bad_line = "skip"
    data = pipeline.DatasetIterator(cfg, tok)
    while data.next_record < len(texts):
        next(data)
    assert data.epoch == 0
    assert data.stats["skipped_lines"] == len(texts) - good and data.stats["examples"] == good


@FUZZ
@given(st.sampled_from(["fields", "alpaca"]), st.lists(json_values, min_size=1, max_size=3))
def test_wrong_json_types_are_errors(tok, tmp_dir, processor, values):
    """A text field that is not a string (or null) stops the run at its line, naming the field."""
    fields = ["text"] if processor == "fields" else ["instruction", "input", "output"]
    rows = [dict.fromkeys(fields, "hello world " * 30) for _ in values]
    for row, value in zip(rows, values):
        row[fields[-1]] = value
    path = write(tmp_dir, ".jsonl", jsonl(rows))
    bad = [i for i, value in enumerate(values) if not isinstance(value, (str, type(None)))]
    if not bad:
        one_epoch(json_config(path, alpaca=processor == "alpaca"), tok)
        return
    with pytest.raises(records.DataError, match=rf"^{re.escape(str(path))}:{bad[0] + 1}: field '{fields[-1]}' must be"):
        one_epoch(json_config(path, alpaca=processor == "alpaca"), tok)


def afp_config(path, **group):
    cfg = pipeline.default_config("afp")
    cfg.afp_dataset.update(dict(path=str(path), batch_size=2, seq_length=64, pair_length=16, **group))
    return cfg


AFP_RECORD = {"sent0": words, "sent1": words, "clm_text": words, "clm_prompt_len": st.integers(0, 3)}


@FUZZ
@given(corrupted(st.lists(records_of(AFP_RECORD), max_size=4).map(jsonl)))
def test_afp_json_lines(tok, tmp_dir, data):
    path = write(tmp_dir, ".jsonl", data)
    expect_epoch_or_own_error(afp_config(path), tok, path)


@FUZZ
@given(corrupted(st.lists(st.lists(cells, min_size=2, max_size=3), max_size=4).map(tsv)))
def test_afp_tsv(tok, tmp_dir, data):
    path = write(tmp_dir, ".tsv", data)
    expect_epoch_or_own_error(afp_config(path), tok, path)


@FUZZ
@given(corrupted(st.lists(words, max_size=4).map(lambda ws: "\n".join(ws).encode())))
def test_codemix_pairs_text(tok, tmp_dir, dictionary, data):
    path = write(tmp_dir, ".txt", data)
    cfg = pipeline.default_config("codemix_pairs")
    cfg.codemix_pairs_dataset.update(path=str(path), batch_size=2, seq_length=64, pair_length=16)
    cfg.text_processor.update(codemix_dict_path=str(dictionary), codemix_ratio=0.5,
                              codemix_min_coverage=0.0)  # random text: a two-word dictionary finds nothing
    expect_epoch_or_own_error(cfg, tok, path)


# ---------------------------------------------------------------------------------------------
# Dictionaries, SQuAD, ICL tasks, the AFP data generator, codemix_file
# ---------------------------------------------------------------------------------------------

@FUZZ
@given(corrupted(st.lists(st.tuples(words, words), max_size=4).map(
    lambda pairs: "".join(f"{a.replace(' ', '')}x {b.replace(' ', '')}y\n" for a, b in pairs).encode())))
def test_muse_dictionary(tmp_dir, data):
    path = write(tmp_dir, ".txt", data)
    try:
        load_muse_dictionary(path)
    except records.DataError as e:  # DictionaryError; an empty dictionary is named by its file alone
        assert re.search(rf"{re.escape(str(path))}:(\d+: | dictionary is empty)", str(e)), str(e)


SQUAD_QA = st.fixed_dictionaries({"id": st.text(string.ascii_letters, min_size=1, max_size=4) | json_values,
                                  "question": words | json_values,
                                  "answers": st.lists(st.fixed_dictionaries({"text": words | json_values}),
                                                      max_size=2) | json_values})
SQUAD = st.fixed_dictionaries({"data": st.lists(st.fixed_dictionaries({
    "title": words | json_values,
    "paragraphs": st.lists(st.fixed_dictionaries({"context": words | json_values,
                                                   "qas": st.lists(SQUAD_QA, max_size=2)}), max_size=2)}),
    max_size=2) | json_values})


@FUZZ
@given(corrupted(SQUAD.map(lambda root: json.dumps(root, ensure_ascii=False, indent=1).encode())))
def test_squad(tmp_dir, data):
    path = write(tmp_dir, ".json", data)
    try:
        squad.load_squad(path)
    except squad.SquadFormatError as e:  # a line, or the article/paragraph/question path in the file
        assert str(e).startswith(f"{path}:"), str(e)


@FUZZ
@given(corrupted(st.lists(st.lists(cells, min_size=4, max_size=4), max_size=3).map(
    lambda rows: tsv([["id", "sentence1", "sentence2", "label"]] + rows))))
def test_pawsx(tmp_dir, data):
    root = tmp_dir / f"pawsx{next(_names)}"
    path = root / "pawsx" / "x-final" / "en" / "dev_2k.tsv"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    expect_read_or_own_error(lambda: icl_tasks.load_task("pawsx", "en", "dev", root), path)


XNLI_RECORD = {"premise": words, "hypothesis": words, "label": st.sampled_from(["entailment", 1, "neutral"])}


@FUZZ
@given(corrupted(st.lists(records_of(XNLI_RECORD), max_size=3).map(jsonl)),
       corrupted(st.lists(st.lists(cells, min_size=3, max_size=3), max_size=3).map(tsv)))
def test_xnli(tmp_dir, data, tsv_data):
    for suffix, content in ((".jsonl", data), (".tsv", tsv_data)):
        path = write(tmp_dir, suffix, content)
        expect_read_or_own_error(lambda: icl_tasks.load_xnli_file(path, "en"), path)


XCOPA_RECORD = {"premise": words, "choice1": words, "choice2": words,
                "question": st.sampled_from(["cause", "effect"]), "label": st.sampled_from([0, 1])}


@FUZZ
@given(corrupted(st.lists(records_of(XCOPA_RECORD), max_size=3).map(jsonl)))
def test_xcopa(tmp_dir, data):
    root = tmp_dir / f"xcopa{next(_names)}"
    path = root / "xcopa" / "zh" / "val.zh.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    expect_read_or_own_error(lambda: icl_tasks.load_task("xcopa", "zh", "dev", root), path)


BACTRIAN_RECORD = {"id": words, "instruction": words, "input": words | st.none(), "output": words}


@FUZZ
@given(corrupted(st.lists(records_of(BACTRIAN_RECORD), max_size=3).map(json_list)),
       corrupted(st.lists(st.lists(cells, min_size=2, max_size=2), max_size=3).map(tsv)))
def test_afp_data_generator_inputs(tmp_dir, bactrian, translations):
    path = write(tmp_dir, ".json", bactrian)
    expect_read_or_own_error(lambda: generate_afp_data.read_instruction_file(path), path)
    path = write(tmp_dir, ".tsv", translations)
    expect_read_or_own_error(lambda: generate_afp_data.read_translation_file(path, "en", "zh"), path)


@FUZZ
@given(st.sampled_from([(".txt", "text"), (".jsonl", "jsonl"), (".json", "json")]),
       corrupted(st.lists(records_of({"text": words}), max_size=3).map(json_list)),
       corrupted(st.lists(records_of({"text": words}), max_size=3).map(jsonl)))
def test_codemix_file(tmp_dir, dictionary, kind, as_list, as_lines):
    suffix, fmt = kind
    path = write(tmp_dir, suffix, as_list if fmt == "json" else as_lines)
    mixer = CodeMixer.from_file(str(dictionary), 0.5, 0)
    expect_read_or_own_error(lambda: codemix_file.codemix_file(mixer, str(path), str(tmp_dir / "out"), ["text"], fmt),
                             path)


# ---------------------------------------------------------------------------------------------
# Flag values
# ---------------------------------------------------------------------------------------------

junk = st.text(max_size=30) | st.sampled_from(["abc", "1e999", "-5", "0", "nan", "[1]", "{}", "1,2", ",,", " 8 ",
                                               "[" * 5_000])


@FUZZ
@given(junk)
def test_mesh_dim(value):
    try:
        sharding.parse_mesh_dim(value, 8)
    except sharding.ShardingError as e:
        assert "--mesh_dim" in str(e)


llama_updates = st.dictionaries(st.sampled_from(["hidden_size", "num_attention_heads", "rope_theta", "scan_layers",
                                                 "attention", "embd_pdrop", "vocab_size", "hiden_size"]),
                                json_values | st.integers(-4, 300) | st.floats(), max_size=3)


@FUZZ
@given(junk | llama_updates.map(json.dumps))
def test_update_llama_config(value):
    try:
        model.get_llama_config("demo", value)
    except ValueError as e:
        assert "--update_llama_config" in str(e), str(e)


@FUZZ
@given(st.sampled_from(["batch_size", "seq_length", "on_bad_line", "path"]), junk)
def test_dataset_flag_values(tmp_dir, tok, key, value):
    """`--train_dataset.json_dataset.KEY=VALUE` as the command line parses it, then as the data set
    takes it: either error is one line naming the flag."""
    argv = ["train", f"--train_dataset.json_dataset.{key}={value}"]
    fresh = flags.FlagValues()
    config_flags.DEFINE_config_dict("train_dataset", pipeline.default_config(), flag_values=fresh, sys_argv=argv)
    try:
        fresh(argv)
    except config.FLAG_VALUE_ERRORS as e:  # what parse_flags_or_exit reports as "error: ..." and exit 2
        assert f"--train_dataset.json_dataset.{key}" in str(e), str(e)
        return
    try:
        pipeline.DatasetIterator(fresh.train_dataset, tok).close()
    except records.DataError as e:
        assert f"--train_dataset.json_dataset.{key}" in str(e) or str(fresh.train_dataset.json_dataset.path) in str(e)


@FUZZ
@given(st.sampled_from(["seed", "total_steps", "dry_run", "dtype", "log_freq"]), junk)
def test_top_level_flag_values(key, value):
    from easylm_align import train_config

    try:
        rest = config.parse_flags_or_exit(["train", f"--{key}={value}"])
        assert rest == ["train"]
        if key == "dtype":
            model.get_dtype(config.FLAGS.dtype, "--dtype")
    except SystemExit as e:
        assert e.code == 2
    except ValueError as e:
        assert "--dtype" in str(e)
    finally:
        config.FLAGS.unparse_flags()
    assert train_config.DEFAULTS["seed"] == 42
