"""`python -m easylm_align.evaluate`: extractive QA (XQuAD, MLQA) by greedy generation, EM and F1.

Reproduces the OpenGPT-X harness tasks COMMIT reports (`ogx_xquad_{lang}`, `ogx_xquad_en{lang}`,
`ogx_mlqa_{lang}`) on an Orbax checkpoint, without exporting to Hugging Face; the prompt, stopping
rule and metrics are documented in `easylm_align.evaluation.squad`. Example:

    python -m easylm_align.evaluate --load_checkpoint=params::ckpt --load_llama_config=7b \\
        --tokenizer.vocab_file=tokenizer.model --eval.squad_file=xquad.hi.json --eval.lang=hi \\
        --eval.prompt_lang=en --eval.output=report.json

The report (JSON) holds the configuration, every example (prompt, prediction, gold answers,
scores) and the aggregate; a one-line table is printed. `exact_match`/`f1` are the task's own
metric, as the fork computes it (SQuAD v1.1 for XQuAD, MLQA's script for MLQA);
`multilingual_exact_match`/`multilingual_f1` use Unicode-aware normalisation. Tools that already
hold a model call `easylm_align.evaluation.qa.evaluate_squad`.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from easylm_align.errors import ConfigError
from easylm_align.evaluation import runtime, squad
from easylm_align.evaluation.qa import check_eval_config, default_eval_config, evaluate_squad, format_table


def default_flags() -> ConfigDict:
    """The run configuration: the model flags every program shares and `--eval.*`. Defined as
    absl flags only when run as a program, so importing this module defines no flag."""
    return runtime.evaluator_flags(eval=default_eval_config())


def run(cfg: Any) -> dict:
    """Everything `main` does, from a flags-like object (FLAGS, or a ConfigDict of `default_flags()`)."""
    ev = cfg.eval
    check_eval_config(ev)
    if not ev.squad_file:
        raise ConfigError("--eval.squad_file is required")
    examples = squad.load_squad(ev.squad_file)  # before loading the model: a bad file fails fast
    params, llama, tok, mesh = runtime.load_model(cfg, decodes=True)
    report = evaluate_squad(params, llama, tok, examples, ev, mesh)
    report["config"] = dict(report["config"], **runtime.model_description(cfg))
    runtime.write_report(report, ev.output)
    return report


if __name__ == "__main__":
    runtime.run_program(default_flags(), run, format_table, lambda flags: flags.eval.output)
