#!/bin/bash
# Our trainer on the reference run's settings, from the reference's init (docs/REFERENCE_CHECKS.md).
# usage: PARITY_DIR=... TOKENIZER=... our_run.sh NAME DEVICES OUT [data flags]
name=$1; devices=$2; out=$3; shift 3

export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$devices
rm -rf $out
python -m easylm_align.train --load_llama_config=debug --load_checkpoint=params::$PARITY_DIR/streaming_params_${name}_0 \
  --update_llama_config='{"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "fcm_max_ratio": 0.0}' \
  --tokenizer.vocab_file=$TOKENIZER --tokenizer.add_bos_token=True --tokenizer.add_eos_token=True \
  --total_steps=20 --log_freq=1 --logger.output_dir=$out --logger.tensorboard=False \
  --optimizer.type=adamw --optimizer.adamw_optimizer.init_lr=0.0 --optimizer.adamw_optimizer.lr=1e-3 \
  --optimizer.adamw_optimizer.end_lr=1e-5 --optimizer.adamw_optimizer.lr_warmup_steps=5 --optimizer.adamw_optimizer.lr_decay_steps=20 \
  --optimizer.adamw_optimizer.b1=0.9 --optimizer.adamw_optimizer.b2=0.999 --optimizer.adamw_optimizer.clip_gradient=1.0 \
  --optimizer.adamw_optimizer.weight_decay=0.1 --optimizer.adamw_optimizer.bf16_momentum=True \
  --train_dataset.type=json --train_dataset.json_dataset.seq_length=128 --train_dataset.json_dataset.batch_size=8 \
  --train_dataset.text_processor.reference_token_stream=True "$@"
