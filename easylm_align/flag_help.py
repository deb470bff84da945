"""One-line descriptions of the flags, for `--help` / `--helpfull`.

absl describes a `ConfigDict` group as one flag whose help is the whole dict, so the dotted flags
users actually set (`--optimizer.adamw_optimizer.lr`) would have no description. The descriptions
are data here, keyed by dotted name; the data groups shared by `--train_dataset.*` and
`--eval_dataset.*` are keyed once, under `dataset.`. `usage` lists every flag a program defines
with its default and description; `config.parse_flags_or_exit` prints it for the help flags.
"""

from __future__ import annotations

from typing import Any, Mapping

_DATASET_GROUPS = ("train_dataset.", "eval_dataset.")

DESCRIPTIONS: dict[str, str] = {
    # The trainer
    "seed": "random seed of the initialisation, dropout and the train step's RNG",
    "total_steps": "optimizer steps to train (a resumed run continues up to it)",
    "log_freq": "log a metrics row every N steps (and at the last step)",
    "save_model_freq": "save the latest checkpoint every N steps, replacing the previous one; 0 = only at the end",
    "save_milestone_freq": "keep a checkpoint every N steps (never deleted); 0 = none",
    "eval_steps": "batches of --eval_dataset evaluated at each logged step; 0 = no evaluation",
    "dry_run": "compile the train step for abstract arrays, print its memory per device, and exit",
    "dry_run_topology": "with --dry_run: compile for this TPU slice (v3-8, v4-8, ...) with XLA's TPU compiler, "
                        "on a host without a TPU (needs libtpu: pip install 'jax[tpu]')",
    "nonfinite_policy": "stop (exit 1, keep the last good checkpoint) or skip a step with a non-finite loss",
    "objective": "training objective: clm (causal LM) or afp (contrastive alignment + CLM)",
    # The model flags every program shares
    "load_checkpoint": "params::PATH (weights) or trainstate::PATH (weights, optimizer, step); PATH may be a glob",
    "load_llama_config": "LLaMA preset (demo, debug, 7b, llama2_7b, ...); evaluators: '' = the checkpoint's",
    "update_llama_config": "JSON object of LLaMA config fields overriding the preset",
    "mesh_dim": "device mesh dp,fsdp,mp; -1 takes the remaining devices",
    "dtype": "compute dtype: fp32, bf16 or fp16",
    "param_dtype": "parameter dtype: fp32, bf16 or fp16",
    "tokenizer.vocab_file": "SentencePiece model, tokenizer.json, HF model directory or Llama 3 tiktoken file "
                            "(default: the demo tokenizer shipped in the package)",
    "tokenizer.add_bos_token": "begin every example with BOS",
    "tokenizer.add_eos_token": "end every example with EOS",
    "tokenizer.allow_mismatch": "load a checkpoint recorded with another tokenizer (refused by default)",
    "jax_distributed.initialize_jax_distributed": "call jax.distributed.initialize (multi-host runs)",
    "jax_distributed.coordinator_address": "host:port of process 0 (jax.distributed)",
    "jax_distributed.num_processes": "number of processes (jax.distributed)",
    "jax_distributed.process_id": "this process's index (jax.distributed)",
    "jax_distributed.local_device_ids": "comma-separated local device ids this process uses (jax.distributed)",
    # Data (--train_dataset.* and --eval_dataset.*)
    "dataset.type": "data source: json (local files), huggingface, afp, codemix_pairs",
    "dataset.json_dataset.path": "JSON-lines, JSON-list or .txt file(s) (a glob); .txt: one `text` record per line",
    "dataset.json_dataset.seq_length": "tokens per row (type=json)",
    "dataset.json_dataset.batch_size": "rows per global batch (type=json)",
    "dataset.json_dataset.on_bad_line": "error (stop, naming file:line) or skip a record that cannot be used",
    "dataset.huggingface_dataset.path": "hub data set name, `json`/`text` with data_files, or a local file or directory",
    "dataset.huggingface_dataset.name": "the data set's configuration name",
    "dataset.huggingface_dataset.split": "split to read (local files: train)",
    "dataset.huggingface_dataset.streaming": "stream the hub data set instead of downloading it whole",
    "dataset.huggingface_dataset.data_files": "file or glob for path=json/text",
    "dataset.huggingface_dataset.seq_length": "tokens per row (type=huggingface)",
    "dataset.huggingface_dataset.batch_size": "rows per global batch (type=huggingface)",
    "dataset.huggingface_dataset.on_bad_line": "local files: error (stop, naming file:line) or skip a bad record",
    "dataset.afp_dataset.path": "AFP pairs: JSON lines or TSV (sent0, sent1[, hard_neg])",
    "dataset.afp_dataset.seq_length": "tokens per CLM row (type=afp)",
    "dataset.afp_dataset.batch_size": "examples per global batch (type=afp)",
    "dataset.afp_dataset.pair_length": "tokens per sentence of a pair",
    "dataset.afp_dataset.on_bad_line": "error or skip a bad line",
    "dataset.codemix_pairs_dataset.path": "text whose sentences are paired with their code-mixed version",
    "dataset.codemix_pairs_dataset.seq_length": "tokens per CLM row (type=codemix_pairs)",
    "dataset.codemix_pairs_dataset.batch_size": "examples per global batch (type=codemix_pairs)",
    "dataset.codemix_pairs_dataset.pair_length": "tokens per sentence of a pair",
    "dataset.codemix_pairs_dataset.text_field": "the JSON field holding the text",
    "dataset.codemix_pairs_dataset.on_bad_line": "error or skip a bad line",
    "dataset.text_processor.type": "fields or alpaca; '' = alpaca if --*.alpaca, else fields",
    "dataset.text_processor.fields": "EasyLM fields spec: [prompt],answer (brackets: no loss), a+b joins fields",
    "dataset.text_processor.subfield_separator": "joins the fields of a+b",
    "dataset.text_processor.alpaca": "format records as Stanford Alpaca prompts (loss on the response)",
    "dataset.text_processor.alpaca_lang": "language of the Alpaca template",
    "dataset.text_processor.codemix_dict_path": "MUSE dictionary (source target per line) to code-mix with",
    "dataset.text_processor.codemix_ratio": "probability that a dictionary word is replaced",
    "dataset.text_processor.codemix_seed": "seed of the code-mixing draws (per example)",
    "dataset.text_processor.codemix_min_coverage": "stop if fewer of the first 1,000 words are in the dictionary; 0 = off",
    "dataset.text_processor.block_codemix_in_template": "never code-mix the Alpaca template (the paper's COMMIT)",
    "dataset.text_processor.codemix_lowercase_fallback": "also look a word up in lowercase",
    "dataset.text_processor.codemix_whitespace_split": "split words at any whitespace run (reference: ' ' only)",
    "dataset.text_processor.reference_token_stream": "COMMIT's exact token stream, for bit-for-bit replication",
    "dataset.separate_segments": "keep packed examples apart (own positions, no attention across them)",
    "dataset.num_workers": "processes that tokenize and code-mix; 0 = in the trainer",
    "dataset.shuffle_buffer": "shuffle records within windows of N; 0 = source order (EasyLM's)",
    "dataset.shuffle_seed": "seed of the window shuffle",
    # Optimizer
    "optimizer.type": "optimizer: adamw",
    "optimizer.accumulate_gradient_steps": "micro-batches accumulated per optimizer step",
    "optimizer.adamw_optimizer.lr": "peak learning rate",
    "optimizer.adamw_optimizer.init_lr": "learning rate at step 0 (warm-up start)",
    "optimizer.adamw_optimizer.end_lr": "learning rate at the end of the decay",
    "optimizer.adamw_optimizer.lr_warmup_steps": "linear warm-up steps",
    "optimizer.adamw_optimizer.lr_decay_steps": "step at which the cosine decay reaches end_lr (warm-up included)",
    "optimizer.adamw_optimizer.b1": "Adam beta1",
    "optimizer.adamw_optimizer.b2": "Adam beta2",
    "optimizer.adamw_optimizer.eps": "Adam epsilon",
    "optimizer.adamw_optimizer.weight_decay": "decoupled weight decay",
    "optimizer.adamw_optimizer.clip_gradient": "clip the global gradient norm to this",
    "optimizer.adamw_optimizer.bf16_momentum": "keep Adam's first moment in bf16",
    "optimizer.adamw_optimizer.fused": "one fused update over all parameters",
    # Objectives
    "objectives.clm_weight": "weight of the causal LM loss",
    "objectives.cl_weight": "weight of the contrastive loss",
    "objectives.hard_negative_weight": "extra weight of hard negatives in the contrastive loss",
    "objectives.temperature": "contrastive softmax temperature",
    "objectives.pooler": "sentence representation for the contrastive loss (e.g. last-1)",
    "objectives.loss_kernel": "cross-entropy implementation (auto picks one for the platform)",
    "objectives.loss_chunk_size": "positions per chunk of the chunked cross entropy (0 = unchunked)",
    "objectives.loss_vocab_chunk_size": "vocabulary columns per slice of the chunked cross entropy (0 = off; "
                                        "less memory for big vocabularies, one more head pass; loss_kernel xla)",
    # Logging
    "logger.output_dir": "run directory: metrics.jsonl, config.json, checkpoints/; rerun to resume",
    "logger.tensorboard": "also write TensorBoard events",
    "logger.peak_flops_per_device": "peak FLOP/s per device for MFU (0 = known devices' figure)",
    "logger.online": "log to Weights & Biases",
    "logger.project": "W&B project",
    "logger.prefix": "W&B project prefix (PREFIX--PROJECT)",
    "logger.experiment_id": "W&B run id ('' = drawn once and kept in the run directory)",
    "logger.entity": "W&B entity",
    "logger.notes": "W&B notes",
    # QA evaluation during training
    "squad_eval.freq": "evaluate SQuAD-format QA every N steps; 0 = never",
    "squad_eval.squad_file": "SQuAD v1.1-format JSON (XQuAD, MLQA)",
    "squad_eval.lang": "language of the QA data",
    "squad_eval.prompt_lang": "language of the prompt labels ('' = lang)",
    "squad_eval.prompt_style": "xquad or mlqa",
    "squad_eval.shots": "demonstrations per question",
    "squad_eval.seed": "demonstration sampling seed",
    "squad_eval.max_new_tokens": "longest generated answer",
    "squad_eval.batch_size": "questions decoded together",
    "squad_eval.max_examples": "first N questions; -1 = all",
    "squad_eval.add_bos_token": "prepend BOS to prompts",
    # python -m easylm_align.evaluate
    "eval.squad_file": "SQuAD v1.1-format JSON: xquad.hi.json, MLQA test-context-hi-question-hi.json",
    "eval.lang": "language of the data",
    "eval.prompt_lang": "language of the Background/Question/Answer labels ('' = lang)",
    "eval.prompt_style": "xquad or mlqa (prompt, loader, metric)",
    "eval.shots": "demonstrations drawn from the same file",
    "eval.seed": "demonstration sampling seed",
    "eval.max_new_tokens": "longest generated answer (the harness's max_gen_toks)",
    "eval.batch_size": "questions decoded together",
    "eval.max_examples": "first N questions; -1 = all",
    "eval.add_bos_token": "prepend BOS to prompts (the harness does not)",
    "eval.output": "report JSON path ('' = print only)",
    # python -m easylm_align.evaluate_icl
    "icl.tasks": "comma-separated: pawsx, xnli, xcopa",
    "icl.prompt_langs": "template language per sample language (one: for all)",
    "icl.sample_langs": "test-set languages",
    "icl.shots": "comma-separated numbers of demonstrations",
    "icl.seeds": "demonstration draws",
    "icl.data_dir": "directory holding pawsx/, xnli/, xcopa/",
    "icl.limit": "first N test examples per language; -1 = all",
    "icl.batch_size": "sequences per forward",
    "icl.add_bos_token": "prepend BOS",
    "icl.eos_text": "literal text read as the EOS id ('' = plain text)",
    "icl.output": "report JSON path ('' = print only)",
    # Added with the reference-fidelity, reliability and adaptation work
    "resume_despite_changes": "comma-separated flags (or groups) a resume may change though they change results",
    "objectives.loss_average": "CLM loss mean: row (EasyLM, COMMIT), token (AFP), auto (the objective's reference)",
    "objectives.reference_ranks": "AFP: reproduce a W-rank data-parallel reference run (with clm_groups=W)",
    "optimizer.adamw_optimizer.weight_decay_exclude": "regex over parameter paths spared from weight decay ('' = "
                                                      "decay all, EasyLM's)",
    "optimizer.adamw_optimizer.variant": "adamw_torch (ε after the bias correction) or adamw_hf (AFP's Trainer)",
    "optimizer.freeze_eos_embedding": "keep EOS's input-embedding row untrained (AFP's padding_idx)",
    "optimizer.trainable": "train only these parameters: a regex over paths or embeddings, lm_head, norms ('' = all)",
    "resize.init": "new vocabulary rows: subword_mean (of the old pieces), mean (of all rows) or random",
    "resize.old_tokenizer": "the tokenizer the checkpoint was trained with ('' = the one it records)",
    "resize.pad_vocab_to_multiple": "round the grown vocabulary up to a multiple of N (0 = no padding)",
    "resize.seed": "seed of resize.init=random",
    "dataset.epoch_tail": "tokens left at an epoch's end: drop, carry, or auto (huggingface drops, json carries)",
    "dataset.afp_dataset.clm_layout": "AFP CLM rows: blocks (the reference's grouping) or rows (packed, with EOS)",
    "dataset.afp_dataset.clm_groups": "build the CLM blocks per group of batch/W examples (a W-rank reference run)",
    "dataset.codemix_pairs_dataset.clm_layout": "CLM rows: rows (packed) or blocks (AFP's grouping)",
    "dataset.codemix_pairs_dataset.clm_groups": "build the CLM blocks per group of batch/W examples",
    "dataset.mixture_dataset.seq_length": "tokens per row (type=mixture)",
    "dataset.mixture_dataset.batch_size": "rows per global batch (type=mixture)",
    "dataset.mixture_dataset.seed": "seed of the order in which components are drawn",
    "dataset.mixture_dataset.component.type": "this component's source: json or huggingface ('' = unused)",
    "dataset.mixture_dataset.component.weight": "this component's share of the examples drawn",
}

_COMPONENT = "dataset.mixture_dataset.component_"


def description(name: str) -> str:
    """The description of the dotted flag `name`, or ''."""
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    for group in _DATASET_GROUPS:
        if name.startswith(group):
            return description("dataset." + name[len(group):])
    if name.startswith(_COMPONENT):  # component_K.x: a mixture component's own source and processor flags
        index, _, rest = name[len(_COMPONENT):].partition(".")
        text = DESCRIPTIONS.get(f"{_COMPONENT[:-1]}.{rest}") or description(f"dataset.{rest}")
        return f"mixture component {index}: {text}" if text else ""
    if name.startswith("llama."):
        return f"override the LLaMA config field {name[6:]} (unset: the preset's value)"
    return ""


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in tree.items():
        if hasattr(value, "items"):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def usage(defaults: Mapping[str, Any], doc: str = "") -> str:
    """`doc`, then one line per flag: `--name=default  description`."""
    lines = [doc.strip(), ""] if doc else []
    lines.append("Flags (--name=default  description); dotted names set one field of a group:")
    for name, value in sorted(_leaves(defaults)):
        shown = value if value is not None else "(unset)"
        text = description(name)
        lines.append(f"  --{name}={shown}" + (f"  {text}" if text else ""))
    return "\n".join(lines)
