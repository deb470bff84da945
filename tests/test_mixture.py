"""--train_dataset.type=mixture: proportions, component order, exact resume, per-component counts."""

import json
from collections import Counter

import numpy as np
import pytest

from conftest import REPO_ROOT, TEST_DATA
from easylm_align import tokenizer, train
from easylm_align.data import mixture, pipeline
from easylm_align.records import DataError
from test_train import make_config, read_metrics

ALPACA = REPO_ROOT / "easylm_align/assets/alpaca_sample.json"


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    rows = (TEST_DATA / "parallel/pud.en-hi-th-zh.tsv").read_text(encoding="utf-8").splitlines()[1:]
    path = tmp_path_factory.mktemp("mix") / "en.jsonl"
    path.write_text("".join(json.dumps({"text": r.split("\t")[1]}) + "\n" for r in rows[:97]))
    return path


def _mixture_flags(english, weights=(0.7, 0.3), **extra):
    """Component 0: English sentences code-mixed into Hindi; component 1: Alpaca with its template."""
    flags = {"train_dataset.type": "mixture", "train_dataset.mixture_dataset.seq_length": 32,
             "train_dataset.mixture_dataset.batch_size": 8, "train_dataset.mixture_dataset.seed": 3,
             "train_dataset.mixture_dataset.component_0.weight": weights[0],
             "train_dataset.mixture_dataset.component_0.json_dataset.path": str(english),
             "train_dataset.mixture_dataset.component_0.text_processor.codemix_dict_path":
                 str(REPO_ROOT / "dicts/en-hi.txt"),
             "train_dataset.mixture_dataset.component_0.text_processor.codemix_ratio": 0.5,
             "train_dataset.mixture_dataset.component_1.weight": weights[1],
             "train_dataset.mixture_dataset.component_1.json_dataset.path": str(ALPACA),
             "train_dataset.mixture_dataset.component_1.text_processor.alpaca": True}
    return {k.replace(".", "__"): v for k, v in {**flags, **extra}.items()}


def _source(english, weights):
    cfg = make_config("/tmp/unused", **_mixture_flags(english, weights))
    return mixture.MixtureSource(cfg.train_dataset.mixture_dataset, "--train_dataset.mixture_dataset")


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, 2.0)])
def test_proportions_and_each_component_read_in_order(english, weights):
    source = _source(english, weights)
    records = [r for _, r in zip(range(10_000), source.records(0))]
    counts = Counter(r.example["component"] for r in records)
    for k, w in enumerate(weights):
        assert abs(counts[k] / 10_000 - w / sum(weights)) < 0.01, counts
    # Each component is its file read again and again in order, with its own (epoch, record) index.
    lines = [json.loads(x) for x in english.read_text().splitlines()]
    alpaca = json.loads(ALPACA.read_text())
    for k, data in ((0, lines), (1, alpaca)):
        taken = [r.example for r in records if r.example["component"] == k]
        assert [t["example"] for t in taken] == [data[j % len(data)] for j in range(len(taken))]
        assert [t["index"] for t in taken] == [(j // len(data)) * 2**32 + j % len(data) for j in range(len(taken))]


def test_records_from_any_start_continue_the_same_sequence(english):
    source = _source(english, (0.7, 0.3))
    whole = [r.example for _, r in zip(range(3000), source.records(0))]
    again = _source(english, (0.7, 0.3))  # a fresh process: nothing learnt about epoch lengths
    assert [r.example for _, r in zip(range(3000 - 2345), again.records(2345))] == whole[2345:]


def test_pipeline_resumes_exactly_and_counts_per_component(english):
    cfg = make_config("/tmp/unused", **_mixture_flags(english))
    tok = tokenizer.Tokenizer.from_config(cfg.tokenizer)
    first = pipeline.DatasetIterator(cfg.train_dataset, tok)
    batches = [next(first) for _ in range(3)]
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint's meta stores it
    later = [next(first) for _ in range(3)]
    second = pipeline.DatasetIterator(cfg.train_dataset, tok)
    second.load_state_dict(saved)
    for a, b in zip(later, [next(second) for _ in range(3)]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    s = second.stats
    assert s["mixture_0_examples"] + s["mixture_1_examples"] == s["examples"] > 0
    assert s["mixture_0_examples"] > 0 and s["mixture_1_examples"] > 0
    # Every token packed so far came from one component or the other (one token is carried over).
    packed = sum(b["input_tokens"].size for b in batches + later)
    assert s["mixture_0_tokens"] + s["mixture_1_tokens"] >= packed + 1
    assert s["words_replaced"] > 0  # component 0's code-mixing ran


def test_training_on_a_mixture_resumes_across_a_kill(tmp_path, english):
    common = dict(_mixture_flags(english), save_model_freq=2)
    train.Trainer(make_config(tmp_path / "full", total_steps=4, **common)).run()
    train.Trainer(make_config(tmp_path / "cut", total_steps=2, **common)).run()
    train.Trainer(make_config(tmp_path / "cut", total_steps=4, **common)).run()
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(full, cut):
        assert a["loss"] == b["loss"], a["step"]
    # The data counts are what has been read, the next batch included (read while the device works),
    # except at a run's last step: compare them after the resume.
    for a, b in zip(full[2:], cut[2:]):
        for key in ("data/mixture_0_examples", "data/mixture_1_tokens", "codemix/words_replaced"):
            assert a[key] == b[key], (a["step"], key)
    assert full[-1]["data/mixture_0_examples"] + full[-1]["data/mixture_1_examples"] == full[-1]["data/examples"]


def test_a_mixture_needs_a_weighted_component(english):
    with pytest.raises(DataError, match="component_0.weight"):
        _source(english, (0.0, 0.0))
    with pytest.raises(DataError, match="must be >= 0"):
        _source(english, (-1.0, 1.0))
