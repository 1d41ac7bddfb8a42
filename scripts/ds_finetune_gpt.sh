#!/usr/bin/env bash
# Fine-tune a GPT checkpoint on prompt/text pairs under the deepspeed launcher.
#
#   bash scripts/ds_finetune_gpt.sh CKPT DATA.jsonl [more pretrain_gpt.py flags]
#
# CKPT is a --save directory (with `latest`); DATA.jsonl has one {"prompt": ..., "text": ...} per
# line. The weights are loaded, the optimizer, LR schedule and data position are not
# (--finetune), and the loss is on the text tokens (and the end-of-document token) only: the
# prompt is context. The model's shape and tokenizer come from the checkpoint, so on the
# checkpoint `make demo` leaves this works as-is:
#   bash scripts/ds_finetune_gpt.sh runs/demo data/sample/finetune.jsonl
#
# Variables (see scripts/ds_launcher.sh for the launcher ones):
#   NUM_WORKERS, NUM_GPUS_PER_WORKER, HOST_FILE_PATH, DS_CONFIG, MASTER_PORT, LAUNCHER_ARGS
#   MP_SIZE  tensor-parallel size (default: the one the checkpoint was saved at; another size
#            needs `python change_mp.py CKPT N` first)
#   SAVE     where the fine-tuned checkpoints go (runs/finetune)
# Training defaults below (iterations, batch, LR, sequence length) are flags: pass your own after
# DATA.jsonl to change them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ds_launcher.sh"

[ $# -ge 2 ] || die "usage: $0 CKPT DATA.jsonl [pretrain_gpt.py flags...]"
CKPT=$1
DATA=$2
shift 2
SAVE=${SAVE:-runs/finetune}
ds_read_checkpoint "$CKPT"
[ -f "$DATA" ] || die "$DATA not found: expected a jsonl of {\"prompt\": ..., \"text\": ...} lines"

MP_SIZE=${MP_SIZE:-$CKPT_TP}
if [ "$MP_SIZE" != "$CKPT_TP" ]; then
    die "MP_SIZE=$MP_SIZE but $CKPT was saved at tensor-parallel size $CKPT_TP: reshard it first (python change_mp.py $CKPT $MP_SIZE) or leave MP_SIZE unset"
fi
ds_resolve_launch

# 8 samples per rank and at least 16 per step, whatever the data-parallel size.
MICRO_BATCH=8
GLOBAL_BATCH=$(( (16 + MICRO_BATCH * DP_SIZE - 1) / (MICRO_BATCH * DP_SIZE) * MICRO_BATCH * DP_SIZE ))
SEQ_LENGTH=128
if [ "$CKPT_MAX_POSITIONS" -gt 0 ] && [ "$CKPT_MAX_POSITIONS" -lt "$SEQ_LENGTH" ]; then
    SEQ_LENGTH=$CKPT_MAX_POSITIONS
fi

set -x
"${LAUNCH[@]}" "$ROOT/pretrain_gpt.py" --model "$CKPT_MODEL" "${MODEL_FLAGS[@]}" --tokenizer "$CKPT_TOKENIZER" \
    --load "$CKPT" --finetune --finetune-data "$DATA" --save "$SAVE" \
    --seq-length "$SEQ_LENGTH" --micro-batch-size $MICRO_BATCH --global-batch-size $GLOBAL_BATCH --train-iters 100 \
    --lr 5e-4 --min-lr 5e-5 --lr-warmup-iters 10 --lr-decay-style cosine --log-interval 10 \
    --tensor-model-parallel-size "$MP_SIZE" \
    --deepspeed --deepspeed_config "$DS_CONFIG" "$@"
