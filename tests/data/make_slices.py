"""Cuts the small fixtures in tests/data/ from the full public data (see README.md for sources).

    python tests/data/make_slices.py /path/to/shared/data

Rerunning it on the same data rewrites byte-identical files. Line-based files keep their first
lines byte for byte; JSON files keep their first records, re-serialised (UTF-8, not escaped).
"""

import json
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent

XQUAD_LANGS = ("en", "hi", "el", "th", "zh")
XQUAD_ARTICLES = 1          # the first article (Super_Bowl_50): 74 questions in every language
PAWSX_ROWS = 64             # per language and split, after the header
XCOPA_ROWS = 40
INSTRUCT_RECORDS = 200
TATOEBA_PAIRS = 200
PUD_ROWS = 50               # after the header
MONO_LINES = 100


def head_lines(src: Path, dst: Path, n: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f:
        lines = [f.readline() for _ in range(n)]
    dst.write_bytes(b"".join(lines))


def write_json(dst: Path, obj, indent=None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def main(shared: Path) -> None:
    for lang in XQUAD_LANGS:
        data = json.loads((shared / "xquad" / f"xquad.{lang}.json").read_text(encoding="utf-8"))
        write_json(OUT / "xquad" / f"xquad.{lang}.json", {"data": data["data"][:XQUAD_ARTICLES],
                                                        "version": data["version"]})
    shutil.copyfile(shared / "pawsx" / "prompt_formats.json", OUT / "pawsx" / "prompt_formats.json")
    for lang in ("en", "zh"):
        for split in ("dev_2k", "test_2k"):
            rel = Path("pawsx", "x-final", lang, f"{split}.tsv")
            head_lines(shared / rel, OUT / rel, 1 + PAWSX_ROWS)
    for split in ("val", "test"):
        rel = Path("xcopa", "zh", f"{split}.zh.jsonl")
        head_lines(shared / rel, OUT / rel, XCOPA_ROWS)
    for lang in ("en", "zh"):
        records = json.loads((shared / "instruct_x" / f"{lang}.json").read_text(encoding="utf-8"))
        write_json(OUT / "instruct_x" / f"{lang}.json", records[:INSTRUCT_RECORDS], indent=2)
    head_lines(shared / "parallel" / "tatoeba.en-zh.tsv", OUT / "parallel" / "tatoeba.en-zh.tsv", TATOEBA_PAIRS)
    head_lines(shared / "parallel" / "pud.en-hi-th-zh.tsv", OUT / "parallel" / "pud.en-hi-th-zh.tsv", 1 + PUD_ROWS)
    head_lines(shared / "mono" / "hi.ud_pud.txt", OUT / "mono" / "hi.ud_pud.txt", MONO_LINES)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
