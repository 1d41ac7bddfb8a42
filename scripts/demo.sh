#!/usr/bin/env bash
# `make demo`: the sample corpus -> a character tokenizer -> indexed datasets -> the tiny GPT
# pretrained through the deepspeed launcher on 2 CPU ranks at tensor-parallel size 2 -> evaluated
# on the validation split -> a continuation of a Chinese prompt generated at TP=2.
#
# Environment overrides (the test suite runs this script as a smoke test with small values):
#   DEMO_DATA (data/sample), DEMO_RUN (runs/demo), DEMO_TRAIN_ITERS (from configs/gpt/tiny.yaml),
#   DEMO_PROMPT (中国人民), DEMO_NEW_TOKENS (48)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DEMO_DATA:-data/sample}
RUN=${DEMO_RUN:-runs/demo}
PROMPT=${DEMO_PROMPT:-中国人民}
NEW_TOKENS=${DEMO_NEW_TOKENS:-48}
ITERS_FLAG=()
[ -n "${DEMO_TRAIN_ITERS:-}" ] && ITERS_FLAG=(--train-iters "$DEMO_TRAIN_ITERS")
start=$(date +%s)

echo "== 1/5 sample corpus -> $DATA"
python tools/prepare_sample_corpus.py --out-dir "$DATA"
echo "== 2/5 character tokenizer (LingLong specials)"
python tools/train_tokenizer.py --input "$DATA/train.jsonl" --output-dir "$DATA/tokenizer" \
    --type char --preset linglong
echo "== 3/5 indexed datasets"
for split in train valid; do
    python tools/preprocess_data.py --input "$DATA/$split.jsonl" --output-prefix "$DATA/$split" \
        --tokenizer "$DATA/tokenizer" --workers "$(nproc)"
done

echo "== 4/5 pretrain the tiny GPT: deepspeed, 2 CPU ranks, tensor-parallel size 2"
rm -rf "$RUN"
deepspeed --num_gpus 2 pretrain_gpt.py --config configs/gpt/tiny.yaml \
    --tensor-model-parallel-size 2 --tokenizer "$DATA/tokenizer" \
    --train-data-prefix "$DATA/train" --valid-data-prefix "$DATA/valid" \
    --save "$RUN" --log-dir "$RUN/logs" "${ITERS_FLAG[@]}" \
    --deepspeed --deepspeed_config configs/deepspeed/zero1.json

echo "== 5/5 generate at TP=2 from $RUN"
deepspeed --num_gpus 2 generate.py --load "$RUN" --prompt "$PROMPT" --greedy \
    --max-new-tokens "$NEW_TOKENS"

echo "demo finished in $(( $(date +%s) - start )) s; checkpoint: $RUN, logs: $RUN/logs"
