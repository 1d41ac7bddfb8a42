#!/usr/bin/env bash
# `make demo`: the sample corpus -> a character tokenizer -> indexed datasets -> the tiny GPT
# pretrained through the deepspeed launcher on 2 CPU ranks at tensor-parallel size 2 -> evaluated
# on the validation split -> a continuation of a Chinese prompt generated at TP=2.
#
# Environment overrides (the test suite runs this script as a smoke test with small values):
#   DEMO_DATA (data/sample), DEMO_RUN (runs/demo), DEMO_TRAIN_ITERS (from configs/gpt/tiny.yaml),
#   DEMO_TRAIN_ARGS (more pretrain_gpt.py flags),
#   DEMO_PROMPT (中国人民), DEMO_NEW_TOKENS (48), DEMO_CHECK_LEARNING (1: fail unless the final
#   validation loss beats the unigram entropy of the validation targets by 0.3 nats)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DEMO_DATA:-data/sample}
RUN=${DEMO_RUN:-runs/demo}
PROMPT=${DEMO_PROMPT:-中国人民}
NEW_TOKENS=${DEMO_NEW_TOKENS:-48}
ITERS_FLAG=()
[ -n "${DEMO_TRAIN_ITERS:-}" ] && ITERS_FLAG=(--train-iters "$DEMO_TRAIN_ITERS")
read -r -a EXTRA_TRAIN_ARGS <<< "${DEMO_TRAIN_ARGS:-}"
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
# The tiny preset's model, trained longer and hotter than its seconds-long debug schedule.
deepspeed --num_gpus 2 pretrain_gpt.py --config configs/gpt/tiny.yaml \
    --train-iters 1000 --lr 1e-2 --min-lr 1e-3 --lr-warmup-iters 50 --eval-interval 250 \
    --save-interval 500 --tensor-model-parallel-size 2 --tokenizer "$DATA/tokenizer" \
    --train-data-prefix "$DATA/train" --valid-data-prefix "$DATA/valid" \
    --save "$RUN" --log-dir "$RUN/logs" "${ITERS_FLAG[@]}" "${EXTRA_TRAIN_ARGS[@]}" \
    --deepspeed --deepspeed_config configs/deepspeed/zero1.json

if [ "${DEMO_CHECK_LEARNING:-1}" = 1 ]; then
    # The model must beat a unigram model of the validation targets by at least 0.3 nats.
    python - "$RUN/logs/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "valid_loss" in l]
loss, entropy = rows[-1]["valid_loss"], rows[-1]["valid_unigram_entropy"]
margin = entropy - loss
print(f"validation loss {loss:.3f} vs unigram entropy {entropy:.3f}: {margin:.3f} nats better "
      f"({'PASS' if margin >= 0.3 else 'FAIL'}: at least 0.3 required)")
sys.exit(0 if margin >= 0.3 else 1)
PY
fi

echo "== 5/5 generate at TP=2 from $RUN"
deepspeed --num_gpus 2 generate.py --load "$RUN" --prompt "$PROMPT" --greedy --repetition-penalty 1.2 \
    --max-new-tokens "$NEW_TOKENS"

echo "demo finished in $(( $(date +%s) - start )) s; checkpoint: $RUN, logs: $RUN/logs"
