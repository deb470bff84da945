"""Few-shot classification tasks for in-context-learning evaluation (PAWS-X, XNLI, XCOPA).

Pure Python: this module turns data files into scoring requests and scores into accuracies; the
model-side scorer lives elsewhere. The prompts follow AFP (chongli17/CrossLingualAlignment,
`src/{paws_x,xnli,xcopa}_prompt.py` and `data/PAWS-X/prompt_formats.json`, format "f3"):

* one set of `shots` demonstrations is drawn per seed, as AFP does (`random.seed(seed)`, shuffle
  the whole demonstration pool, take the first `shots`), and shared by every test example;
* each demonstration is `example_format` with the gold answer, followed by `connector`;
* a test prompt is `few_shot_format` with `{demos}` and, for each candidate, `{choice}`.

AFP scores the whole string for each candidate and takes the argmax. Here that string is split
into `context` (everything before the choice, shared by all candidates) and a per-candidate
`continuation` (the choice, with the space before it, plus the rest of the template, e.g.
", {sentence2}" for PAWS-X), so `context + continuation` is exactly AFP's string and the argmax
of log p(continuation | context) is AFP's argmax (up to tokenization at the boundary).

The connector is the literal text "</s>": AFP's Hugging Face tokenizers turn it into the EOS
token, plain SentencePiece encoding does not; a scorer wanting AFP's token ids splits the context
on `Request.connector` and joins the pieces with the EOS id.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from easylm_align.records import BadLines, DataError, Row, json_lines, tsv_rows


@dataclass(frozen=True)
class Example:
    """One labelled example. `label` indexes the candidates (`ICLTask.choices`)."""

    id: str
    fields: Mapping[str, str]
    label: int


@dataclass(frozen=True)
class PromptFormat:
    """A task's templates in one prompt language (the keys of AFP's prompt_formats.json)."""

    example_format: str  # one demonstration; `{label}` is the gold answer
    few_shot_format: str  # `{demos}` then the test prompt; `{choice}` is each candidate
    choices: tuple[str, ...]  # verbalisers indexed by `Example.label`; empty: per-example (XCOPA)
    connector: str  # appended after every demonstration


@dataclass
class Request:
    """What a scorer sees for one test example: score each `context + candidates[i]`."""

    context: str
    candidates: list[str]
    label: int
    example_id: str = ""
    connector: str = ""


@dataclass(frozen=True)
class Result:
    """Summed log-likelihood of each candidate given the context, with length normalisers."""

    request: Request
    logprobs: tuple[float, ...]
    lengths: tuple[int, ...]  # characters by default; token counts work as well


# --------------------------------------------------------------------------------------------
# Tasks


class ICLTask:
    """A classification task: where its files are, how to read them, how to prompt."""

    name: str = ""
    formats: Mapping[str, PromptFormat] = {}

    def prompt_format(self, prompt_lang: str) -> PromptFormat:
        try:
            return self.formats[prompt_lang]
        except KeyError:
            raise ValueError(
                f"{self.name}: no prompt format for language {prompt_lang!r}; have {sorted(self.formats)}"
            ) from None

    def load(self, data_dir: Path, lang: str, split: str) -> list[Example]:
        raise NotImplementedError

    def template_fields(self, example: Example, prompt_lang: str) -> dict[str, str]:
        """Values for the template placeholders other than demos/label/choice."""
        return dict(example.fields)

    def choices(self, example: Example, fmt: PromptFormat) -> list[str]:
        """The candidate answers, in label order."""
        return list(fmt.choices)


# AFP's data/PAWS-X/prompt_formats.json, format "f3" (tests check these equal the file).
PAWSX_FORMATS = {
    "en": PromptFormat(
        example_format="{sentence1}, right? {label}, {sentence2}",
        few_shot_format="{demos}{sentence1}, right? {choice}, {sentence2}",
        choices=("Yes", "No"),
        connector="</s>",
    ),
    "zh": PromptFormat(
        example_format="{sentence1}，对吗？ {label}，{sentence2}",
        few_shot_format="{demos}{sentence1}，对吗？ {choice}, {sentence2}",
        choices=("对", "不对"),
        connector="</s>",
    ),
    "ar": PromptFormat(
        example_format="{sentence1}, أليس كذلك؟ {label}, {sentence2}",
        few_shot_format="{demos}{sentence1}, أليس كذلك؟ {choice}, {sentence2}",
        choices=("نعم", "لا"),
        connector="</s>",
    ),
}

_PAWSX_SPLITS = {"dev": "dev_2k", "test": "test_2k"}


class PawsXTask(ICLTask):
    """PAWS-X: `pawsx/x-final/{lang}/{dev_2k,test_2k}.tsv` (header `id sentence1 sentence2 label`).

    Label 1 (paraphrase) is candidate 0 ("Yes"), label 0 is candidate 1 ("No"), as in AFP.
    """

    name = "pawsx"
    formats = PAWSX_FORMATS

    def load(self, data_dir: Path, lang: str, split: str) -> list[Example]:
        path = Path(data_dir) / "pawsx" / "x-final" / lang / f"{_PAWSX_SPLITS.get(split, split)}.tsv"
        rows = _read_tsv(path, expected_header=("id", "sentence1", "sentence2", "label"))
        examples = []
        for lineno, (rid, s1, s2, label) in rows:
            if label not in ("0", "1"):
                raise DataError(f"{path}:{lineno}: label must be 0 or 1, got {label!r}")
            examples.append(Example(rid, {"sentence1": s1, "sentence2": s2}, 0 if label == "1" else 1))
        return examples


_XNLI_ZH_QUESTION = "问题: 前提和假设之间是什么关系，蕴涵，中立，还是矛盾？"
# AFP's xnli_prompt.py templates with `{choice}` added after "Answer:": AFP's FEW_SHOT_FORMAT
# has no `{choice}`, so all its candidates were the same string. Choices are AFP's letters.
XNLI_FORMATS = {
    "en": PromptFormat(
        example_format=(
            "Premise: {premise}\nHypothesis: {hypothesis}\nQuestion: What is the relationship between "
            "premise and hypothesis, entailment, neutral, or contradiction?\nAnswer: {label}"
        ),
        few_shot_format=(
            "{demos}Premise: {premise}\nHypothesis: {hypothesis}\nQuestion: What is the relationship "
            "between premise and hypothesis, entailment, neutral, or contradiction?\nAnswer: {choice}"
        ),
        choices=("A", "B", "C"),
        connector="\n\n",
    ),
    "zh": PromptFormat(
        example_format="前提：{premise}\n假设：{hypothesis}\n" + _XNLI_ZH_QUESTION + "\n回答：{label}",
        few_shot_format="{demos}前提：{premise}\n假设：{hypothesis}\n" + _XNLI_ZH_QUESTION + "\n回答：{choice}",
        choices=("A", "B", "C"),
        connector="\n\n",
    ),
}

XNLI_LABELS = ("entailment", "neutral", "contradiction")
# XNLI-MT's multinli files say "contradictory"; Hugging Face's xnli uses 0/1/2 in this order.
_XNLI_LABEL_IDS = {**{name: i for i, name in enumerate(XNLI_LABELS)}, "contradictory": 2, "0": 0, "1": 1, "2": 2}


def _xnli_label(value: object, path: Path, lineno: int) -> int:
    try:
        return _XNLI_LABEL_IDS[str(value).strip().lower()]
    except KeyError:
        raise DataError(f"{path}:{lineno}: unknown XNLI label {value!r}; expected one of "
                        f"{', '.join(XNLI_LABELS)} or 0/1/2") from None


def _jsonl_rows(path: Path, fields: Mapping[str, tuple[type, ...]]) -> Iterator[Row]:
    """The rows of a JSON-lines file; each must hold `fields` with values of the given types."""
    for row in json_lines(path, BadLines()):
        for name, types in fields.items():
            value = row.value.get(name)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                found = f"got {value!r}" if name in row.value else "it is missing"
                raise DataError(f"{row.location}: expected field {name!r} of type "
                                f"{' or '.join(t.__name__ for t in types)}; {found}")
        yield row


def load_xnli_file(path: Path | str, lang: str | None = None) -> list[Example]:
    """Read XNLI in any of its common layouts.

    * JSON lines with `premise`, `hypothesis`, `label` (Hugging Face `xnli` export);
    * XNLI-1.0 `xnli.{dev,test}.tsv` (header with `language gold_label sentence1 sentence2`),
      keeping the rows whose language is `lang`;
    * three columns `premise<TAB>hypothesis<TAB>label`, optional header (AFP's `read_xnli_tsv`,
      XNLI-MT).
    Labels are names or 0/1/2 (entailment, neutral, contradiction).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: XNLI file not found")
    examples = []
    if path.suffix == ".jsonl":
        for row in _jsonl_rows(path, {"premise": (str,), "hypothesis": (str,), "label": (str, int)}):
            record = row.value
            fields = {"premise": record["premise"], "hypothesis": record["hypothesis"]}
            label = _xnli_label(record["label"], path, row.line)
            examples.append(Example(str(record.get("id", row.line)), fields, label))
        return examples
    rows = _read_tsv(path)
    header = rows[0][1] if rows else []
    if {"gold_label", "sentence1", "sentence2"} <= set(header):
        col = {name: i for i, name in enumerate(header)}
        for lineno, row in rows[1:]:
            if len(row) != len(header):
                raise DataError(f"{path}:{lineno}: expected {len(header)} tab-separated fields, got {len(row)}")
            if lang is not None and "language" in col and row[col["language"]] != lang:
                continue
            fields = {"premise": row[col["sentence1"]], "hypothesis": row[col["sentence2"]]}
            rid = row[col["pairID"]] if "pairID" in col else str(lineno)
            examples.append(Example(rid, fields, _xnli_label(row[col["gold_label"]], path, lineno)))
        return examples
    if [h.lower() for h in header] in (["premise", "hypo", "label"], ["premise", "hypothesis", "label"]):
        rows = rows[1:]
    for lineno, row in rows:
        if len(row) != 3:
            raise DataError(f"{path}:{lineno}: expected 3 tab-separated fields (premise, hypothesis, label), "
                            f"got {len(row)}")
        fields = {"premise": row[0], "hypothesis": row[1]}
        examples.append(Example(str(lineno), fields, _xnli_label(row[2], path, lineno)))
    return examples


class XnliTask(ICLTask):
    """XNLI (not shipped here). Looked up under `{data_dir}/xnli/`, first match wins:
    `{lang}/{split}.jsonl`, `{lang}/{split}.tsv`, `XNLI-1.0/xnli.{split}.tsv` (filtered by language).
    """

    name = "xnli"
    formats = XNLI_FORMATS

    def load(self, data_dir: Path, lang: str, split: str) -> list[Example]:
        root = Path(data_dir) / "xnli"
        candidates = [
            root / lang / f"{split}.jsonl",
            root / lang / f"{split}.tsv",
            root / "XNLI-1.0" / f"xnli.{split}.tsv",
        ]
        for path in candidates:
            if path.is_file():
                return load_xnli_file(path, lang)
        raise DataError(f"{root}: no XNLI {lang}/{split} file; tried {', '.join(map(str, candidates))}")


# AFP's xcopa_prompt.py: the question word and the conjunction are in the prompt language.
XCOPA_FORMAT = PromptFormat(
    example_format="{question}: {premise} {conjunction} {label}",
    few_shot_format="{demos}{question}: {premise} {conjunction} {choice}",
    choices=(),
    connector="</s>",
)
XCOPA_WORDS = {
    "en": {"cause": "cause", "effect": "effect", "because": "because", "so": "so"},
    "zh": {"cause": "起因", "effect": "影响", "because": "因为", "so": "所以"},
    "ar": {"cause": "السبب", "effect": "تأثير", "because": "لأن", "so": "لذا"},
}
_XCOPA_SPLITS = {"dev": "val", "validation": "val"}


class XcopaTask(ICLTask):
    """XCOPA: `xcopa/{lang}/{val,test}.{lang}.jsonl`; the candidates are choice1/choice2."""

    name = "xcopa"
    formats = {lang: XCOPA_FORMAT for lang in XCOPA_WORDS}

    def load(self, data_dir: Path, lang: str, split: str) -> list[Example]:
        split = _XCOPA_SPLITS.get(split, split)
        path = Path(data_dir) / "xcopa" / lang / f"{split}.{lang}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: XCOPA file not found")
        examples = []
        text = dict.fromkeys(("premise", "choice1", "choice2", "question"), (str,))
        for row in _jsonl_rows(path, dict(text, label=(int,))):
            record = row.value
            if record["question"] not in ("cause", "effect") or record["label"] not in (0, 1):
                raise DataError(f"{row.location}: expected question cause/effect and label 0/1")
            fields = {k: record[k] for k in text}
            examples.append(Example(str(record.get("idx", row.line)), fields, record["label"]))
        return examples

    def template_fields(self, example: Example, prompt_lang: str) -> dict[str, str]:
        words = XCOPA_WORDS[prompt_lang]
        question = example.fields["question"]
        conjunction = "because" if question == "cause" else "so"
        return {**example.fields, "question": words[question], "conjunction": words[conjunction]}

    def choices(self, example: Example, fmt: PromptFormat) -> list[str]:
        return [example.fields["choice1"], example.fields["choice2"]]


TASKS: dict[str, ICLTask] = {task.name: task for task in (PawsXTask(), XnliTask(), XcopaTask())}


def get_task(name: str) -> ICLTask:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown ICL task {name!r}; have {sorted(TASKS)}") from None


def load_task(name: str, lang: str, split: str, data_dir: Path | str, limit: int | None = None) -> list[Example]:
    """Examples of task `name` in `lang`, file order; `split` is "dev" or "test".

    `data_dir` is the data root (holding `pawsx/`, `xcopa/`, `xnli/`). `limit` keeps the first
    examples; use it for test sets only, since AFP samples demonstrations from the full dev set.
    """
    examples = get_task(name).load(Path(data_dir), lang, split)
    return examples if limit is None else examples[:limit]


def load_prompt_formats(path: Path | str, name: str = "f3") -> dict[str, PromptFormat]:
    """Read an AFP prompt_formats.json: `{name: {lang: {EXAMPLE_FORMAT, CHOICES, CONNECTOR, FEW_SHOT_FORMAT}}}`."""
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)[name]
    return {
        lang: PromptFormat(
            example_format=spec["EXAMPLE_FORMAT"],
            few_shot_format=spec["FEW_SHOT_FORMAT"],
            choices=tuple(spec["CHOICES"]),
            connector=spec["CONNECTOR"],
        )
        for lang, spec in raw.items()
    }


def _read_tsv(path: Path, expected_header: Sequence[str] | None = None) -> list[tuple[int, list[str]]]:
    """(line number, fields) for each non-blank line, header included unless `expected_header`
    is given, in which case it is checked and dropped and every row must have that many fields."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    counts = None if expected_header is None else (len(expected_header),)
    rows = [(row.line, row.value) for row in tsv_rows(path, BadLines(), counts)]
    if expected_header is None:
        return rows
    if not rows or rows[0][1] != list(expected_header):
        raise DataError(f"{path}:{rows[0][0] if rows else 1}: expected the header "
                        f"{'<TAB>'.join(expected_header)}")
    return rows[1:]


# --------------------------------------------------------------------------------------------
# Requests


def sample_demos(pool: Sequence[Example], shots: int, seed: int) -> list[Example]:
    """AFP's draw: shuffle the whole pool with `random.seed(seed)`, take the first `shots`."""
    if shots > len(pool):
        raise ValueError(f"cannot draw {shots} demonstrations from a pool of {len(pool)}")
    pool = list(pool)
    random.Random(seed).shuffle(pool)
    return pool[:shots]


def build_requests(
    task: str | ICLTask,
    test_examples: Sequence[Example],
    demo_pool: Sequence[Example],
    shots: int,
    seed: int,
    prompt_lang: str,
    prompt_format: PromptFormat | None = None,
) -> list[Request]:
    """One request per test example, all with the same `shots` demonstrations drawn by `seed`.

    `prompt_lang` picks the templates and verbalisers (AFP: the demonstrations' language);
    `prompt_format` overrides them (e.g. from `load_prompt_formats`).
    """
    task = get_task(task) if isinstance(task, str) else task
    fmt = prompt_format or task.prompt_format(prompt_lang)
    if fmt.few_shot_format.count("{choice}") != 1:
        raise ValueError(f"few_shot_format must contain '{{choice}}' once: {fmt.few_shot_format!r}")
    head, tail = fmt.few_shot_format.split("{choice}")
    demos = ""
    for demo in sample_demos(demo_pool, shots, seed):
        values = task.template_fields(demo, prompt_lang)
        values["label"] = task.choices(demo, fmt)[demo.label]
        demos += fmt.example_format.format_map(values) + fmt.connector
    requests = []
    for example in test_examples:
        values = task.template_fields(example, prompt_lang)
        full_head = head.format_map({**values, "demos": demos})
        context = full_head.rstrip(" ")  # the space before the choice goes with the candidate
        rest = tail.format_map(values)
        candidates = [full_head[len(context):] + choice + rest for choice in task.choices(example, fmt)]
        requests.append(Request(context, candidates, example.label, example.id, fmt.connector))
    return requests


@dataclass(frozen=True)
class EvalSetting:
    """One evaluation run of AFP's config: demonstrations in `prompt_lang`, tests in `sample_lang`."""

    task: str
    prompt_lang: str
    sample_lang: str
    shots: int
    seed: int

    @property
    def key(self) -> str:
        """AFP's metric name, e.g. `pawsx_zh_s5_i0`."""
        return f"{self.task}_{self.sample_lang}_s{self.shots}_i{self.seed}"


def afp_settings(
    task: str = "pawsx",
    prompt_langs: Sequence[str] = ("en", "en"),
    sample_langs: Sequence[str] = ("en", "zh"),
    shots: Sequence[int] = (0, 5),
    seeds: Sequence[int] = (0,),
) -> list[EvalSetting]:
    """AFP's grid (defaults: data/config/pawsx_en-zh_seed0.json); zero-shot runs once, seed ignored."""
    if len(prompt_langs) != len(sample_langs):
        raise ValueError("prompt_langs and sample_langs pair up and must have the same length")
    settings = []
    for prompt_lang, sample_lang in zip(prompt_langs, sample_langs):
        for n in shots:
            for seed in seeds[:1] if n == 0 else seeds:
                settings.append(EvalSetting(task, prompt_lang, sample_lang, n, seed))
    if len({s.key for s in settings}) != len(settings):
        raise ValueError("two settings share a metric key (same sample language, shots and seed)")
    return settings


def build_suite(
    settings: Iterable[EvalSetting], data_dir: Path | str, limit: int | None = None
) -> dict[str, list[Request]]:
    """Requests per setting key: demonstrations from the prompt language's dev set, tests from
    the sample language's test set (its first `limit` examples if given)."""
    suite = {}
    for s in settings:
        pool = load_task(s.task, s.prompt_lang, "dev", data_dir) if s.shots else []
        tests = load_task(s.task, s.sample_lang, "test", data_dir, limit)
        suite[s.key] = build_requests(s.task, tests, pool, s.shots, s.seed, s.prompt_lang)
    return suite


# --------------------------------------------------------------------------------------------
# Scoring


Scorer = Callable[[Sequence[tuple[str, str]]], Sequence[float]]


def score_requests(requests: Sequence[Request], scorer: Scorer) -> list[Result]:
    """Call `scorer` once on every (context, continuation) pair; it returns the summed
    log-likelihood of each continuation. Length normalisers are continuation characters."""
    pairs = [(r.context, c) for r in requests for c in r.candidates]
    scores = list(scorer(pairs))
    if len(scores) != len(pairs):
        raise ValueError(f"scorer returned {len(scores)} scores for {len(pairs)} pairs")
    results, i = [], 0
    for r in requests:
        n = len(r.candidates)
        results.append(Result(r, tuple(scores[i : i + n]), tuple(len(c) for c in r.candidates)))
        i += n
    return results


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first index on ties


def aggregate(results: Sequence[Result]) -> dict[str, float]:
    """`acc`: argmax of summed log-likelihood (AFP's rule); `acc_norm`: argmax of log-likelihood
    divided by `lengths`; `n`: number of examples."""
    if not results:
        raise ValueError("no results to aggregate")
    correct = correct_norm = 0
    for r in results:
        correct += _argmax(r.logprobs) == r.request.label
        correct_norm += _argmax([lp / max(n, 1) for lp, n in zip(r.logprobs, r.lengths)]) == r.request.label
    n = len(results)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def afp_averages(accuracies: Mapping[str, float]) -> dict[str, float]:
    """AFP's summary over setting keys: `avg_all`, and `avg_zero` (0-shot runs; its model-selection metric)."""
    zero = [v for k, v in accuracies.items() if "_s0_" in k]
    out = {"avg_all": sum(accuracies.values()) / len(accuracies)}
    if zero:
        out["avg_zero"] = sum(zero) / len(zero)
    return out
