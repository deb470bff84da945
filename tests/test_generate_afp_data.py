"""AFP data generation: the original's file replayed with Python's `random`, directions, pairing,
repeat counts, determinism, naming, input errors."""

import collections
import json
import random
import re
from pathlib import Path

import pytest

from easylm_align.tools import generate_afp_data as gen

ASSET = Path(gen.__file__).resolve().parents[1] / "assets" / "afp_sample.jsonl"
LANG_OF_NAME = {name: code for code, name in gen.LANG_NAMES.items()}


@pytest.fixture(scope="module")
def instruct(test_data):
    return gen.load_aligned(test_data / "instruct_x", ["en", "zh"])


def _index(data):
    """{(lang, prompt head): [record index]} to trace samples back to records."""
    out = {}
    for lang, records in data.items():
        for i, r in enumerate(records):
            head = f"{r['instruction']} {r['input']}" if r["input"] else r["instruction"]
            out.setdefault((lang, head), []).append(i)
    return out


def _trace(sample, data, index):
    """The record index a cross-lingual instruction sample was built from (prompt in its source
    language, output from the same record in the target language named in the prompt)."""
    prompt = sample["clm_text"][: sample["clm_prompt_len"]]
    m = re.search(r" Answer in (\w+): $", prompt)
    assert m, prompt
    tgt = LANG_OF_NAME[m.group(1)]
    output = sample["clm_text"][sample["clm_prompt_len"] :]
    matches = [
        i for lang in data for i in index.get((lang, prompt[: m.start()]), []) if data[tgt][i]["output"] == output
    ]
    assert matches, sample["clm_text"][:100]
    return matches[0]


def _replay_bilingual(en, zh, seed, cross, repeat):
    """AFP's generate_sup_data.py bilingual mode, replayed from its documented draws with the
    module-level `random`: one random() per kept pair (its swap draw, probability 0), shuffle the
    pairs, shuffle int(r)+1 copies of the indices, then per index randint for the source language,
    random() < x for a crossed target (randint over the one other language), the next pair
    (reshuffled after each pass); stop after int(r*N)+1 samples; shuffle; dump."""
    random.seed(seed)
    names = {"en": "English", "zh": "Chinese"}
    data = {"en": en, "zh": zh}
    trans = []
    for a, b in zip(en, zh):
        if a["instruction"] and b["instruction"] and a["instruction"] != b["instruction"]:
            random.random()
            trans.append([a["instruction"], b["instruction"]])
    random.shuffle(trans)
    ids = [i % len(en) for i in range(len(en) * (int(repeat) + 1))]
    random.shuffle(ids)
    out, cursor = [], 0
    for i in ids:
        src = ["en", "zh"][random.randint(0, 1)]
        tgt = src
        if random.random() < cross:
            rest = [lang for lang in ("en", "zh") if lang != src]
            tgt = rest[random.randint(0, len(rest) - 1)]
        record = data[src][i]
        head = f"{record['instruction']} {record['input']}" if record["input"] else record["instruction"]
        output = data[tgt][i]["output"]
        text = f"{head} Answer in {names[tgt]}: {output}"
        out.append({"sent0": trans[cursor][0], "sent1": trans[cursor][1], "clm_text": text,
                    "clm_prompt_len": len(text) - len(output)})
        cursor += 1
        if cursor >= len(trans):
            random.shuffle(trans)
            cursor = 0
        if len(out) > int(repeat * len(en)):
            break
    random.shuffle(out)
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in out).encode("utf-8")


def _replay_translation(pairs, seed, change, repeat):
    """generate_sup_data.py's translation mode replayed the same way: random() < c swaps the pair,
    randint picks one of the two prompt formats."""
    random.seed(seed)
    ids = [i % len(pairs) for i in range(len(pairs) * (int(repeat) + 1))]
    random.shuffle(ids)
    out = []
    for i in ids:
        src, tgt, lang = pairs[i][0], pairs[i][1], "Chinese"
        if random.random() < change:
            src, tgt, lang = tgt, src, "English"
        text = [f"{src} Translate into {lang}: {tgt}", f"{src} = {tgt}"][random.randint(0, 1)]
        out.append({"sent0": src, "sent1": tgt, "clm_text": text, "clm_prompt_len": len(text) - len(tgt)})
        if len(out) > int(repeat * len(pairs)):
            break
    random.shuffle(out)
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in out).encode("utf-8")


@pytest.mark.parametrize("seed, cross, repeat", [(0, 0.5, 3.0), (5, 0.3, 1.5)])
def test_bilingual_file_is_the_originals(test_data, instruct, tmp_path, seed, cross, repeat):
    assert gen.main(["-m", "bilingual", "-l", "en", "zh", "-x", str(cross), "-r", str(repeat), "-s", str(seed),
                     "-b", str(test_data / "instruct_x"), "-o", str(tmp_path)]) == 0
    written = (tmp_path / f"AFP.en_zh.X{cross}.R{repeat}.json").read_bytes()
    assert written == _replay_bilingual(instruct["en"], instruct["zh"], seed, cross, repeat)
    assert written.count(b"\n") == int(repeat * len(instruct["en"])) + 1


def test_translation_file_is_the_originals(test_data, tmp_path):
    path = test_data / "parallel" / "tatoeba.en-zh.tsv"
    assert gen.main(["-m", "translation", "-l", "en", "zh", "-c", "0.4", "-r", "2.5", "-s", "1", "-t", str(path),
                     "-o", str(tmp_path)]) == 0
    written = (tmp_path / "AFP.en-zh-trans.C0.4.R2.5.json").read_bytes()
    assert written == _replay_translation(gen.read_translation_file(path, "en", "zh"), 1, 0.4, 2.5)


def test_exact_repeat_flag(test_data, tmp_path):
    assert gen.main(["-r", "3", "--exact-repeat", "-b", str(test_data / "instruct_x"), "-o", str(tmp_path)]) == 0
    assert len((tmp_path / "AFP.en_zh.X0.5.R3.0.json").read_text(encoding="utf-8").splitlines()) == 3 * 200


@pytest.mark.parametrize("cross", [0.5, 0.2])
def test_bilingual_direction_frequencies(test_data, instruct, cross):
    stats = collections.Counter()
    samples = gen.generate(  # 200 records × 15: 3000 samples, enough for the tolerance below
        "bilingual", ["en", "zh"], bactrian_dir=test_data / "instruct_x",
        cross_probability=cross, repeat=15, seed=1, stats=stats,
    )
    n = len(instruct["en"])
    assert len(samples) == 15 * n + 1 == sum(stats.values())
    expected = {"en->zh": cross / 2, "zh->en": cross / 2, "en->en": (1 - cross) / 2, "zh->zh": (1 - cross) / 2}
    assert set(stats) == set(expected)
    for direction, p in expected.items():
        assert abs(stats[direction] / len(samples) - p) < 0.02, (direction, stats)
    # The target language named in the text agrees with the counts.
    to_zh = sum(" Answer in Chinese: " in s["clm_text"][: s["clm_prompt_len"]] for s in samples)
    assert to_zh == stats["en->zh"] + stats["zh->zh"]


def test_bilingual_samples_come_from_aligned_records(test_data, instruct):
    samples = gen.generate("bilingual", ["en", "zh"], bactrian_dir=test_data / "instruct_x", repeat=3, seed=0,
                           exact_repeat=True)
    pairs = {(a["instruction"], b["instruction"]) for a, b in zip(instruct["en"], instruct["zh"])}
    index = _index(instruct)
    uses = collections.Counter()
    for s in samples:
        assert (s["sent0"], s["sent1"]) in pairs  # pivot (en) first, same id
        assert set(s) == {"sent0", "sent1", "clm_text", "clm_prompt_len"}
        uses[_trace(s, instruct, index)] += 1
    # repeat=3 with exact_repeat: every record is used exactly three times.
    assert set(uses.values()) == {3} and len(uses) == len(instruct["en"])
    # The original's repeat: 4 shuffled copies, the first 3N+1 used, so records are used 0 to 4 times.
    default = gen.generate("bilingual", ["en", "zh"], bactrian_dir=test_data / "instruct_x", repeat=3, seed=0)
    uses = collections.Counter(_trace(s, instruct, index) for s in default)
    assert len(default) == 3 * len(instruct["en"]) + 1 and max(uses.values()) == 4
    assert len(uses) < len(instruct["en"])  # some record is never used


def test_fractional_repeat_uses_distinct_records(test_data, instruct):
    samples = gen.generate("bilingual", ["en", "zh"], bactrian_dir=test_data / "instruct_x", repeat=0.3, seed=3,
                           exact_repeat=True)
    n = len(instruct["en"])
    assert len(samples) == int(0.3 * n)
    index = _index(instruct)
    used = [_trace(s, instruct, index) for s in samples]
    assert len(set(used)) == len(used)


def test_translation_mode(test_data):
    path = test_data / "parallel" / "tatoeba.en-zh.tsv"
    pairs = set(gen.read_translation_file(path, "en", "zh"))
    assert len(pairs) == 200
    stats = collections.Counter()
    samples = gen.generate("translation", ["en", "zh"], translation_file=path, change_probability=0.3,
                           repeat=15, seed=0, stats=stats)
    assert len(samples) == 3001
    assert abs(stats["zh->en"] / 3001 - 0.3) < 0.03 and stats["en->zh"] + stats["zh->en"] == 3001
    formats = collections.Counter()
    for s in samples:
        assert (s["sent0"], s["sent1"]) in pairs or (s["sent1"], s["sent0"]) in pairs
        prompt = s["clm_text"][: s["clm_prompt_len"]]
        assert s["clm_text"][s["clm_prompt_len"] :] == s["sent1"]
        assert prompt.startswith(s["sent0"] + " ")
        formats["=" if prompt.endswith(" = ") else "translate"] += 1
        if not prompt.endswith(" = "):
            lang = "Chinese" if (s["sent0"], s["sent1"]) in pairs else "English"
            assert prompt == f"{s['sent0']} Translate into {lang}: "
    assert abs(formats["="] / 3001 - 0.5) < 0.03


def test_translation_file_with_language_header(test_data):
    pairs = gen.read_translation_file(test_data / "parallel" / "pud.en-hi-th-zh.tsv", "th", "hi")
    assert len(pairs) == 50
    assert pairs[0][1].startswith("“संयुक्त") and pairs[0][0].startswith("“แม้ว่า")


def _write_bx(directory, lang, records):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{lang}.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")


def _records(lang, n, prefix=""):
    return [
        {"instruction": f"{prefix}instr {lang} {i}", "input": f"in {lang} {i}" if i % 2 else "",
         "id": f"alpaca-{i:05d}", "output": f"out {lang} {i}"}
        for i in range(n)
    ]


def test_crosslingual_direction_frequencies(tmp_path):
    for lang in ("en", "zh", "hi"):
        _write_bx(tmp_path, lang, _records(lang, 400))
    stats = collections.Counter()
    samples = gen.generate("crosslingual", ["en", "zh", "hi"], bactrian_dir=tmp_path, cross_probability=0.5,
                           change_probability=0.5, repeat=10, seed=0, stats=stats)
    assert len(samples) == 4001
    expected = {"en->en": 1 / 6, "zh->zh": 1 / 6, "hi->hi": 1 / 6,
                "en->zh": 0.125, "zh->en": 0.125, "en->hi": 0.125, "hi->en": 0.125}
    assert set(stats) == set(expected)  # never between two non-pivot languages
    for direction, p in expected.items():
        assert abs(stats[direction] / 4001 - p) < 0.025, (direction, stats)
    for s in samples:  # pairs: pivot first, aligned by id
        m = re.fullmatch(r"instr en (\d+)", s["sent0"])
        assert m and re.fullmatch(rf"instr (zh|hi) {m.group(1)}", s["sent1"])


def test_same_seed_same_file_and_names(test_data, tmp_path):
    argv = ["--mode", "bilingual", "--languages", "en", "zh", "--cross-probability", "0.5", "--repeat", "3",
            "--bactrian-dir", str(test_data / "instruct_x")]
    for out, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert gen.main([*argv, "--output-dir", str(tmp_path / out), "--seed", seed]) == 0
    files = [tmp_path / d / "AFP.en_zh.X0.5.R3.0.json" for d in "abc"]
    assert files[0].read_bytes() == files[1].read_bytes() != files[2].read_bytes()
    lines = files[0].read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 * 200 + 1 and json.loads(lines[0])["clm_text"]
    trans = ["--mode", "translation", "--languages", "en", "zh", "--change-probability", "0.5", "--repeat", "3",
             "--translation-file", str(test_data / "parallel" / "tatoeba.en-zh.tsv"), "--output-dir", str(tmp_path)]
    assert gen.main(trans) == 0 and (tmp_path / "AFP.en-zh-trans.C0.5.R3.0.json").is_file()


@pytest.mark.parametrize(
    "mode, langs, expected",
    [
        ("bilingual", ["en", "zh"], "AFP.en_zh.X0.5.R3.0.json"),
        ("crosslingual", ["en", "zh", "ar"], "AFP.en_zh_ar.X0.5.C0.5.R3.0.json"),
        ("translation", ["en", "zh"], "AFP.en-zh-trans.C0.5.R3.0.json"),
    ],
)
def test_output_filename(mode, langs, expected):
    assert gen.output_filename(mode, langs, 0.5, 0.5, 3) == expected


def test_asset_is_reproducible(shared_data):
    """easylm_align/assets/afp_sample.jsonl is this command's output (see assets/README.md)."""
    samples = gen.generate("bilingual", ["en", "zh"], bactrian_dir=shared_data / "instruct_x",
                           cross_probability=0.5, repeat=0.1, seed=0)
    expected = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    assert ASSET.read_text(encoding="utf-8") == expected


# ---------------------------------------------------------------------------- input errors


def test_mismatched_ids_name_file_and_line(tmp_path):
    en, zh = _records("en", 5), _records("zh", 5)
    zh[3]["id"] = "alpaca-99999"
    _write_bx(tmp_path, "en", en)
    _write_bx(tmp_path, "zh", zh)
    line = next(i for i, t in enumerate((tmp_path / "zh.json").read_text().splitlines(), 1) if "alpaca-99999" in t)
    with pytest.raises(gen.DataError, match=rf"zh\.json:{line - 3}: id 'alpaca-99999' does not occur in .*en\.json"):
        gen.generate("bilingual", ["en", "zh"], bactrian_dir=tmp_path)


def test_missing_id_in_other_language_names_pivot_line(tmp_path):
    en, zh = _records("en", 5), _records("zh", 4)
    _write_bx(tmp_path, "en", en)
    _write_bx(tmp_path, "zh", zh)
    line = next(i for i, t in enumerate((tmp_path / "en.json").read_text().splitlines(), 1) if "alpaca-00004" in t)
    with pytest.raises(gen.DataError, match=rf"en\.json:{line - 3}: id 'alpaca-00004' does not occur in .*zh\.json"):
        gen.generate("bilingual", ["en", "zh"], bactrian_dir=tmp_path)


def test_duplicate_id_and_bad_json(tmp_path):
    en = _records("en", 3)
    en[2]["id"] = en[0]["id"]
    _write_bx(tmp_path, "en", en)
    _write_bx(tmp_path, "zh", _records("zh", 3))
    with pytest.raises(gen.DataError, match=r"en\.json:\d+: duplicate id 'alpaca-00000' \(first at line 2\)"):
        gen.generate("bilingual", ["en", "zh"], bactrian_dir=tmp_path)
    good = '{"id": "a", "instruction": "x",\n   "input": "", "output": "y"\n  }'
    (tmp_path / "en.json").write_text(f"[\n  {good},\n  {{oops}}\n]")
    with pytest.raises(gen.DataError, match=r"en\.json:5: invalid JSON"):
        gen.read_instruction_file(tmp_path / "en.json")
    (tmp_path / "en.json").write_text('[\n  {"id": "a", "instruction": "x", "input": null}\n]')
    with pytest.raises(gen.DataError, match=r"en\.json:2: record lacks a string field 'output'"):
        gen.read_instruction_file(tmp_path / "en.json")


def test_tsv_line_without_tab(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("Hello.\t你好。\nGood night.\t晚安。\nno tab here\n", encoding="utf-8")
    with pytest.raises(gen.DataError, match=r"pairs\.tsv:3: no tab"):
        gen.generate("translation", ["en", "zh"], translation_file=path)
    path.write_text("a\tb\tc\n", encoding="utf-8")
    with pytest.raises(gen.DataError, match=r"pairs\.tsv:1: expected 2 tab-separated fields, got 3"):
        gen.read_translation_file(path, "en", "zh")


def test_missing_files_and_bad_arguments(tmp_path, capsys):
    _write_bx(tmp_path, "en", _records("en", 2))
    with pytest.raises(gen.DataError, match=r"zh\.json"):
        gen.generate("bilingual", ["en", "zh"], bactrian_dir=tmp_path)
    with pytest.raises(gen.DataError, match=r"nope\.tsv"):
        gen.generate("translation", ["en", "zh"], translation_file=tmp_path / "nope.tsv")
    with pytest.raises(ValueError, match=r"unknown language code 'xx'"):
        gen.generate("bilingual", ["en", "xx"], bactrian_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly 2 languages"):
        gen.generate("bilingual", ["en", "zh", "hi"], bactrian_dir=tmp_path)
    with pytest.raises(ValueError, match="3 or more"):
        gen.generate("crosslingual", ["en", "zh"], bactrian_dir=tmp_path)
    with pytest.raises(ValueError, match=r"cross_probability must be in \[0, 1\]"):
        gen.generate("bilingual", ["en", "zh"], bactrian_dir=tmp_path, cross_probability=1.5)
    assert gen.main(["--languages", "en", "zh", "--bactrian-dir", str(tmp_path), "--output-dir", str(tmp_path)]) == 2
    assert "zh.json" in capsys.readouterr().err
    assert gen.language_name("el") == "Greek" and gen.language_name("th") == "Thai"
