#!/usr/bin/env bash
# Fine-tune a Transformer-XL checkpoint on prompt/text pairs under the deepspeed launcher, as
# Chinese-Transformer-XL's scripts/ds_finetune_gpt_2.9B.sh does.
#
#   bash scripts/ds_finetune_txl.sh CKPT DATA.jsonl [more pretrain_gpt.py flags]
#
# CKPT is a --save directory (with `latest`): ours, or the release imported by
# tools/convert_txl.py. DATA.jsonl has one {"prompt": ..., "text": ...} per line. The weights are
# loaded, the optimizer, LR schedule and data position are not (--finetune); each pair is a
# document of its own (no memory crosses pairs) and the loss is on the text tokens (and the
# end-of-document token) only. Optimizer, schedule and clipping are CONFIG's; the model's shape
# and tokenizer the checkpoint's. Each rank takes 8 pairs per step (MICRO_BATCH), no
# accumulation, as the original recipe.
#
# Variables (see scripts/ds_launcher.sh for the launcher ones):
#   NUM_WORKERS, NUM_GPUS_PER_WORKER, HOST_FILE_PATH, MASTER_PORT, LAUNCHER_ARGS
#   MP_SIZE     tensor-parallel size (default: the checkpoint's; another needs
#               `python change_mp.py CKPT N` first)
#   DS_CONFIG   engine JSON (default configs/transformer_xl/ds_finetune.json: ZeRO-2 as the
#               original's; its _fp16 twin on a GPU machine). ZeRO-Offload, for a model that does
#               not fit: set "device": "cpu" in its zero_optimization.offload_optimizer block.
#   CONFIG      training YAML (configs/transformer_xl/finetune.yaml)
#   MICRO_BATCH pairs per rank per step (8)
#   SAVE        where the fine-tuned checkpoints go (runs/finetune_txl)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ds_launcher.sh"

[ $# -ge 2 ] || die "usage: $0 CKPT DATA.jsonl [pretrain_gpt.py flags...]"
CKPT=$1
DATA=$2
shift 2
SAVE=${SAVE:-runs/finetune_txl}
CONFIG=${CONFIG:-$ROOT/configs/transformer_xl/finetune.yaml}
MICRO_BATCH=${MICRO_BATCH:-8}
ds_read_checkpoint "$CKPT"
[ -f "$DATA" ] || die "$DATA not found: expected a jsonl of {\"prompt\": ..., \"text\": ...} lines"
[ -f "$CONFIG" ] || die "CONFIG=$CONFIG does not exist (see configs/transformer_xl/)"
is_count "$MICRO_BATCH" || die "MICRO_BATCH must be a positive integer, got '$MICRO_BATCH'"

MP_SIZE=${MP_SIZE:-$CKPT_TP}
if [ "$MP_SIZE" != "$CKPT_TP" ]; then
    die "MP_SIZE=$MP_SIZE but $CKPT was saved at tensor-parallel size $CKPT_TP: reshard it first (python change_mp.py $CKPT $MP_SIZE) or leave MP_SIZE unset"
fi
if [ -z "${DS_CONFIG:-}" ]; then
    DS_CONFIG=$ROOT/configs/transformer_xl/ds_finetune.json
    [ "$(gpu_count)" -gt 0 ] && DS_CONFIG=$ROOT/configs/transformer_xl/ds_finetune_fp16.json
fi
ds_resolve_launch

# Segments of 512 (the original's), or what the checkpoint's position encoding leaves beside
# its memory.
MEM_LENGTH=0
for ((i = 0; i + 1 < ${#MODEL_FLAGS[@]}; i++)); do
    [ "${MODEL_FLAGS[i]}" = --mem-length ] && MEM_LENGTH=${MODEL_FLAGS[i + 1]}
done
SEQ_LENGTH=512
if [ "$CKPT_MAX_POSITIONS" -gt 0 ] && [ $((CKPT_MAX_POSITIONS - MEM_LENGTH)) -lt "$SEQ_LENGTH" ]; then
    SEQ_LENGTH=$((CKPT_MAX_POSITIONS - MEM_LENGTH))
fi

set -x
"${LAUNCH[@]}" "$ROOT/pretrain_gpt.py" --model "$CKPT_MODEL" --config "$CONFIG" "${MODEL_FLAGS[@]}" \
    --tokenizer "$CKPT_TOKENIZER" --load "$CKPT" --finetune --finetune-data "$DATA" --save "$SAVE" \
    --seq-length "$SEQ_LENGTH" --micro-batch-size "$MICRO_BATCH" \
    --global-batch-size $((MICRO_BATCH * DP_SIZE)) --tensor-model-parallel-size "$MP_SIZE" \
    --deepspeed --deepspeed_config "$DS_CONFIG" "$@"
