#!/usr/bin/env bash
# The language-adaptation pipeline of docs/VOCABULARY.md at demo scale, on the shared data:
# English base -> extend -> resize + embeddings stage -> code-mixed CLM + English replay -> COMMIT
# -> export -> XQuAD. Every step is the real command; sizes are tiny (demo model, tens of steps).
#   bash benchmarks/adaptation_demo.sh ../shared/data /tmp/adaptation_demo
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-/tmp/adaptation_demo}
STEPS=${STEPS:-40}
mkdir -p "$OUT"
SMALL=(--mesh_dim=1,-1,1 --total_steps=$STEPS --log_freq=$STEPS --logger.tensorboard=False)
python - "$DATA" "$OUT" <<'PY'
import json, sys
data, out = sys.argv[1:]
lines = open(f"{data}/mono/hi.ud_pud.txt", encoding="utf-8").read().splitlines()
open(f"{out}/hi_train.txt", "w", encoding="utf-8").write("\n".join(lines[:800]) + "\n")
open(f"{out}/hi_test.txt", "w", encoding="utf-8").write("\n".join(lines[800:]) + "\n")
open(f"{out}/hi_train.jsonl", "w", encoding="utf-8").write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines[:800]))
en = [r.split("\t")[0] for r in open(f"{data}/parallel/tatoeba.en-hi.tsv", encoding="utf-8").read().splitlines()]
open(f"{out}/en_test.txt", "w", encoding="utf-8").write("\n".join(en) + "\n")
PY

echo "== 0. an English base model (the demo model on the demo corpus)"
python -m easylm_align.train "${SMALL[@]}" --total_steps=300 --log_freq=300 --logger.output_dir="$OUT/base"

echo "== 1. extend the demo tokenizer with Hindi pieces"
python -m easylm_align.tools.extend_vocab --base=easylm_align/assets/demo_tokenizer.model \
  --corpus="$OUT/hi_train.txt" --vocab_size=5096 --output="$OUT/tokenizer_hi.model" \
  --heldout=hi="$OUT/hi_test.txt",en="$OUT/en_test.txt"

echo "== 2+3. resize (subword mean) and train the embeddings only, on Hindi"
python -m easylm_align.train "${SMALL[@]}" --logger.output_dir="$OUT/embeddings" \
  --load_checkpoint=params::"$OUT/base/checkpoints/streaming_params_300" \
  --tokenizer.vocab_file="$OUT/tokenizer_hi.model" --resize.pad_vocab_to_multiple=64 \
  --optimizer.trainable=embeddings --optimizer.adamw_optimizer.lr=2e-3 \
  --train_dataset.json_dataset.path="$OUT/hi_train.jsonl"

echo "== 4. code-mixed Hindi (hi-en, 0.5) with 25% English replay, all weights"
python -m easylm_align.train "${SMALL[@]}" --logger.output_dir="$OUT/aligned" \
  --load_checkpoint=params::"$OUT/embeddings/checkpoints/streaming_params_$STEPS" \
  --tokenizer.vocab_file="$OUT/tokenizer_hi.model" --resize.pad_vocab_to_multiple=64 \
  --train_dataset.type=mixture --train_dataset.mixture_dataset.seq_length=128 \
  --train_dataset.mixture_dataset.batch_size=8 \
  --train_dataset.mixture_dataset.component_0.weight=0.75 \
  --train_dataset.mixture_dataset.component_0.json_dataset.path="$OUT/hi_train.jsonl" \
  --train_dataset.mixture_dataset.component_0.text_processor.codemix_dict_path=dicts/hi-en.txt \
  --train_dataset.mixture_dataset.component_0.text_processor.codemix_ratio=0.5 \
  --train_dataset.mixture_dataset.component_1.weight=0.25
tail -1 "$OUT/aligned/metrics.jsonl"

echo "== 5. COMMIT on the Alpaca sample (en-hi, 0.9, template blocked)"
python -m easylm_align.train "${SMALL[@]}" --logger.output_dir="$OUT/commit" \
  --load_checkpoint=params::"$OUT/aligned/checkpoints/streaming_params_$STEPS" \
  --tokenizer.vocab_file="$OUT/tokenizer_hi.model" --resize.pad_vocab_to_multiple=64 \
  --train_dataset.json_dataset.path=easylm_align/assets/alpaca_sample.json \
  --train_dataset.text_processor.alpaca=True --train_dataset.text_processor.codemix_dict_path=dicts/en-hi.txt \
  --train_dataset.text_processor.codemix_ratio=0.9 --train_dataset.text_processor.block_codemix_in_template=True

echo "== 6. export to Hugging Face"
python -m easylm_align.convert_to_hf --load_checkpoint=params::"$OUT/commit/checkpoints/streaming_params_$STEPS" \
  --tokenizer_path="$OUT/tokenizer_hi.model" --output_dir="$OUT/hf" --dtype=fp32 --overwrite

echo "== 7. XQuAD (Hindi, English labels), the first 16 questions"
python -m easylm_align.evaluate --load_checkpoint=params::"$OUT/commit/checkpoints/streaming_params_$STEPS" \
  --tokenizer.vocab_file="$OUT/tokenizer_hi.model" --update_llama_config='{"vocab_size": 5120}' \
  --eval.squad_file="$DATA/xquad/xquad.hi.json" --eval.lang=hi --eval.prompt_lang=en \
  --eval.max_examples=16 --eval.max_new_tokens=16 --eval.output="$OUT/xquad_hi.json"
