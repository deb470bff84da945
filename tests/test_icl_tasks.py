"""ICL task definitions: loaders, AFP-compatible prompts and demo sampling, scoring helpers."""

import json
import random

import pytest

from easylm_align.evaluation import icl_tasks as icl


@pytest.fixture(scope="module")
def pawsx(test_data):
    return {
        (lang, split): icl.load_task("pawsx", lang, split, test_data)
        for lang in ("en", "zh")
        for split in ("dev", "test")
    }


def test_prompt_formats_are_afps(test_data):
    assert icl.load_prompt_formats(test_data / "pawsx" / "prompt_formats.json", "f3") == icl.PAWSX_FORMATS


def test_pawsx_loader_matches_file(test_data, pawsx):
    assert all(len(v) == 64 for v in pawsx.values())  # tests/data keeps 64 rows of each file
    lines = (test_data / "pawsx" / "x-final" / "zh" / "test_2k.tsv").read_text(encoding="utf-8").splitlines()
    for line, ex in zip(lines[1:50], pawsx["zh", "test"]):
        rid, s1, s2, label = line.split("\t")
        assert (ex.id, ex.fields["sentence1"], ex.fields["sentence2"]) == (rid, s1, s2)
        assert ex.label == (0 if label == "1" else 1)  # paraphrase → candidate 0 ("Yes")
    assert len(icl.load_task("pawsx", "en", "test", test_data, limit=7)) == 7


def test_pawsx_zero_shot_request(pawsx):
    ex = pawsx["en", "test"][0]
    (req,) = icl.build_requests("pawsx", [ex], pawsx["en", "dev"], shots=0, seed=0, prompt_lang="en")
    s1, s2 = ex.fields["sentence1"], ex.fields["sentence2"]
    assert req.context == f"{s1}, right?"
    assert req.candidates == [f" Yes, {s2}", f" No, {s2}"]
    assert req.label == ex.label and req.example_id == ex.id and req.connector == "</s>"
    # context + candidate is exactly AFP's scored string.
    afp = icl.PAWSX_FORMATS["en"].few_shot_format
    for choice, cand in zip(("Yes", "No"), req.candidates):
        assert req.context + cand == afp.format(demos="", sentence1=s1, sentence2=s2, choice=choice)


def test_pawsx_demos_follow_afps_sampling(pawsx):
    dev, tests = pawsx["en", "dev"], pawsx["zh", "test"][:20]
    reqs = icl.build_requests("pawsx", tests, dev, shots=5, seed=0, prompt_lang="en")
    # AFP: random.seed(seed); random.shuffle(dev list); first k.
    pool = list(dev)
    random.seed(0)
    random.shuffle(pool)
    demos = "".join(
        f"{d.fields['sentence1']}, right? {('Yes', 'No')[d.label]}, {d.fields['sentence2']}</s>" for d in pool[:5]
    )
    for req, ex in zip(reqs, tests):
        assert req.context == f"{demos}{ex.fields['sentence1']}, right?"
        assert req.context.count("</s>") == 5
    assert icl.sample_demos(dev, 5, 0) == pool[:5]


@pytest.mark.parametrize("shots", [0, 1, 5, 8])
def test_shot_counts_and_seeds(pawsx, shots):
    dev, tests = pawsx["en", "dev"], pawsx["en", "test"][:3]
    a = icl.build_requests("pawsx", tests, dev, shots, seed=1, prompt_lang="en")
    b = icl.build_requests("pawsx", tests, dev, shots, seed=1, prompt_lang="en")
    c = icl.build_requests("pawsx", tests, dev, shots, seed=2, prompt_lang="en")
    assert a == b
    assert all(r.context.count("</s>") == shots for r in a)
    assert (a[0].context == c[0].context) == (shots == 0)
    if shots:
        assert len({r.context.rsplit("</s>", 1)[0] for r in a}) == 1  # one demo set for all tests


def test_zh_prompt_language(pawsx):
    ex = pawsx["zh", "test"][1]
    (req,) = icl.build_requests("pawsx", [ex], pawsx["zh", "dev"], shots=2, seed=0, prompt_lang="zh")
    assert req.context.endswith(f"{ex.fields['sentence1']}，对吗？")
    assert req.candidates == [f" 对, {ex.fields['sentence2']}", f" 不对, {ex.fields['sentence2']}"]
    first_demo = req.context.split("</s>")[0]
    assert "，对吗？ 对，" in first_demo or "，对吗？ 不对，" in first_demo


def test_afp_suite(test_data):
    settings = icl.afp_settings()
    assert [s.key for s in settings] == ["pawsx_en_s0_i0", "pawsx_en_s5_i0", "pawsx_zh_s0_i0", "pawsx_zh_s5_i0"]
    assert len(icl.afp_settings(seeds=(0, 1, 2))) == 2 * (1 + 3)  # zero-shot runs once
    suite = icl.build_suite(settings, test_data, limit=4)
    assert all(len(reqs) == 4 for reqs in suite.values())
    zh5 = suite["pawsx_zh_s5_i0"][0]
    assert zh5.context.count("</s>") == 5 and zh5.context.endswith(", right?")  # en demos, zh test
    assert zh5.candidates[0].startswith(" Yes, ")


def test_xnli_template_and_layouts(tmp_path):
    rows = [("A man sleeps.", "A person rests.", "entailment"), ("A dog runs.", "A cat sleeps.", "contradiction")]
    (tmp_path / "xnli" / "en").mkdir(parents=True)
    with open(tmp_path / "xnli" / "en" / "dev.jsonl", "w") as f:
        for p, h, label in rows:
            f.write(json.dumps({"premise": p, "hypothesis": h, "label": icl.XNLI_LABELS.index(label)}) + "\n")
    tsv = "premise\thypothesis\tlabel\n" + "\n".join("\t".join(r) for r in rows)
    (tmp_path / "xnli" / "en" / "test.tsv").write_text(tsv)
    header = "language\tgold_label\tsentence1\tsentence2\tpairID"
    body = "\n".join(f"{lang}\t{r[2]}\t{r[0]}\t{r[1]}\t{i}" for i, r in enumerate(rows) for lang in ("en", "zh"))
    (tmp_path / "x.tsv").write_text(f"{header}\n{body}\n")

    dev = icl.load_task("xnli", "en", "dev", tmp_path)
    test = icl.load_task("xnli", "en", "test", tmp_path)
    assert [e.label for e in dev] == [e.label for e in test] == [0, 2]
    assert [e.label for e in icl.load_xnli_file(tmp_path / "x.tsv", "zh")] == [0, 2]

    (req,) = icl.build_requests("xnli", test[1:], dev[:1], shots=1, seed=0, prompt_lang="en")
    question = (
        "Question: What is the relationship between premise and hypothesis, entailment, neutral, or contradiction?"
    )
    assert req.context == (
        f"Premise: A man sleeps.\nHypothesis: A person rests.\n{question}\nAnswer: A\n\n"
        f"Premise: A dog runs.\nHypothesis: A cat sleeps.\n{question}\nAnswer:"
    )
    assert req.candidates == [" A", " B", " C"] and req.label == 2
    (zh,) = icl.build_requests("xnli", test[:1], [], shots=0, seed=0, prompt_lang="zh")
    assert zh.context.endswith("\n回答：") and zh.candidates == ["A", "B", "C"]
    with pytest.raises(icl.DataError, match="no XNLI en/train file"):
        icl.load_task("xnli", "en", "train", tmp_path)


def test_xcopa(test_data):
    dev = icl.load_task("xcopa", "zh", "dev", test_data)
    test = icl.load_task("xcopa", "zh", "test", test_data)
    assert (len(dev), len(test)) == (40, 40)  # the first 40 of each file
    ex = test[0]
    (req,) = icl.build_requests("xcopa", [ex], dev, shots=0, seed=0, prompt_lang="en")
    conj = "because" if ex.fields["question"] == "cause" else "so"
    assert req.context == f"{ex.fields['question']}: {ex.fields['premise']} {conj}"
    assert req.candidates == [" " + ex.fields["choice1"], " " + ex.fields["choice2"]]
    (req,) = icl.build_requests("xcopa", [ex], dev, shots=3, seed=0, prompt_lang="zh")
    assert req.context.count("</s>") == 3 and ("起因: " in req.context or "影响: " in req.context)


def test_score_and_aggregate(pawsx):
    reqs = icl.build_requests("pawsx", pawsx["en", "test"][:10], [], 0, 0, "en")
    calls = []

    def scorer(pairs):
        calls.append(len(pairs))
        # Prefer " Yes" always: accuracy equals the share of label 0.
        return [0.0 if cont.startswith(" Yes") else -1.0 for _, cont in pairs]

    results = icl.score_requests(reqs, scorer)
    assert calls == [20] and all(r.lengths == tuple(map(len, r.request.candidates)) for r in results)
    share_yes = sum(r.label == 0 for r in reqs) / 10
    assert icl.aggregate(results) == {"acc": share_yes, "acc_norm": share_yes, "n": 10}

    req = icl.Request("ctx", [" a", " bbbbbbbb"], label=1)
    # Summed: -4 > -6 picks candidate 0; per character: -2/char < -0.75/char picks candidate 1.
    res = icl.Result(req, (-4.0, -6.0), (2, 8))
    tie = icl.Result(icl.Request("c", [" x", " y"], label=0), (-1.0, -1.0), (2, 2))
    assert icl.aggregate([res, tie]) == {"acc": 0.5, "acc_norm": 1.0, "n": 2}
    assert icl.afp_averages({"pawsx_en_s0_i0": 0.5, "pawsx_en_s5_i0": 0.7, "pawsx_zh_s0_i0": 0.3}) == pytest.approx(
        {"avg_all": 0.5, "avg_zero": 0.4}
    )
    with pytest.raises(ValueError, match="returned 1 scores for 20 pairs"):
        icl.score_requests(reqs, lambda pairs: [0.0])


def test_errors(tmp_path, pawsx):
    with pytest.raises(ValueError, match="cannot draw 3 demonstrations from a pool of 2"):
        icl.build_requests("pawsx", pawsx["en", "test"][:1], pawsx["en", "dev"][:2], 3, 0, "en")
    with pytest.raises(ValueError, match="unknown ICL task 'nope'"):
        icl.load_task("nope", "en", "dev", tmp_path)
    with pytest.raises(ValueError, match="no prompt format for language 'de'"):
        icl.build_requests("pawsx", [], [], 0, 0, "de")
    bad = icl.PromptFormat("{sentence1}", "{demos}{sentence1}", ("Yes", "No"), "</s>")
    with pytest.raises(ValueError, match="must contain"):
        icl.build_requests("pawsx", [], [], 0, 0, "en", prompt_format=bad)
    d = tmp_path / "pawsx" / "x-final" / "en"
    d.mkdir(parents=True)
    (d / "dev_2k.tsv").write_text("id\tsentence1\tsentence2\tlabel\n1\ta\tb\t1\n2\ta\tb\n")
    with pytest.raises(icl.DataError, match=r"dev_2k\.tsv:3: expected 4 tab-separated fields, got 3"):
        icl.load_task("pawsx", "en", "dev", tmp_path)
    (d / "test_2k.tsv").write_text("id\tsentence1\tsentence2\tlabel\n1\ta\tb\tyes\n")
    with pytest.raises(icl.DataError, match=r"test_2k\.tsv:2: label must be 0 or 1"):
        icl.load_task("pawsx", "en", "test", tmp_path)
