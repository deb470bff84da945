"""`python -m easylm_align.evaluate_icl`: few-shot classification (PAWS-X, XNLI, XCOPA) by log-likelihood.

AFP's in-context-learning evaluation (docs/AFP_NOTES.md §5) on an Orbax checkpoint: prompts and
demonstrations from `evaluation.icl_tasks`, each candidate continuation scored by
`evaluation.loglik.LoglikScorer`, the argmax of the summed log-likelihood (`acc`, AFP's metric)
and of the per-character one (`acc_norm`). Example (AFP's `pawsx_en-zh_seed0` grid):

    python -m easylm_align.evaluate_icl --load_checkpoint=params::ckpt --load_llama_config=7b \\
        --tokenizer.vocab_file=tokenizer.model --icl.tasks=pawsx --icl.prompt_langs=en \\
        --icl.sample_langs=en,zh --icl.shots=0,5 --icl.data_dir=../shared/data --icl.output=report.json

The report (JSON) holds the configuration, one entry per setting under AFP's metric name
(`pawsx_zh_s5_i0`: task, prompt and sample language, shots, seed, acc, acc_norm, n) and AFP's
averages (`avg_all`, `avg_zero`); a table is printed.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
from ml_collections import ConfigDict
from tqdm import tqdm

from easylm_align.errors import ConfigError
from easylm_align.evaluation import icl_tasks, runtime
from easylm_align.evaluation.loglik import LoglikScorer


def default_icl_config() -> ConfigDict:
    """`--icl.*`."""
    return ConfigDict(dict(
        tasks="pawsx",          # comma-separated: pawsx, xnli, xcopa
        prompt_langs="en",      # demonstration/template language per sample language (one: for all)
        sample_langs="en,zh",   # test-set languages
        shots="0,5",
        seeds="0",              # demonstration draws (AFP's infer_seeds); zero-shot runs once
        data_dir="",            # holds pawsx/, xnli/, xcopa/ (e.g. ../shared/data)
        limit=-1,               # the first N test examples per language; -1 = all
        batch_size=8,           # sequences per forward; a multiple of dp*fsdp
        add_bos_token=True,     # AFP's Hugging Face tokenizer prepends BOS
        eos_text="</s>",        # literal text read as the EOS id (AFP's connector); '' = plain text
        output="",              # report JSON path; '' = print only
    ))


def default_flags() -> ConfigDict:
    """The run configuration: the model flags and `--icl.*` (see `evaluate.default_flags`)."""
    return runtime.evaluator_flags(icl=default_icl_config())


def _split(value: str, flag: str, cast: Callable = str) -> list:
    try:
        items = [cast(x.strip()) for x in str(value).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--icl.{flag}={value!r}: expected a comma-separated list") from None
    if not items:
        raise ConfigError(f"--icl.{flag} is empty")
    return items


def settings_from_config(config: ConfigDict) -> list[icl_tasks.EvalSetting]:
    """Every (task, prompt language, sample language, shots, seed) of the `--icl.*` grid."""
    sample_langs = _split(config.sample_langs, "sample_langs")
    prompt_langs = _split(config.prompt_langs, "prompt_langs")
    if len(prompt_langs) == 1:
        prompt_langs *= len(sample_langs)
    if len(prompt_langs) != len(sample_langs):
        raise ConfigError(f"--icl.prompt_langs={config.prompt_langs!r} needs one language, or one per "
                         f"--icl.sample_langs={config.sample_langs!r}")
    shots, seeds = _split(config.shots, "shots", int), _split(config.seeds, "seeds", int)
    settings = []
    for task in _split(config.tasks, "tasks"):
        icl_tasks.get_task(task)
        settings += icl_tasks.afp_settings(task, prompt_langs, sample_langs, shots, seeds)
    return settings


def build_suite(config: ConfigDict) -> tuple[list[icl_tasks.EvalSetting], dict[str, list[icl_tasks.Request]]]:
    """The settings and their requests (reads the data files; cheap, so done before loading a model)."""
    if not config.data_dir:
        raise ConfigError("--icl.data_dir is required (the directory holding pawsx/, xnli/, xcopa/)")
    settings = settings_from_config(config)
    return settings, icl_tasks.build_suite(settings, config.data_dir, config.limit if config.limit > 0 else None)


def score_suite(settings: list[icl_tasks.EvalSetting], suite: dict[str, list[icl_tasks.Request]],
                scorer: icl_tasks.Scorer) -> dict:
    """Accuracy per setting (keyed by AFP's metric name) and AFP's averages of `acc` and `acc_norm`."""
    results = {}
    for s in tqdm(settings, desc="icl", leave=False, disable=jax.process_index() != 0):
        scores = icl_tasks.aggregate(icl_tasks.score_requests(suite[s.key], scorer))
        results[s.key] = dict(task=s.task, prompt_lang=s.prompt_lang, sample_lang=s.sample_lang, shots=s.shots,
                              seed=s.seed, **scores)
    averages = {metric: icl_tasks.afp_averages({k: r[metric] for k, r in results.items()})
                for metric in ("acc", "acc_norm")}
    return {"results": results, "averages": averages}


def format_table(report: dict) -> str:
    lines = [f"{'setting':<20}{'prompt':>7}{'sample':>7}{'shots':>6}{'n':>6}{'acc':>8}{'acc_norm':>10}"]
    for key, r in report["results"].items():
        lines.append(f"{key:<20}{r['prompt_lang']:>7}{r['sample_lang']:>7}{r['shots']:>6}{r['n']:>6}"
                     f"{r['acc']:>8.4f}{r['acc_norm']:>10.4f}")
    for name in report["averages"]["acc"]:
        acc, norm = report["averages"]["acc"][name], report["averages"]["acc_norm"][name]
        lines.append(f"{name:<46}{acc:>8.4f}{norm:>10.4f}")
    return "\n".join(lines)


def run(cfg: Any) -> dict:
    """Everything `main` does, from a flags-like object (FLAGS, or a ConfigDict of `default_flags()`)."""
    ic = cfg.icl
    settings, suite = build_suite(ic)
    params, llama, tok, mesh = runtime.load_model(cfg)
    scorer = LoglikScorer(llama, tok, params, mesh, ic.batch_size, ic.add_bos_token, ic.eos_text)
    start = time.time()
    report = score_suite(settings, suite, scorer)
    report["config"] = dict(ic.to_dict(), **runtime.model_description(cfg))
    report["seconds"], report["compilations"] = time.time() - start, scorer.num_compilations
    runtime.write_report(report, ic.output)
    return report


if __name__ == "__main__":
    runtime.run_program(default_flags(), run, format_table, lambda flags: flags.icl.output)
