#!/usr/bin/env bash
# Fine-tune a Longformer checkpoint for sequence classification under the deepspeed launcher.
#
#   bash scripts/ds_finetune_longformer.sh CKPT DATA.jsonl [more pretrain_longformer.py flags]
#
# CKPT is a --save directory of pretrain_longformer.py (or of tools/convert_to_long.py or
# tools/convert_hf.py); DATA.jsonl has one {"text": ..., "label": ...} per line. The encoder's
# weights are loaded, its MLM head is dropped and a classification head on [CLS] starts fresh
# (the log names both); the optimizer, LR schedule and data position start anew (--finetune).
# The classes are the training lines' labels. 10% of the lines are held out (a fixed split;
# --valid-fraction F, or --valid-classify-data FILE for a file of its own) and validation
# reports the loss and the accuracy on them. On the sample corpus:
#   bash scripts/ds_finetune_longformer.sh runs/longformer data/sample/reviews.jsonl
#
# Variables (see scripts/ds_launcher.sh for the launcher ones):
#   NUM_WORKERS, NUM_GPUS_PER_WORKER, HOST_FILE_PATH, DS_CONFIG, MASTER_PORT, LAUNCHER_ARGS
#   MP_SIZE  tensor-parallel size (default: the one the checkpoint was saved at; another size
#            needs `python change_mp.py CKPT N` first)
#   SAVE     where the fine-tuned checkpoints go (runs/finetune_longformer)
# Training defaults below (iterations, batch, LR, sequence length) are flags: pass your own after
# DATA.jsonl to change them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ds_launcher.sh"

[ $# -ge 2 ] || die "usage: $0 CKPT DATA.jsonl [pretrain_longformer.py flags...]"
CKPT=$1
DATA=$2
shift 2
SAVE=${SAVE:-runs/finetune_longformer}
ds_read_checkpoint "$CKPT"
[ -f "$DATA" ] || die "$DATA not found: expected a jsonl of {\"text\": ..., \"label\": ...} lines"

MP_SIZE=${MP_SIZE:-$CKPT_TP}
if [ "$MP_SIZE" != "$CKPT_TP" ]; then
    die "MP_SIZE=$MP_SIZE but $CKPT was saved at tensor-parallel size $CKPT_TP: reshard it first (python change_mp.py $CKPT $MP_SIZE) or leave MP_SIZE unset"
fi
ds_resolve_launch

# 16 examples per rank and at least 32 per step, whatever the data-parallel size.
MICRO_BATCH=16
GLOBAL_BATCH=$(( (32 + MICRO_BATCH * DP_SIZE - 1) / (MICRO_BATCH * DP_SIZE) * MICRO_BATCH * DP_SIZE ))
SEQ_LENGTH=256
if [ "$CKPT_MAX_POSITIONS" -gt 0 ] && [ "$CKPT_MAX_POSITIONS" -lt "$SEQ_LENGTH" ]; then
    SEQ_LENGTH=$CKPT_MAX_POSITIONS
fi

set -x
"${LAUNCH[@]}" "$ROOT/pretrain_longformer.py" --model longformer_classifier "${MODEL_FLAGS[@]}" \
    --tokenizer "$CKPT_TOKENIZER" --load "$CKPT" --finetune --classify-data "$DATA" --save "$SAVE" \
    --seq-length "$SEQ_LENGTH" --micro-batch-size $MICRO_BATCH --global-batch-size $GLOBAL_BATCH --train-iters 300 \
    --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 30 --lr-decay-style linear --weight-decay 0.01 \
    --log-interval 10 --eval-interval 100 --eval-iters 20 \
    --tensor-model-parallel-size "$MP_SIZE" \
    --deepspeed --deepspeed_config "$DS_CONFIG" "$@"
