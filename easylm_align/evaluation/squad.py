"""Extractive QA in SQuAD v1.1 format (XQuAD, MLQA): loading, prompts, exact match and F1.

Pure Python (no JAX, no easylm_align imports): the model side lives in `easylm_align.evaluation.generation`
and `easylm_align.evaluate`, and the lm-evaluation-harness task files in `lm_eval_tasks/` load
this module by path for their metric.

What COMMIT ran, and how this module matches it
-----------------------------------------------
COMMIT scores its models with the OpenGPT-X fork of lm-evaluation-harness (0.3-era, `main.py
--model hf-causal-experimental`), tasks `ogx_xquad_{lang}` / `ogx_mlqa_{lang}`. The task code
(`lm_eval/tasks/opengptx/xquad.py` and `mlqa.py`, as stored in EleutherAI/lm-evaluation-harness
@ 1212e404 / 3a6561ed) shows:

* **Prompt.** ``BACKGROUND + "\\n\\n" + context + "\\n\\n" + QUESTION + question + "\\n\\n" + ANSWER``
  with per-language label words (`PROMPT_LABELS`, copied as data from that file). XQuAD glues the
  question to its label with no space (``"Question:Who ..."``); MLQA puts one space there. The
  prompt ends at ``"Answer:"`` with no trailing space.
* **Documents.** The tasks read the Hugging Face `xquad` / `mlqa` datasets. The `xquad` loader
  strips surrounding whitespace from every context, question and answer (11 contexts and 10
  questions of xquad.hi.json have some, 20 and 71 of xquad.th.json); the `mlqa` loader keeps the
  text as it is. `TASK_FAMILIES` records both.
* **English labels on target-language data** (`ogx_xquad_en{lang}`): the same task with the
  English labels, which is `prompt_lang="en"` here.
* **Few-shot** (the tasks are zero-shot in COMMIT). The harness draws demonstrations from the
  evaluation split itself (XQuAD has no train split), drops the test document, and renders each
  as its prompt followed by ``" " + answers[0]``, joined by blank lines. The harness uses one
  random stream over all documents; here each example's draw is seeded by ``(seed, example id)``,
  so it does not depend on evaluation order or on `max_examples`.
* **Stopping.** ``greedy_until(ctx, ["\\n"])`` with up to 256 new tokens (`max_gen_toks`):
  generation stops at the first newline or EOS and the continuation is cut there.
* **Tokens.** `hf-causal-experimental` encodes with ``add_special_tokens=False`` (no BOS) and
  keeps the last ``max_length - 256`` prompt tokens, ``max_length`` being the model's
  ``max_position_embeddings``.
* **Metric.** `ogx_xquad` uses Hugging Face's ``squad`` metric, i.e. the official SQuAD v1.1
  script (`mode="squad_v1"`): lowercase, strip ASCII punctuation (`string.punctuation`), drop
  English articles, collapse whitespace, whitespace tokens for F1, max over gold answers, scaled
  to 0-100. That leaves the Hindi danda "।" and Thai punctuation in place and gives whitespace F1
  on Thai, where there are no spaces. `ogx_mlqa` uses MLQA's script instead (`mode="mlqa"`): all
  Unicode punctuation (category P*) plus `string.punctuation`, articles of the answer language,
  and "mixed segmentation" for Chinese (each CJK character is a token).

The task's own metric is the headline; ``mode="multilingual"`` is reported next to it. It removes
P* and ASCII punctuation, removes English articles a/an/the as SQuAD does, and tokenises by script
for F1 and EM: every CJK ideograph (and kana) is one token, as in MLQA; Thai, which has no spaces
and no segmenter among our dependencies, is split into characters too, each combining vowel or
tone mark kept with its base consonant; other scripts split on whitespace. So "北京" vs "北京市"
scores partial F1, and "दिल्ली।" matches "दिल्ली".
"""

from __future__ import annotations

import json
import random
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from easylm_align.errors import ConfigError, UserError


class SquadFormatError(UserError):
    """A SQuAD-format file that cannot be read; the message names the file and the record."""


@dataclass(frozen=True)
class QAExample:
    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    title: str = ""


def load_squad(path: str | Path) -> list[QAExample]:
    """Reads a SQuAD v1.1-format JSON file (`{"data": [{"paragraphs": [{"context", "qas"}]}]}`)."""
    path = Path(path)
    if not path.is_file():
        raise SquadFormatError(f"{path}: no such file")
    root = _read_json(path)
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise SquadFormatError(f"{path}: expected a JSON object with a 'data' list (SQuAD v1.1 format)")

    examples: list[QAExample] = []
    seen: set[str] = set()
    for a, article in enumerate(root["data"]):
        where_article = f"article {a}"
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise SquadFormatError(f"{path}: {where_article}: missing 'paragraphs' list")
        title = article.get("title") or ""
        if not isinstance(title, str):
            raise SquadFormatError(f"{path}: {where_article}: 'title' must be a string, got {title!r}")
        for p, paragraph in enumerate(paragraphs):
            where_paragraph = f"{where_article}, paragraph {p}"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str):
                raise SquadFormatError(f"{path}: {where_paragraph}: missing 'context' string")
            if not isinstance(paragraph.get("qas"), list):
                raise SquadFormatError(f"{path}: {where_paragraph}: missing 'qas' list")
            for q, qa in enumerate(paragraph["qas"]):
                examples.append(_read_qa(path, f"{where_paragraph}, question {q}", qa, paragraph["context"],
                                         title, seen))
    if not examples:
        raise SquadFormatError(f"{path}: contains no questions")
    return examples


def _read_json(path: Path) -> object:
    """The file's JSON value; bytes that are not UTF-8 and JSON syntax errors are named by line and column."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise SquadFormatError(f"{path}:{line}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8 "
                               "(the file must be UTF-8)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SquadFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise SquadFormatError(f"{path}: not valid SQuAD JSON (nested too deeply)") from None


def _read_qa(path: Path, where: str, qa: object, context: str, title: str, seen: set[str]) -> QAExample:
    if not isinstance(qa, dict):
        raise SquadFormatError(f"{path}: {where}: expected an object, got {type(qa).__name__}")
    qid = qa.get("id")
    if not isinstance(qid, str) or not qid:
        raise SquadFormatError(f"{path}: {where}: missing 'id'")
    label = f"{path}: question {qid!r} ({where})"
    if qid in seen:
        raise SquadFormatError(f"{label}: duplicate id")
    seen.add(qid)
    if not isinstance(qa.get("question"), str):
        raise SquadFormatError(f"{label}: missing 'question' string")
    if "answers" not in qa:
        raise SquadFormatError(f"{label}: missing 'answers'")
    answers = qa["answers"]
    if not isinstance(answers, list) or not all(isinstance(x, dict) and isinstance(x.get("text"), str)
                                                for x in answers):
        raise SquadFormatError(f"{label}: 'answers' must be a list of objects with a 'text' string")
    if not answers:
        raise SquadFormatError(f"{label}: 'answers' is empty (unanswerable SQuAD v2 questions are not supported)")
    return QAExample(qid, context, qa["question"], tuple(x["text"] for x in answers), title)


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

class PromptLabels(NamedTuple):
    background: str
    question: str
    answer: str


# The OpenGPT-X task's label words, per language (its earlier revision used "Ιστορικό:",
# "ερώτηση:", "απάντηση:" for Greek).
PROMPT_LABELS: dict[str, PromptLabels] = {
    "en": PromptLabels("Background:", "Question:", "Answer:"),
    "ar": PromptLabels(":معرفتي", ":سؤال", ":إجابه"),
    "de": PromptLabels("Hintergrund:", "Frage:", "Antwort:"),
    "el": PromptLabels("Πληροφορίες ιστορικού:", "Ερώτηση:", "Απάντηση:"),
    "es": PromptLabels("antecedentes:", "pregunta:", "respuesta:"),
    "hi": PromptLabels("पृष्ठभूमि:", "सवाल:", "उत्तर:"),
    "ro": PromptLabels("fundal:", "întrebare:", "Răspuns:"),
    "ru": PromptLabels("задний план:", "вопрос:", "отвечать:"),
    "th": PromptLabels("พื้นหลัง:", "คำถาม:", "ตอบ:"),
    "tr": PromptLabels("arka fon:", "soru:", "Cevap:"),
    "vi": PromptLabels("lý lịch:", "câu hỏi:", "câu trả lời:"),
    "zh": PromptLabels("背景:", "問題:", "答案:"),
}

@dataclass(frozen=True)
class TaskFamily:
    """What the fork's XQuAD and MLQA tasks do differently (`--eval.prompt_style` picks one)."""
    question_separator: str  # between the question label and the question
    strip_fields: bool       # the Hugging Face `xquad` loader strips context, question and answers
    metric: str              # the task's own metric: the report's headline EM/F1


TASK_FAMILIES = {"xquad": TaskFamily("", True, "squad_v1"), "mlqa": TaskFamily(" ", False, "mlqa")}


def stripped(example: QAExample) -> QAExample:
    """The example as the `xquad` dataset loader yields it: surrounding whitespace removed."""
    return QAExample(example.id, example.context.strip(), example.question.strip(),
                     tuple(a.strip() for a in example.answers), example.title)


def prompt_labels(lang: str) -> PromptLabels:
    try:
        return PROMPT_LABELS[lang]
    except KeyError:
        raise ConfigError(f"no prompt labels for language {lang!r}; known: {sorted(PROMPT_LABELS)}") from None


def question_block(example: QAExample, labels: PromptLabels, style: str = "xquad") -> str:
    """One example without its answer, ending at the answer label (no trailing space)."""
    if style not in TASK_FAMILIES:
        raise ConfigError(f"prompt style {style!r}: use one of {sorted(TASK_FAMILIES)}")
    return (f"{labels.background}\n\n{example.context}\n\n"
            f"{labels.question}{TASK_FAMILIES[style].question_separator}{example.question}\n\n{labels.answer}")


def build_prompt(example: QAExample, labels: PromptLabels, demonstrations: Sequence[QAExample] = (),
                 style: str = "xquad") -> str:
    """Demonstrations (each answered with its first gold answer), then the test question."""
    shots = [question_block(d, labels, style) + " " + d.answers[0] for d in demonstrations]
    return "\n\n".join(shots + [question_block(example, labels, style)])


def choose_demonstrations(examples: Sequence[QAExample], index: int, shots: int, seed: int) -> list[QAExample]:
    """`shots` other examples of the same file, drawn by a generator seeded with (seed, example id)."""
    if shots <= 0:
        return []
    if shots > len(examples) - 1:
        raise ConfigError(f"{shots} demonstrations requested but the file has only {len(examples) - 1} other questions")
    rng = random.Random(f"{seed}:{examples[index].id}")
    picks = rng.sample(range(len(examples) - 1), shots)
    return [examples[i if i < index else i + 1] for i in picks]  # skip the test example itself


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

METRIC_MODES = ("squad_v1", "mlqa", "multilingual")

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# MLQA's official script: the articles it removes per answer language (none for hi and zh).
_MLQA_ARTICLES = {
    "en": re.compile(r"\b(a|an|the)\b"),
    "es": re.compile(r"\b(un|una|unos|unas|el|la|los|las)\b"),
    "vi": re.compile(r"\b(của|là|cái|chiếc|những)\b"),
    "de": re.compile(r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b"),
    "ar": re.compile("ال^|ال"),
    "hi": None,
    "zh": None,
}
MLQA_LANGS = tuple(_MLQA_ARTICLES)
# CJK ideographs (unified, extension A, compatibility) and kana: one token per character.
_CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F))


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _is_thai(ch: str) -> bool:
    return 0x0E00 <= ord(ch) <= 0x0E7F


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str, mode: str = "squad_v1", lang: str = "en") -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles, collapse whitespace.

    `lang` (the answer's language) matters only to `mode="mlqa"`, whose articles depend on it.
    """
    _check_mode(mode, lang)
    if mode == "squad_v1":
        text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
        articles = _ARTICLES
    else:
        text = "".join(ch for ch in text.lower() if not _is_punct(ch))
        articles = _MLQA_ARTICLES[lang] if mode == "mlqa" else _ARTICLES
    if articles is not None:
        text = articles.sub(" ", text)
    return " ".join(_mixed_segmentation(text) if mode == "mlqa" and lang == "zh" else text.split())


def _check_mode(mode: str, lang: str) -> None:
    if mode not in METRIC_MODES:
        raise ValueError(f"metric mode {mode!r}: use one of {METRIC_MODES}")
    if mode == "mlqa" and lang not in _MLQA_ARTICLES:
        raise ConfigError(f"MLQA's metric has no rules for language {lang!r}; known: {sorted(MLQA_LANGS)}")


def _script_tokens(text: str) -> list[str]:
    """Whitespace tokens, with CJK characters and Thai character clusters split out."""
    tokens: list[str] = []
    for word in text.split():
        run, thai_open = "", False
        for ch in word:
            if _is_cjk(ch) or _is_thai(ch):
                if run:
                    tokens.append(run)
                    run = ""
                if thai_open and _is_thai(ch) and unicodedata.category(ch) in ("Mn", "Mc"):
                    tokens[-1] += ch  # combining vowel / tone mark stays with its consonant
                else:
                    tokens.append(ch)
                thai_open = _is_thai(ch)
            else:
                run += ch
                thai_open = False
        if run:
            tokens.append(run)
    return tokens


def _mixed_segmentation(text: str) -> list[str]:
    """MLQA's Chinese tokens: each character of U+4E00..U+9FA5 alone, whitespace between the rest."""
    return re.sub("([\u4e00-\u9fa5])", r" \1 ", text).split()


def answer_tokens(text: str, mode: str = "squad_v1", lang: str = "en") -> list[str]:
    """The tokens F1 and EM compare, after normalisation."""
    normalized = normalize_answer(text, mode, lang)
    return _script_tokens(normalized) if mode == "multilingual" else normalized.split()


def _f1(pred: list[str], gold: list[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:  # as SQuAD v1.1: also 0 when both are empty
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, golds: Sequence[str], mode: str = "squad_v1", lang: str = "en") -> float:
    """1.0 if the prediction equals any gold answer after normalisation."""
    pred = answer_tokens(prediction, mode, lang)
    return float(any(pred == answer_tokens(g, mode, lang) for g in golds))


def f1_score(prediction: str, golds: Sequence[str], mode: str = "squad_v1", lang: str = "en") -> float:
    """Token-overlap F1, the maximum over gold answers."""
    pred = answer_tokens(prediction, mode, lang)
    return max(_f1(pred, answer_tokens(g, mode, lang)) for g in golds)


def score_prediction(prediction: str, golds: Sequence[str], metric: str = "squad_v1",
                     lang: str = "en") -> dict[str, float]:
    """One prediction's scores in [0, 1]: `em`/`f1` by the task's metric, `multilingual_em`/`_f1`."""
    return {"em": exact_match(prediction, golds, metric, lang), "f1": f1_score(prediction, golds, metric, lang),
            "multilingual_em": exact_match(prediction, golds, "multilingual"),
            "multilingual_f1": f1_score(prediction, golds, "multilingual")}
