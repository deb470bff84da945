"""Extractive QA by greedy generation (XQuAD, MLQA as COMMIT's harness fork runs them): the
`--eval.*` settings, the prompts, and `evaluate_squad`, which decodes and scores a model already in
memory (the evaluator `python -m easylm_align.evaluate`, evaluation during training, the sweep).
The prompt, stopping rule and metrics are documented in `easylm_align.evaluation.squad`."""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict
from tqdm import tqdm

from easylm_align import model, tokenizer
from easylm_align.errors import ConfigError
from easylm_align.evaluation import squad
from easylm_align.evaluation.generation import GreedyDecoder


def default_eval_config() -> ConfigDict:
    """`--eval.*`."""
    return ConfigDict(dict(
        squad_file="",         # SQuAD v1.1-format JSON: xquad.hi.json, MLQA test-context-hi-question-hi.json
        lang="",               # language of the data (picks the prompt labels unless prompt_lang is set)
        prompt_lang="",        # language of the Background/Question/Answer labels; '' = lang, 'en' = ogx_xquad_en{lang}
        prompt_style="xquad",  # the fork's task family: 'xquad' or 'mlqa' (prompt, loader, metric)
        shots=0,               # demonstrations drawn from the same file (COMMIT: 0)
        seed=42,               # demonstration sampling
        max_new_tokens=256,    # the harness's max_gen_toks; prompts keep their last window - this tokens
        batch_size=8,
        max_examples=-1,       # evaluate the first N questions; -1 = all
        add_bos_token=False,   # the harness's hf-causal-experimental encodes prompts without BOS
        output="",             # report JSON path; '' = print only
    ))


def task_name(config: ConfigDict) -> str:
    """The harness-style name: xquad_hi, xquad_enhi (English labels on Hindi data), mlqa_hi."""
    prompt_lang = config.prompt_lang or config.lang
    prefix = "en" if prompt_lang == "en" and config.lang != "en" else ""
    return f"{config.prompt_style}_{prefix}{config.lang}"


def check_eval_config(config: ConfigDict) -> None:
    if not config.lang:
        raise ConfigError("--eval.lang is required (the language of the data, e.g. hi)")
    squad.prompt_labels(config.prompt_lang or config.lang)
    if config.prompt_style not in squad.TASK_FAMILIES:
        raise ConfigError(f"--eval.prompt_style={config.prompt_style!r}: use one of {sorted(squad.TASK_FAMILIES)}")
    if config.prompt_style == "mlqa" and config.lang not in squad.MLQA_LANGS:
        raise ConfigError(f"--eval.lang={config.lang!r}: MLQA's metric knows only {sorted(squad.MLQA_LANGS)}")
    if config.shots < 0 or config.batch_size < 1 or config.max_new_tokens < 1:
        raise ConfigError("--eval.shots must be >= 0, --eval.batch_size and --eval.max_new_tokens >= 1")


def build_prompts(examples: Sequence[squad.QAExample], config: ConfigDict
                  ) -> tuple[list[squad.QAExample], list[str]]:
    """The evaluated examples (the first `max_examples`, as the task's loader yields them) and
    their prompts; demonstrations are drawn from all of `examples`."""
    labels = squad.prompt_labels(config.prompt_lang or config.lang)
    if squad.TASK_FAMILIES[config.prompt_style].strip_fields:
        examples = [squad.stripped(ex) for ex in examples]
    subset = list(examples[:config.max_examples] if config.max_examples > 0 else examples)
    prompts = [squad.build_prompt(ex, labels, squad.choose_demonstrations(examples, i, config.shots, config.seed),
                                  config.prompt_style) for i, ex in enumerate(subset)]
    return subset, prompts


def evaluate_squad(params: Any, llama: model.LlamaForCausalLM, tok: tokenizer.Tokenizer,
                   examples: Sequence[squad.QAExample], config: ConfigDict, mesh: Mesh | None,
                   decoder: GreedyDecoder | None = None) -> dict:
    """Generates an answer for each example and scores it; returns the report dict.

    `examples` is the whole file: demonstrations are drawn from all of it, while only the first
    `config.max_examples` are evaluated. Prompts are decoded in batches of similar length. Pass
    the same `decoder` to repeated calls (e.g. one per language) to reuse its compiled functions.
    """
    check_eval_config(config)
    decoder = decoder or GreedyDecoder(llama, tok, config.max_new_tokens, mesh)
    if decoder.max_new_tokens != config.max_new_tokens:
        raise ValueError(f"decoder.max_new_tokens={decoder.max_new_tokens} but --eval.max_new_tokens="
                         f"{config.max_new_tokens}")
    family = squad.TASK_FAMILIES[config.prompt_style]
    subset, prompts = build_prompts(examples, config)
    bos = [tok.bos_id] if config.add_bos_token else []
    token_ids = [bos + ids for ids in tok.encode_batch(prompts)]

    predictions: list[str] = [""] * len(subset)
    generated: list[list[int]] = [[] for _ in subset]
    order = sorted(range(len(subset)), key=lambda i: len(token_ids[i]))  # similar lengths share a batch
    start_time = time.time()
    for start in tqdm(range(0, len(order), config.batch_size), desc=task_name(config), leave=False,
                      disable=jax.process_index() != 0):
        rows = order[start:start + config.batch_size]
        out = decoder.generate(params, [token_ids[i] for i in rows], config.batch_size)
        for i, ids, text in zip(rows, out.token_ids, out.texts):
            generated[i], predictions[i] = ids, text
    seconds = time.time() - start_time

    records = []
    for ex, prompt, ids, gen, pred in zip(subset, prompts, token_ids, generated, predictions):
        records.append(dict(id=ex.id, prompt=prompt, prediction=pred, golds=list(ex.answers),
                            prompt_tokens=len(ids), truncated=len(ids) > decoder.max_prompt_length,
                            generated_tokens=len(gen),
                            **squad.score_prediction(pred, ex.answers, family.metric, config.lang)))

    def mean(key: str) -> float:  # percent, as SQuAD reports
        return 100.0 * float(np.mean([r[key] for r in records]))

    aggregate = dict(task=task_name(config), num_examples=len(records), metric=family.metric,
                     exact_match=mean("em"), f1=mean("f1"),
                     multilingual_exact_match=mean("multilingual_em"), multilingual_f1=mean("multilingual_f1"),
                     truncated_prompts=sum(r["truncated"] for r in records),
                     generated_tokens=sum(r["generated_tokens"] for r in records),
                     seconds=seconds, compilations=decoder.num_compilations)
    return {"config": config.to_dict(), "aggregate": aggregate, "examples": records}


def format_table(report: dict) -> str:
    agg = report["aggregate"]
    header = f"{'task':<14}{'metric':>10}{'n':>6}{'EM':>8}{'F1':>8}{'EM(multi)':>11}{'F1(multi)':>11}"
    row = (f"{agg['task']:<14}{agg['metric']:>10}{agg['num_examples']:>6}{agg['exact_match']:>8.2f}"
           f"{agg['f1']:>8.2f}{agg['multilingual_exact_match']:>11.2f}{agg['multilingual_f1']:>11.2f}")
    return f"{header}\n{row}"
