"""COMMIT code-mixing: dictionary loading, mixing semantics, determinism, the CLI tool and the
Alpaca templates, on the real MUSE en-hi dictionary and Alpaca data where it matters."""

import functools
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from easylm_align.alpaca_templates import (
    ALPACA_TEMPLATES,
    get_alpaca_template,
    template_parts,
)
from easylm_align.codemix import CodeMixer, DictionaryError, MixStats, load_muse_dictionary

REPO_ROOT = Path(__file__).resolve().parents[1]

SMALL_DICT = {"water": ("पानी",), "cold": ("ठंडा",), "is": ("है",)}


@pytest.fixture(scope="module")
def en_hi():
    return load_muse_dictionary(REPO_ROOT / "dicts" / "en-hi.txt")  # the full MUSE file, as in the shared data


@pytest.fixture(scope="module")
def alpaca_texts(shared_data):
    with open(shared_data / "alpaca" / "alpaca_data.json", encoding="utf-8") as f:
        records = json.load(f)[:3000]
    return [[r["instruction"], r["input"], r["output"]] for r in records]


@pytest.fixture(scope="module")
def alpaca_sample(test_data):
    """200 real Alpaca records shipped in tests/data (for tests that need no statistics)."""
    records = json.loads((test_data / "instruct_x" / "en.json").read_text(encoding="utf-8"))
    return [[r["instruction"], r["input"], r["output"]] for r in records]


def _skeleton(text):
    """The whitespace runs of ``text``, in order."""
    return re.findall(r"\s+", text)


# --- mixing semantics -------------------------------------------------------------------------


def test_punctuation_around_a_word_survives():
    mixer = CodeMixer(SMALL_DICT, ratio=1.0)
    text = '"water," he said: (cold)… «water» ¿water? —cold— [water]. water\'s ©water'
    # Symbols (©, category So) are not skip characters, inner apostrophes stay in the core.
    assert mixer.mix(text, 0) == '"पानी," he said: (ठंडा)… «पानी» ¿पानी? —ठंडा— [पानी]. water\'s ©water'


def test_punctuation_only_tokens_are_not_words():
    mixed, stats = CodeMixer(SMALL_DICT, ratio=1.0).mix_fields(["-- water ... ¡! is"], 0)
    assert mixed == ["-- पानी ... ¡! है"]
    assert stats == MixStats(words_seen=2, words_in_dict=2, words_replaced=2)


def test_whitespace_split_flag_preserves_whitespace_exactly():
    mixer = CodeMixer(SMALL_DICT, ratio=1.0, whitespace_split=True)
    text = "  water\tis\n\ncold \u00a0water\r\n  is\u2003cold  "
    mixed = mixer.mix(text, 7)
    assert mixed == "  पानी\tहै\n\nठंडा \u00a0पानी\r\n  है\u2003ठंडा  "
    assert _skeleton(mixed) == _skeleton(text)


def test_words_not_in_dictionary_are_untouched():
    mixer = CodeMixer(SMALL_DICT, ratio=1.0)
    text = "The river water is very cold today, isn't it?"
    mixed = mixer.mix(text, 3)
    assert mixed == "The river पानी है very ठंडा today, isn't it?"


def test_lookup_is_exact_by_default():
    mixer = CodeMixer({"apple": ("a1",), "Apple": ("A1",), "water": ("w",)}, ratio=1.0)
    mixed, stats = mixer.mix_fields(["Apple apple APPLE (Apple) Water"], 0)
    assert mixed == ["A1 a1 APPLE (A1) Water"]
    assert stats == MixStats(words_seen=5, words_in_dict=3, words_replaced=3)


def test_lowercase_fallback_flag_tries_the_exact_form_first():
    mixer = CodeMixer({"apple": ("a1",), "Apple": ("A1",)}, ratio=1.0, lowercase_fallback=True)
    assert mixer.mix("Apple apple APPLE (Apple)", 0) == "A1 a1 a1 (A1)"


def test_ratio_zero_is_identity_and_ratio_one_replaces_every_dictionary_word(alpaca_sample):
    examples = alpaca_sample
    identity = CodeMixer(SMALL_DICT, ratio=0.0)
    # Markers that cannot occur in Alpaca show which words were replaced.
    vocab = {w.lower().strip(".,;:!?\"'()") for ts in examples for t in ts for w in t.split()}
    marker_dict = {w: (f"⟦{i}⟧",) for i, w in enumerate(sorted(vocab)) if w and i % 2 == 0}
    full = CodeMixer(marker_dict, ratio=1.0)
    zero = CodeMixer(marker_dict, ratio=0.0)
    for index, texts in enumerate(examples):
        assert identity.mix_fields(texts, index)[0] == texts
        unchanged, zero_stats = zero.mix_fields(texts, index)
        assert unchanged == texts and zero_stats.words_replaced == 0
        mixed, stats = full.mix_fields(texts, index)
        assert stats.words_replaced == stats.words_in_dict == zero_stats.words_in_dict
        assert sum(t.count("⟦") for t in mixed) == stats.words_replaced
        assert [_skeleton(t) for t in mixed] == [_skeleton(t) for t in texts]


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_replaced_fraction_matches_ratio_on_alpaca(en_hi, alpaca_texts, ratio):
    mixer = CodeMixer(en_hi, ratio=ratio, seed=1)
    stats = sum(mixer.mix_fields(texts, i)[1] for i, texts in enumerate(alpaca_texts))
    assert stats.words_in_dict > 50_000  # the dictionary covers a good share of Alpaca
    assert abs(stats.replaced_ratio - ratio) < 0.01, stats


def test_translations_are_chosen_uniformly():
    mixer = CodeMixer({"word": ("x", "y", "z")}, ratio=0.5)
    counts = Counter(mixer.mix(" ".join(["word"] * 30_000), 0).split())
    assert abs(counts["word"] / 30_000 - 0.5) < 0.015
    for choice in "xyz":
        assert abs(counts[choice] / 15_000 - 1 / 3) < 0.02, counts


def test_mix_stats_add_and_sum():
    a, b = MixStats(3, 2, 1), MixStats(10, 5, 4)
    assert a + b == MixStats(13, 7, 5)
    assert sum([a, b]) == MixStats(13, 7, 5)
    assert sum([], MixStats()) == MixStats(0, 0, 0)
    assert MixStats(10, 4, 1).replaced_ratio == 0.25 and MixStats().replaced_ratio == 0.0


@pytest.mark.parametrize("ratio", [-0.1, 1.01, math.nan])
def test_ratio_out_of_range_is_rejected(ratio):
    with pytest.raises(ValueError, match="codemix_ratio"):
        CodeMixer(SMALL_DICT, ratio=ratio)


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_and_index_give_the_same_output_in_any_call_order(en_hi, alpaca_sample):
    examples = alpaca_sample
    forward = CodeMixer(en_hi, ratio=0.5, seed=3)
    backward = CodeMixer(en_hi, ratio=0.5, seed=3)
    expected = [forward.mix_fields(texts, i) for i, texts in enumerate(examples)]
    got = [backward.mix_fields(examples[i], i) for i in reversed(range(len(examples)))]
    assert got[::-1] == expected
    other_seed = CodeMixer(en_hi, ratio=0.5, seed=4)
    assert [other_seed.mix_fields(t, i)[0] for i, t in enumerate(examples)] != [
        e[0] for e in expected
    ]


def test_different_indices_mix_independently():
    words = [f"w{i}" for i in range(4000)]
    mixer = CodeMixer({w: (w.upper(),) for w in words}, ratio=0.5)
    text = " ".join(words)

    def decisions(index):
        return [w.isupper() for w in mixer.mix(text, index).split()]

    first, second = decisions(0), decisions(1)
    agreement = sum(a == b for a, b in zip(first, second)) / len(words)
    assert abs(agreement - 0.5) < 0.04  # independent fair coins agree half the time
    assert abs(sum(first) / len(words) - 0.5) < 0.04


def test_mix_fields_draws_across_fields_like_one_text():
    mixer = CodeMixer(SMALL_DICT, ratio=0.5, seed=9)
    fields = ["water is cold " * 20, "cold water " * 20]
    mixed, stats = mixer.mix_fields(fields, 11)
    assert mixer.mix_fields(fields, 11) == (mixed, stats)
    assert stats.words_seen == stats.words_in_dict == 100
    assert mixer.mix(fields[0], 11) == mixed[0]


# --- dictionary loading ---------------------------------------------------------------------


def test_load_dictionary_formats(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(
        "# a comment\nthe\tदी\n\nwater पानी\nwater जल\nwater पानी\n  cold  ठंडा  \n",
        encoding="utf-8",
    )
    # A duplicate pair is kept, as the reference's load_dict keeps it (twice as likely).
    assert load_muse_dictionary(path) == {
        "the": ("दी",),
        "water": ("पानी", "जल", "पानी"),
        "cold": ("ठंडा",),
    }


def test_shipped_dictionaries_have_no_duplicate_pairs():
    # So keeping duplicates (the reference's behaviour) changes nothing with them.
    for path in sorted((REPO_ROOT / "dicts").glob("*.txt")):
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(set(lines)) == len(lines), path.name


def test_dictionary_is_cached_and_reloaded_when_changed(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("a b\n", encoding="utf-8")
    first = load_muse_dictionary(path)
    assert load_muse_dictionary(str(path)) is first
    path.write_text("a b\nc d\n", encoding="utf-8")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert load_muse_dictionary(path) == {"a": ("b",), "c": ("d",)}


def test_missing_dictionary(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DictionaryError, match=re.escape(str(path))):
        load_muse_dictionary(path)


def test_empty_dictionary(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(DictionaryError, match=re.escape(f"{path}: dictionary is empty")):
        load_muse_dictionary(path)


@pytest.mark.parametrize("bad_line, columns", [("lonely", 1), ("a b c", 3)])
def test_malformed_dictionary_line(tmp_path, bad_line, columns):
    path = tmp_path / "bad.txt"
    path.write_text(f"a b\n\n{bad_line}\nc d\n", encoding="utf-8")
    with pytest.raises(DictionaryError) as info:
        load_muse_dictionary(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: expected two columns") and f"got {columns}" in message
    assert isinstance(info.value, ValueError)


def test_real_dictionaries_load():  # load speed is a benchmark's business, not a timed test's
    en_el = load_muse_dictionary(REPO_ROOT / "dicts" / "en-el.txt")  # 56k lines
    assert len(en_el) > 40_000 and all(isinstance(v, tuple) and v for v in en_el.values())


def test_repo_dictionaries_match_shared_data(shared_data):
    for name in ("en-hi", "hi-en", "en-el", "el-en", "en-th", "th-en", "en-zh", "zh-en"):
        shipped = (REPO_ROOT / "dicts" / f"{name}.txt").read_bytes()
        assert shipped == (shared_data / "dicts" / f"{name}.txt").read_bytes(), name


# --- command-line tool ----------------------------------------------------------------------


def _run_tool(*args):
    return subprocess.run(
        [sys.executable, "-m", "easylm_align.tools.codemix_file", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONHASHSEED": "123"},  # hashing must not matter
        timeout=60,
    )


def test_tool_mixes_text_and_jsonl_like_the_library(tmp_path, en_hi, alpaca_sample):
    dict_path = REPO_ROOT / "dicts" / "en-hi.txt"
    lines = [t[2] for t in alpaca_sample[:50] if "\n" not in t[2]]
    text_in, text_out = tmp_path / "in.txt", tmp_path / "out.txt"
    text_in.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = _run_tool(f"--dict={dict_path}", "--ratio=0.5", "--seed=2",
                       f"--input={text_in}", f"--output={text_out}")
    assert result.returncode == 0, result.stderr
    mixer = CodeMixer(en_hi, ratio=0.5, seed=2)
    expected = [mixer.mix(line + "\n", i) for i, line in enumerate(lines)]
    assert text_out.read_text(encoding="utf-8") == "".join(expected)
    stats = sum(mixer.mix_fields([line + "\n"], i)[1] for i, line in enumerate(lines))
    assert f"words seen:               {stats.words_seen:,}" in result.stdout
    assert f"words replaced:           {stats.words_replaced:,}" in result.stdout
    assert f"replaced / in dictionary: {stats.replaced_ratio:.4f}" in result.stdout

    records = [
        {"id": i, "instruction": t[0], "output": t[2]} for i, t in enumerate(alpaca_sample[:40])
    ]
    jsonl_in, jsonl_out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    jsonl_in.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = _run_tool(f"--dict={dict_path}", "--ratio=0.9", f"--input={jsonl_in}",
                       f"--output={jsonl_out}", "--field=instruction,output")
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in jsonl_out.read_text(encoding="utf-8").splitlines()]
    mixer = CodeMixer(en_hi, ratio=0.9, seed=0)
    for i, (record, out) in enumerate(zip(records, got, strict=True)):
        instruction, output = mixer.mix_fields([record["instruction"], record["output"]], i)[0]
        assert out == {"id": i, "instruction": instruction, "output": output}


def test_tool_reports_bad_input_in_one_line(tmp_path):
    dict_path = REPO_ROOT / "dicts" / "en-hi.txt"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    missing = tmp_path / "missing.txt"
    cases = [
        ([f"--input={bad}"], f"{bad}:2: invalid JSON"),
        ([f"--input={missing}"], f"{missing}: input file not found"),
        ([f"--input={bad}", "--field=title"], f"{bad}:1: field 'title' is missing"),
    ]
    for extra, expected in cases:
        result = _run_tool(f"--dict={dict_path}", "--ratio=0.5",
                           f"--output={tmp_path / 'out'}", *extra)
        assert result.returncode != 0
        [line] = result.stderr.strip().splitlines()  # one line, no traceback
        assert line.startswith(f"codemix_file: error: {expected}"), line


# --- Alpaca templates -----------------------------------------------------------------------


def test_alpaca_templates_have_the_right_slots():
    assert set(ALPACA_TEMPLATES) == {"en", "hi", "el", "th", "zh"}
    assert ALPACA_TEMPLATES["en"].with_input.startswith(
        "Below is an instruction that describes a task, paired with an input"
    )
    values = {"instruction": "INSTR", "input": "INP"}
    for lang, template in ALPACA_TEMPLATES.items():
        for text, slots in ((template.with_input, ["instruction", "input"]),
                            (template.without_input, ["instruction"])):
            parts = template_parts(text)
            assert [slot for _, slot in parts if slot] == slots, lang
            # The reference's layout: the response header ends the prompt, no newline after it.
            assert parts[-1][1] is None and re.search(r"\n### \S+[:：]$", parts[-1][0]), lang
            rebuilt = "".join(literal + (values[slot] if slot else "") for literal, slot in parts)
            assert rebuilt == text.format(**values)


def test_unknown_alpaca_language():
    assert get_alpaca_template("hi") is ALPACA_TEMPLATES["hi"]
    with pytest.raises(ValueError, match="alpaca_lang 'xx'; available: el, en, hi, th, zh"):
        get_alpaca_template("xx")


def test_template_parts_rejects_formatted_slots():
    with pytest.raises(ValueError, match="plain name"):
        template_parts("### Instruction:\n{instruction!r}")


# --- the reference's word rule: edge cases and flags ------------------------------------------

EDGE_DICT = {"water": ("पानी",), "is": ("है",), "task": ("T",), "Write": ("W",), "response": ("R",)}


@pytest.mark.parametrize("text, reference, split_on_whitespace, words_seen", [
    ("", "", "", 0),
    ("...", "...", "...", 0),
    (" ", " ", " ", 0),
    ("  water  ", "  पानी  ", "  पानी  ", 1),
    # A piece glued to a newline is one word: its core is everything between the outer skip
    # characters, so "task.\n\nWrite" never matches and "response.\n\n###" is "response".
    ("water\n\nis", "water\n\nis", "पानी\n\nहै", 1),
    ("task.\n\nWrite", "task.\n\nWrite", "T.\n\nW", 1),
    ("response.\n\n### Write", "R.\n\n### W", "R.\n\n### W", 2),
    ("\twater,\n", "\tपानी,\n", "\tपानी,\n", 1),
    # Unicode Zs (no-break space, ideographic space) are skip characters at the edges...
    ("\u00a0water\u3000 is", "\u00a0पानी\u3000 है", "\u00a0पानी\u3000 है", 2),
    # ... and inside a piece they join it, as a newline does.
    ("water\u00a0is", "water\u00a0is", "पानी\u00a0है", 1),
    ("'(water)'. «is»", "'(पानी)'. «है»", "'(पानी)'. «है»", 2),
    ("—water— ¿is?", "—पानी— ¿है?", "—पानी— ¿है?", 2),
    # Control characters other than \t \n \r and symbols are not skip characters (but \v is
    # whitespace to the whitespace split).
    ("\x0bwater ©is", "\x0bwater ©is", "\x0bपानी ©is", 2),
    ("well-water is's", "well-water is's", "well-water is's", 2),
])
def test_word_rule_edge_cases(text, reference, split_on_whitespace, words_seen):
    mixed, stats = CodeMixer(EDGE_DICT, ratio=1.0).mix_fields([text], 0)
    assert mixed == [reference]
    assert stats.words_seen == words_seen
    assert stats.words_in_dict == stats.words_replaced == _reference_mix(EDGE_DICT, 1.0, text)[1]
    assert CodeMixer(EDGE_DICT, ratio=1.0, whitespace_split=True).mix(text, 0) == split_on_whitespace


def test_whitespace_split_counts_words_between_whitespace_runs():
    text = "water\n\nis\tcold\u00a0today  ..."
    assert CodeMixer(SMALL_DICT, 1.0).mix_fields([text], 0)[1] == MixStats(1, 0, 0)  # one piece
    assert CodeMixer(SMALL_DICT, 1.0, whitespace_split=True).mix_fields([text], 0)[1] == MixStats(4, 3, 3)


def test_defaults_are_the_references(tok_free_processor_config):
    mixer = CodeMixer(SMALL_DICT, 0.5)
    assert (mixer.lowercase_fallback, mixer.whitespace_split) == (False, False)
    cfg = tok_free_processor_config
    assert cfg.block_codemix_in_template is False  # EasyLM/COMMIT's TextProcessor default
    assert cfg.codemix_lowercase_fallback is False and cfg.codemix_whitespace_split is False


@pytest.fixture()
def tok_free_processor_config():
    from easylm_align.data import processors

    return processors.default_config()


@pytest.mark.parametrize("lowercase_fallback, whitespace_split", [(False, False), (True, True)])
def test_processor_flags_reach_the_mixer(tok_free_processor_config, lowercase_fallback,
                                         whitespace_split):
    from easylm_align.data import processors
    from easylm_align.tokenizer import DEMO_TOKENIZER, Tokenizer

    cfg = tok_free_processor_config
    cfg.update(dict(codemix_dict_path=str(REPO_ROOT / "dicts" / "en-hi.txt"), codemix_ratio=0.5,
                    codemix_lowercase_fallback=lowercase_fallback,
                    codemix_whitespace_split=whitespace_split))
    processor = processors.build(cfg, Tokenizer(str(DEMO_TOKENIZER)))
    assert processor.mixer.lowercase_fallback is lowercase_fallback
    assert processor.mixer.whitespace_split is whitespace_split


@pytest.mark.parametrize("recipe, blocked", [("commit", True), ("naive_codemix", False)])
def test_configs_set_template_blocking_explicitly(recipe, blocked):
    # The default is EasyLM's False, so a COMMIT run must say True itself.
    for lang in ("hi", "el", "th"):
        lines = (REPO_ROOT / "configs" / f"{recipe}_{lang}.flags").read_text().splitlines()
        assert f"--train_dataset.text_processor.block_codemix_in_template={blocked}" in lines, lang


def test_tool_passes_the_flags(tmp_path, en_hi):
    text = "Good water\n\nis Cold.\nWater  is good\n"
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text(text, encoding="utf-8")
    result = _run_tool(f"--dict={REPO_ROOT / 'dicts' / 'en-hi.txt'}", "--ratio=1.0",
                       f"--input={src}", f"--output={out}", "--lowercase_fallback",
                       "--whitespace_split")
    assert result.returncode == 0, result.stderr
    mixer = CodeMixer(en_hi, 1.0, lowercase_fallback=True, whitespace_split=True)
    expected = "".join(mixer.mix(line, i) for i, line in enumerate(text.splitlines(keepends=True)))
    assert out.read_text(encoding="utf-8") == expected
    assert not {"Good", "water", "Cold", "Water"} & set(re.findall(r"\w+", expected))
    assert "\n\n" in expected and "  " in expected


# --- parity with the reference's rule on Alpaca -----------------------------------------------
#
# An independent re-implementation of COMMIT's code-mixing (thnkinbtfly/COMMIT EasyLM/data.py:
# load_dict, codemix_sentence, codemix_word_considering_punct, codemix_word, and how alpaca()
# applies them), drawing from Python's `random` as the reference does.

REFERENCE_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
REFERENCE_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def _reference_skip(char):
    if char in (" ", "\t", "\n", "\r") or unicodedata.category(char) == "Zs":
        return True
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


@functools.lru_cache(maxsize=None)
def _reference_core(word):
    """(lead, core, trail) of a ' '-separated piece, or None when it is all skip characters."""
    start = 0
    while start < len(word) and _reference_skip(word[start]):
        start += 1
    if start == len(word):
        return None
    end = len(word)
    while _reference_skip(word[end - 1]):
        end -= 1
    return word[:start], word[start:end], word[end:]


def _reference_load(path):
    table = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        source, target = line.split("\t") if "\t" in line else line.split(" ")
        table.setdefault(source, []).append(target)
    return table


class ReferenceMixer:
    """codemix_sentence with a `random.Random(seed)` in place of the global state."""

    def __init__(self, table, ratio, seed=0):
        self.table, self.ratio, self.rng = table, ratio, random.Random(seed)
        self.eligible = self.replaced = 0

    def sentence(self, text):
        out = []
        for word in text.split(" "):
            parts = _reference_core(word)
            if parts is not None and parts[1] in self.table:
                self.eligible += 1
                if self.rng.random() < self.ratio:
                    self.replaced += 1
                    word = parts[0] + self.rng.choice(self.table[parts[1]]) + parts[2]
            out.append(word)
        return " ".join(out)

    def alpaca(self, record, block):
        """The reference's (prompt, output) of one record."""
        record = dict(record)
        if block:
            record["instruction"] = self.sentence(record["instruction"])
            if record.get("input", ""):
                record["input"] = self.sentence(record["input"])
        template = REFERENCE_PROMPT_INPUT if record.get("input", "") != "" else REFERENCE_PROMPT_NO_INPUT
        prompt = template.format_map(record)
        if not block:
            prompt = self.sentence(prompt)
        return prompt, self.sentence(record["output"])


def _reference_mix(table, ratio, text):
    mixer = ReferenceMixer(table, ratio)
    return mixer.sentence(text), mixer.eligible


def _our_alpaca(mixer, record, index, block):
    """What the Alpaca processor mixes: the fields (template kept) or the whole prompt."""
    template = get_alpaca_template("en")
    instruction, inp, output = record["instruction"], record["input"], record["output"]
    if block:
        (instruction, inp, output), stats = mixer.mix_fields([instruction, inp, output], index)
        prompt = (template.with_input if inp else template.without_input).format(
            instruction=instruction, input=inp)
    else:
        prompt = (template.with_input if inp else template.without_input).format(
            instruction=instruction, input=inp)
        (prompt, output), stats = mixer.mix_fields([prompt, output], index)
    return prompt, output, stats


def _mixed_words(record, block):
    """Whitespace-separated words of the texts a mode mixes: the denominator of the fractions."""
    if block:
        texts = [record["instruction"], record["input"], record["output"]]
    else:
        template = REFERENCE_PROMPT_INPUT if record["input"] else REFERENCE_PROMPT_NO_INPUT
        texts = [template.format_map(record), record["output"]]
    return sum(len(t.split()) for t in texts)


@pytest.fixture(scope="module")
def single_translation_table():
    """en-hi with each word's first translation only, so ratio 1.0 output is deterministic."""
    table = _reference_load(REPO_ROOT / "dicts" / "en-hi.txt")
    return {source: [targets[0]] for source, targets in table.items()}


@pytest.fixture(scope="module")
def shipped_alpaca():
    path = REPO_ROOT / "easylm_align" / "assets" / "alpaca_sample.json"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def alpaca_records(shared_data):
    with open(shared_data / "alpaca" / "alpaca_data.json", encoding="utf-8") as f:
        return json.load(f)[:3000]


def _assert_same_words_at_ratio_one(records, table, block):
    ours = CodeMixer({s: tuple(t) for s, t in table.items()}, ratio=1.0)
    total = 0
    for index, record in enumerate(records):
        reference = ReferenceMixer(table, 1.0)
        prompt, output, stats = _our_alpaca(ours, record, index, block)
        assert (prompt, output) == reference.alpaca(record, block), index
        assert stats.words_in_dict == stats.words_replaced == reference.eligible, index
        total += reference.eligible
    assert total > 10 * len(records)


@pytest.mark.parametrize("block", [True, False], ids=["blocked", "naive"])
def test_same_words_as_the_reference_at_ratio_one(shipped_alpaca, single_translation_table, block):
    _assert_same_words_at_ratio_one(shipped_alpaca, single_translation_table, block)


@pytest.mark.parametrize("block", [True, False], ids=["blocked", "naive"])
def test_same_words_as_the_reference_at_ratio_one_full(alpaca_records, single_translation_table,
                                                       block):
    _assert_same_words_at_ratio_one(alpaca_records, single_translation_table, block)


def _assert_replaced_fraction_matches(records, ratio, block, seeds):
    """Our realised replaced fraction of the mixed words is the reference's, within 1.5 points,
    over `records` mixed once per seed; the sample must make 1.5 points > 4 sd of the gap."""
    table = _reference_load(REPO_ROOT / "dicts" / "en-hi.txt")
    dictionary = load_muse_dictionary(REPO_ROOT / "dicts" / "en-hi.txt")
    words = ours_replaced = ours_eligible = ref_replaced = ref_eligible = 0
    for seed in seeds:
        ours, reference = CodeMixer(dictionary, ratio, seed=seed), ReferenceMixer(table, ratio, seed)
        for index, record in enumerate(records):
            stats = _our_alpaca(ours, record, index, block)[2]
            reference.alpaca(record, block)
            ours_replaced += stats.words_replaced
            ours_eligible += stats.words_in_dict
            words += _mixed_words(record, block)
        ref_replaced += reference.replaced
        ref_eligible += reference.eligible
    assert ours_eligible == ref_eligible
    # Both counts are Binomial(eligible, ratio), independently drawn.
    sd_of_gap = math.sqrt(2 * ratio * (1 - ratio) * ref_eligible) / words
    assert 4 * sd_of_gap < 0.015, f"sample too small: sd of the gap {sd_of_gap:.4f}"
    gap = abs(ours_replaced - ref_replaced) / words
    assert gap < 0.015, (ours_replaced / words, ref_replaced / words)


@pytest.mark.parametrize("block", [True, False], ids=["blocked", "naive"])
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_replaced_fraction_matches_the_reference(alpaca_records, ratio, block):
    _assert_replaced_fraction_matches(alpaca_records[:2000], ratio, block, seeds=[0])


@pytest.mark.parametrize("block", [True, False], ids=["blocked", "naive"])
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_replaced_fraction_matches_the_reference_on_shipped_records(shipped_alpaca, ratio, block):
    # 300 records are too few for one pass at ratio 0.5; four seeds make the sample big enough.
    _assert_replaced_fraction_matches(shipped_alpaca, ratio, block, seeds=[0, 1, 2, 3])


def test_flags_mix_more_words_than_the_reference(shipped_alpaca, en_hi):
    def eligible(**flags):
        mixer = CodeMixer(en_hi, 1.0, **flags)
        return sum(_our_alpaca(mixer, r, i, True)[2].words_in_dict for i, r in enumerate(shipped_alpaca))

    reference = eligible()
    assert eligible(lowercase_fallback=True) > reference * 1.05  # capitalised words
    assert eligible(whitespace_split=True) > reference  # words next to newlines
