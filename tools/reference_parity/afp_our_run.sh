#!/bin/bash
# Our trainer with configs/afp_en_zh.flags as shipped, model/tokenizer/data/batch/schedule overridden to
# afp_reference_run.py's run (docs/REFERENCE_CHECKS.md): its tiny model converted from $PARITY_DIR/hf, its
# data file in the order its sampler visited it (shuffling off here), 20 steps at lr 1e-3, warmup
# ceil(3% of 20) = 1, fp32.  usage: PARITY_DIR=... afp_our_run.sh OUT [more flags]
out=$1; shift

export JAX_PLATFORMS=cpu
rm -rf $out
python -m easylm_align.train --flagfile=configs/afp_en_zh.flags \
  --load_checkpoint=params::$PARITY_DIR/ckpt --load_llama_config=debug \
  --update_llama_config='{"hidden_size": 64, "intermediate_size": 176, "max_position_embeddings": 1024, "rms_norm_eps": 1e-05}' \
  --tokenizer.vocab_file=$PARITY_DIR/hf/tokenizer.model --train_dataset.afp_dataset.path=$PARITY_DIR/ordered.json \
  --train_dataset.shuffle_buffer=0 --total_steps=20 --optimizer.adamw_optimizer.lr=1e-3 \
  --optimizer.adamw_optimizer.lr_warmup_steps=1 --optimizer.adamw_optimizer.lr_decay_steps=20 \
  --dtype=fp32 --log_freq=1 --save_model_freq=0 --save_milestone_freq=0 \
  --logger.output_dir=$out --logger.tensorboard=False "$@"
