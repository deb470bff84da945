"""Generate AFP training data: translation pairs for the contrastive loss + cross-lingual CLM text.

Re-implements the semantics and options of AFP's `src/generate_sup_data.py`
(chongli17/CrossLingualAlignment). Every output line is a JSON object with

* `sent0`, `sent1`: a translation pair (the contrastive positive pair; `sent0` is the pivot
  language side in the instruction modes, the source side in translation mode);
* `clm_text`: a cross-lingual instruction, `"{instruction} {input} Answer in {Language}: {output}"`
  (instruction/input in the source language, output in the target language), or a translation
  prompt, `"{src} Translate into {Language}: {tgt}"` / `"{src} = {tgt}"`;
* `clm_prompt_len`: the length of the prompt part of `clm_text`, **in Unicode code points**
  (Python `len`, not bytes, not tokens): `clm_text[:clm_prompt_len]` is the prompt (it ends with
  the space before the output) and `clm_text[clm_prompt_len:]` is the output the CLM loss is
  computed on. Trainers map it to tokens, e.g. by tokenizing both strings and taking the longest
  common token prefix as AFP's `train.py` does.

Modes (the first of `--languages` is the pivot language):

* `bilingual` (exactly 2 languages): the pairs are the two languages' `instruction` fields of
  the aligned records (pivot first), visited in a shuffled cycle. The CLM source language is
  drawn uniformly; with probability `--cross-probability` the output comes from the other
  language, so directions are en→zh, zh→en with p/2 each and en→en, zh→zh with (1-p)/2 each.
* `crosslingual` (3+ languages): each sample draws a non-pivot language `l` and a random
  pivot→`l` instruction pair. With probability 1-x the CLM text is monolingual in a uniformly
  drawn language; otherwise it is `l`→pivot with probability `--change-probability`, else pivot→`l`.
* `translation` (exactly 2 languages): pairs from `--translation-file`; with probability
  `--change-probability` the direction is swapped (both in the pair and in the prompt).

`--repeat r` is the original's: `int(r) + 1` copies of the N record indices are shuffled together
and the first `int(r * N) + 1` are used, so with `--repeat 3` records are used 0 to 4 times and
the file has 3N + 1 lines. `--exact-repeat` (not the original's) uses every record `int(r)` times
plus a random distinct subset for the fractional part: `int(r * N)` lines.

One `random.Random(seed)` makes the original's draws in the original's order (`random.seed(seed)`
and the module's functions there), including the draws whose outcome is fixed (the pairs'
reverse draw with probability 0, a target language picked from one), and the samples are shuffled
before they are written: with the same arguments and seed the file is the original's, byte for
byte, on the same Python.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from easylm_align.errors import ConfigError
from easylm_align.records import BadLines, DataError, json_records, tsv_rows

MODES = ("bilingual", "crosslingual", "translation")

# Bactrian-X's 52 languages (names as in AFP's lang_dict.py) plus Greek.
LANG_NAMES: dict[str, str] = {
    "af": "Afrikaans", "ar": "Arabic", "az": "Azerbaijani", "bn": "Bengali", "cs": "Czech",
    "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian",
    "fa": "Persian", "fi": "Finnish", "fr": "French", "gl": "Galician", "gu": "Gujarati",
    "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "id": "Indonesian", "it": "Italian",
    "ja": "Japanese", "ka": "Georgian", "kk": "Kazakh", "km": "Khmer", "ko": "Korean",
    "lt": "Lithuanian", "lv": "Latvian", "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian",
    "mr": "Marathi", "my": "Burmese", "ne": "Nepali", "nl": "Dutch", "pl": "Polish",
    "ps": "Pashto", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "si": "Sinhala",
    "sl": "Slovene", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu",
    "th": "Thai", "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu",
    "vi": "Vietnamese", "xh": "Xhosa", "zh": "Chinese",
}

CIF_FORMAT = "{instruction} {input} Answer in {tgt_lang}: "
CIF_NO_INPUT = "{instruction} Answer in {tgt_lang}: "
TRANSLATION_FORMATS = ("{src} Translate into {tgt_lang}: ", "{src} = ")


def language_name(code: str) -> str:
    """English name of a language code (used in "Answer in {name}")."""
    if code not in LANG_NAMES:
        raise ConfigError(f"unknown language code {code!r}; known codes: {', '.join(sorted(LANG_NAMES))}")
    return LANG_NAMES[code]


def output_filename(
    mode: str,
    languages: Sequence[str],
    cross_probability: float = 0.5,
    change_probability: float = 0.5,
    repeat: float = 1.0,
) -> str:
    """The original's file name; numbers print as Python floats (`R3.0`), as argparse gives them."""
    x, c, r = float(cross_probability), float(change_probability), float(repeat)
    if mode == "bilingual":
        return f"AFP.{'_'.join(languages)}.X{x}.R{r}.json"
    if mode == "crosslingual":
        return f"AFP.{'_'.join(languages)}.X{x}.C{c}.R{r}.json"
    if mode == "translation":
        return f"AFP.{languages[0]}-{languages[1]}-trans.C{c}.R{r}.json"
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def read_instruction_file(path: Path | str) -> list[tuple[int, dict]]:
    """Read a Bactrian-X style file: records with string `id`, `instruction`, `input`, `output`.

    Returns (line number, record) pairs; a null `input` becomes "" (Bactrian-X has some).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: instruction file not found")
    rows = []
    for row in json_records(path, BadLines()):
        record = row.value
        if record.get("input") is None:
            record["input"] = ""
        for key in ("id", "instruction", "input", "output"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{row.location}: record lacks a string field {key!r} (got {record.get(key)!r})")
        rows.append((row.line, record))
    if not rows:
        raise DataError(f"{path}:1: no records; expected a JSON list or JSON lines of instruction records")
    return rows


def load_aligned(bactrian_dir: Path | str, languages: Sequence[str]) -> dict[str, list[dict]]:
    """Load `{lang}.json` per language and align the records by `id` (sorted by id, as the original).

    Every language must hold exactly the same ids, each once.
    """
    bactrian_dir = Path(bactrian_dir)
    by_lang: dict[str, dict[str, tuple[int, dict]]] = {}
    for lang in languages:
        path = bactrian_dir / f"{lang}.json"
        ids: dict[str, tuple[int, dict]] = {}
        for lineno, record in read_instruction_file(path):
            if record["id"] in ids:
                raise DataError(f"{path}:{lineno}: duplicate id {record['id']!r} (first at line {ids[record['id']][0]})")
            ids[record["id"]] = (lineno, record)
        by_lang[lang] = ids
    pivot = languages[0]
    pivot_path = bactrian_dir / f"{pivot}.json"
    for lang in languages[1:]:
        path = bactrian_dir / f"{lang}.json"
        for rid, (lineno, _) in by_lang[lang].items():
            if rid not in by_lang[pivot]:
                raise DataError(f"{path}:{lineno}: id {rid!r} does not occur in {pivot_path}")
        for rid, (lineno, _) in by_lang[pivot].items():
            if rid not in by_lang[lang]:
                raise DataError(f"{pivot_path}:{lineno}: id {rid!r} does not occur in {path}")
    order = sorted(by_lang[pivot])
    return {lang: [by_lang[lang][rid][1] for rid in order] for lang in languages}


def read_translation_file(path: Path | str, src: str, tgt: str) -> list[tuple[str, str]]:
    """Read `src<TAB>tgt` pairs (no header), or the `src`/`tgt` columns of a TSV whose header
    names languages (e.g. `sent_id en hi th zh`). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: translation file not found")
    pairs = []
    columns = (0, 1)
    n_fields = 2
    for row in tsv_rows(path, BadLines()):
        fields = row.value
        if row.line == 1 and src in fields and tgt in fields:
            columns, n_fields = (fields.index(src), fields.index(tgt)), len(fields)
            continue
        if len(fields) == 1:
            raise DataError(f"{row.location}: no tab: expected tab-separated sentences")
        if len(fields) != n_fields:
            raise DataError(f"{row.location}: expected {n_fields} tab-separated fields, got {len(fields)}")
        pair = (fields[columns[0]].strip(), fields[columns[1]].strip())
        if not all(pair):
            raise DataError(f"{row.location}: empty sentence")
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}:1: no sentence pairs; expected lines of tab-separated sentences")
    return pairs


def _sample_indices(num_records: int, repeat: float, rng: random.Random, exact: bool) -> list[int]:
    """The record indices to visit, in order (module docstring). The original's: `int(repeat) + 1`
    shuffled copies (argparse makes `repeat` a float), of which it uses `int(repeat * n) + 1`
    before it stops. Exact: each record `int(repeat)` times plus a distinct random subset."""
    if not exact:
        indices = [i % num_records for i in range(num_records * (int(repeat) + 1))]
        rng.shuffle(indices)
        return indices[:int(repeat * num_records) + 1]
    total = int(repeat * num_records)
    whole = int(repeat)
    indices = [i for _ in range(whole) for i in range(num_records)]
    indices += rng.sample(range(num_records), total - whole * num_records)
    rng.shuffle(indices)
    return indices


def _pick(items: Sequence, rng: random.Random):
    """The original's `get_random_item`: `randint` over the indices."""
    return items[rng.randint(0, len(items) - 1)]


def _instruction_pairs(data: dict[str, list[dict]], pivot: str, other: str,
                       rng: random.Random) -> list[tuple[str, str]]:
    """(pivot, other) instruction translations; empty or untranslated (identical) ones are skipped.
    Each kept pair costs one `random()`: the original's swap draw, with probability 0."""
    pairs = []
    for a, b in zip(data[pivot], data[other]):
        if a["instruction"] and b["instruction"] and a["instruction"] != b["instruction"]:
            rng.random()
            pairs.append((a["instruction"], b["instruction"]))
    return pairs


def _cif_sample(data: dict[str, list[dict]], index: int, src: str, tgt: str, pair: tuple[str, str]) -> dict:
    """One cross-lingual instruction-following sample: instruction/input in src, output in tgt."""
    record = data[src][index]
    template = CIF_FORMAT if record["input"] else CIF_NO_INPUT
    prompt = template.format(
        instruction=record["instruction"], input=record["input"], tgt_lang=language_name(tgt)
    )
    return {
        "sent0": pair[0],
        "sent1": pair[1],
        "clm_text": prompt + data[tgt][index]["output"],
        "clm_prompt_len": len(prompt),
    }


def _build_bilingual(
    data: dict[str, list[dict]], languages: list[str], cross_probability: float, repeat: float,
    rng: random.Random, stats: collections.Counter, exact: bool,
) -> list[dict]:
    pivot, other = languages
    pairs = _instruction_pairs(data, pivot, other, rng)
    if not pairs:
        raise ValueError(f"no {pivot}/{other} instruction pairs (all empty or identical)")
    rng.shuffle(pairs)
    samples, cursor = [], 0
    for index in _sample_indices(len(data[pivot]), repeat, rng, exact):
        src = _pick(languages, rng)
        tgt = _pick([other if src == pivot else pivot], rng) if rng.random() < cross_probability else src
        stats[f"{src}->{tgt}"] += 1
        samples.append(_cif_sample(data, index, src, tgt, pairs[cursor]))
        cursor += 1
        if cursor == len(pairs):  # each pass over the pairs is a fresh permutation
            rng.shuffle(pairs)
            cursor = 0
    return samples


def _build_crosslingual(
    data: dict[str, list[dict]], languages: list[str], cross_probability: float, change_probability: float,
    repeat: float, rng: random.Random, stats: collections.Counter, exact: bool,
) -> list[dict]:
    pivot = languages[0]
    pairs = {lang: _instruction_pairs(data, pivot, lang, rng) for lang in languages[1:]}
    for lang, lang_pairs in pairs.items():
        if not lang_pairs:
            raise ValueError(f"no {pivot}/{lang} instruction pairs (all empty or identical)")
    samples = []
    for index in _sample_indices(len(data[pivot]), repeat, rng, exact):
        other = _pick(languages[1:], rng)
        if rng.random() >= cross_probability:
            src = tgt = _pick(languages, rng)
        elif rng.random() < change_probability:
            src, tgt = other, pivot
        else:
            src, tgt = pivot, other
        pair = _pick(pairs[other], rng)  # drawn after the direction, as the original
        stats[f"{src}->{tgt}"] += 1
        samples.append(_cif_sample(data, index, src, tgt, pair))
    return samples


def _build_translation(
    pairs: list[tuple[str, str]], languages: list[str], change_probability: float, repeat: float,
    rng: random.Random, stats: collections.Counter, exact: bool,
) -> list[dict]:
    samples = []
    for index in _sample_indices(len(pairs), repeat, rng, exact):
        src_lang, tgt_lang = languages
        src, tgt = pairs[index]
        if rng.random() < change_probability:
            src_lang, tgt_lang, src, tgt = tgt_lang, src_lang, tgt, src
        prompt = _pick(TRANSLATION_FORMATS, rng).format(src=src, tgt_lang=language_name(tgt_lang))
        stats[f"{src_lang}->{tgt_lang}"] += 1
        samples.append({"sent0": src, "sent1": tgt, "clm_text": prompt + tgt, "clm_prompt_len": len(prompt)})
    return samples


def generate(
    mode: str,
    languages: Sequence[str],
    *,
    bactrian_dir: Path | str | None = None,
    translation_file: Path | str | None = None,
    cross_probability: float = 0.5,
    change_probability: float = 0.5,
    repeat: float = 1.0,
    seed: int = 0,
    stats: collections.Counter | None = None,
    exact_repeat: bool = False,
) -> list[dict]:
    """Build AFP samples (dicts with sent0, sent1, clm_text, clm_prompt_len) in output order.

    `stats`, if given, is incremented with the count of each CLM direction (`"en->zh"`, ...).
    `exact_repeat` uses every record `int(repeat)` times (module docstring).
    """
    languages = list(languages)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    for code in languages:
        language_name(code)
    if len(set(languages)) != len(languages):
        raise ValueError(f"languages must be distinct, got {languages}")
    if mode in ("bilingual", "translation") and len(languages) != 2:
        raise ValueError(f"mode {mode!r} takes exactly 2 languages, got {languages}")
    if mode == "crosslingual" and len(languages) < 3:
        raise ValueError(f"mode 'crosslingual' takes 3 or more languages, got {languages}; use 'bilingual' for 2")
    for name, p in (("cross_probability", cross_probability), ("change_probability", change_probability)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if repeat <= 0:
        raise ValueError(f"repeat must be positive, got {repeat}")
    stats = collections.Counter() if stats is None else stats
    rng = random.Random(seed)
    if mode == "translation":
        if translation_file is None:
            raise ValueError("mode 'translation' needs a translation file")
        pairs = read_translation_file(translation_file, languages[0], languages[1])
        samples = _build_translation(pairs, languages, change_probability, repeat, rng, stats, exact_repeat)
    elif bactrian_dir is None:
        raise ValueError(f"mode {mode!r} needs the Bactrian-X directory")
    elif mode == "bilingual":
        samples = _build_bilingual(load_aligned(bactrian_dir, languages), languages, cross_probability, repeat,
                                   rng, stats, exact_repeat)
    else:
        samples = _build_crosslingual(load_aligned(bactrian_dir, languages), languages, cross_probability,
                                      change_probability, repeat, rng, stats, exact_repeat)
    rng.shuffle(samples)  # the original shuffles the samples before writing them
    return samples


def write_jsonl(samples: Sequence[dict], path: Path | str) -> None:
    """One `json.dumps(..., ensure_ascii=False)` object per line, UTF-8, `\\n` line ends."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m easylm_align.tools.generate_afp_data",
        description="Build AFP training samples (translation pairs + cross-lingual CLM text).",
    )
    parser.add_argument("-s", "--seed", type=int, default=0)
    parser.add_argument("-m", "--mode", default="bilingual", choices=MODES)
    parser.add_argument(
        "-l", "--languages", nargs="+", default=["en", "zh"],
        help="language codes to align; the first is the pivot language",
    )
    parser.add_argument("-x", "--cross-probability", type=float, default=0.5)
    parser.add_argument("-c", "--change-probability", type=float, default=0.5)
    parser.add_argument("-r", "--repeat", type=float, default=1.0)
    parser.add_argument("-t", "--translation-file", help="TSV of sentence pairs (translation mode)")
    parser.add_argument("-b", "--bactrian-dir", help="directory with one {lang}.json per language")
    parser.add_argument("-o", "--output-dir", default=".")
    parser.add_argument("--output-file", help="write here instead of OUTPUT_DIR/<original file name>")
    parser.add_argument("--exact-repeat", action="store_true",
                        help="use every record int(REPEAT) times plus a distinct subset for the fraction "
                             "(the original: int(REPEAT)+1 shuffled copies, stopping after int(REPEAT*N)+1)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stats: collections.Counter = collections.Counter()
    try:
        samples = generate(
            args.mode,
            args.languages,
            bactrian_dir=args.bactrian_dir,
            translation_file=args.translation_file,
            cross_probability=args.cross_probability,
            change_probability=args.change_probability,
            repeat=args.repeat,
            seed=args.seed,
            stats=stats,
            exact_repeat=args.exact_repeat,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output_file:
        out_path = Path(args.output_file)
    else:
        name = output_filename(
            args.mode, args.languages, args.cross_probability, args.change_probability, args.repeat
        )
        out_path = Path(args.output_dir) / name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(samples, out_path)
    print(f"wrote {len(samples)} samples to {out_path}")
    for direction, count in sorted(stats.items()):
        print(f"  {direction}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
