r"""`python -m easylm_align.tools.sweep`: one training run per value of a train flag, then QA evaluation.

    python -m easylm_align.tools.sweep --param=train_dataset.text_processor.codemix_ratio \
        --values=0,0.25,0.5,0.75,0.9,1.0 --sweep_dir=sweeps/ratio \
        --eval.squad_file=xquad.hi.json --eval.lang=hi --eval.max_examples=200 \
        -- --total_steps=1210 --load_llama_config=7b --tokenizer.vocab_file=tokenizer.model ...

Everything after `--` is passed to `python -m easylm_align.train` unchanged, followed by
`--PARAM=VALUE` (the value exactly as written in `--values`) and
`--logger.output_dir=SWEEP_DIR/LEAF=VALUE`, where LEAF is the last component of `--param`
(`codemix_ratio=0.5`). Any train flag can be swept. Each run's final checkpoint
(`checkpoint.step_path(run_dir, total_steps)`) is then scored by `python -m easylm_align.evaluate`
with the run's own model flags (`run_config.model_part`: `--load_llama_config`,
`--update_llama_config`, `--llama.*`, `--tokenizer.*`, `--mesh_dim`, `--dtype`, `--param_dtype`),
plus the sweep's `--eval.*` flags. The report goes to `SWEEP_DIR/LEAF=VALUE/eval_{task}.json`.
Without `--eval.squad_file` evaluation is skipped.

Results: `SWEEP_DIR/sweep.csv`, `sweep.md` (a Markdown table) and `sweep.png` (EM and F1 against
the value; final train loss against the value). They are rewritten after every value.

Resuming: run the same command again. A value whose final checkpoint exists is not retrained.
A report that exists for the same checkpoint and eval settings is not recomputed. An interrupted
run is restarted in its own directory, so the trainer resumes from its latest checkpoint. A
directory trained with different flags refuses the sweep before anything runs: nothing is trained,
evaluated or rewritten (exit status 2).

Signals: SIGTERM or SIGINT (Ctrl-C) to the sweep is passed on to the running trainer or evaluator
(once; the children run in their own session, so a terminal's Ctrl-C reaches them only this way).
The sweep waits for it to exit (a trainer saves a checkpoint first, exit 75) and exits with status
75; running the same command again resumes that value.

Before anything runs, each value's train config is derived in this process, as the trainer would
parse its command line (`config.parse_config` on `train_config.default_config()`): a misspelt train flag,
a `--param` the trainer does not have or a value that is not of the flag's type fails at once.
A failed run is reported, the sweep goes on with the other values, and the exit status is 1.
Bad input exits with status 2.

Modules: `plan` (the input, checked, and each value's config), `state` (what a run directory
already holds), `orchestrate` (the train and eval subprocesses), `report` (CSV, Markdown, PNG),
`__main__` (the command line).
"""
