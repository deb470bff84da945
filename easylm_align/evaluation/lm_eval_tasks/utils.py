"""Functions the `ogx_xquad_*` task files call, for lm-evaluation-harness 0.4 (`--include_path`).

The metric is `easylm_align.evaluation.squad` in SQuAD v1.1 mode, the official script that the
OpenGPT-X fork's `squad` metric runs. That module is plain Python, so it is loaded here by path:
the harness's environment needs neither JAX nor easylm_align installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import datasets

_PACKAGE = Path(__file__).resolve().parent.parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there while it executes
    spec.loader.exec_module(module)
    return module


try:  # squad.py's one import; where easylm_align is not installed, load that plain module by path too
    import easylm_align.errors  # noqa: F401
except ImportError:
    _load("easylm_align.errors", _PACKAGE / "errors.py")
squad = _load("easylm_align_squad", _PACKAGE / "evaluation" / "squad.py")


def flatten_squad(dataset: datasets.Dataset) -> datasets.Dataset:
    """One row per question, as the Hugging Face `xquad` loader yields them (text stripped).

    Rows of `google/xquad` are already so and pass through; a local SQuAD-format JSON file read
    with `dataset_path: json` and `field: data` has one row per article and is flattened.
    """
    if "paragraphs" not in dataset.column_names:
        return dataset
    rows = []
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append(dict(
                    id=qa["id"], context=paragraph["context"].strip(), question=qa["question"].strip(),
                    answers=dict(text=[a["text"].strip() for a in qa["answers"]],
                                 answer_start=[a["answer_start"] for a in qa["answers"]])))
    return datasets.Dataset.from_list(rows)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 against every gold answer, in percent as the fork reports."""
    prediction, golds = results[0], doc["answers"]["text"]
    return {"exact_match": 100.0 * squad.exact_match(prediction, golds, "squad_v1"),
            "f1": 100.0 * squad.f1_score(prediction, golds, "squad_v1")}
