#!/usr/bin/env bash
# Pretrain a GPT under the deepspeed launcher, on one machine or several.
#
#   bash scripts/ds_pretrain_gpt.sh [more pretrain_gpt.py flags, which win over the defaults]
#
# One CPU machine (the defaults): the tiny GPT on the sample corpus left by `make demo`.
#   bash scripts/ds_pretrain_gpt.sh --train-iters 50
# Two GPU machines, 8 GPUs each, TP=2 inside each machine, ZeRO-2 in bf16:
#   HOST_FILE_PATH=hostfiles/example NUM_WORKERS=2 NUM_GPUS_PER_WORKER=8 MP_SIZE=2 \
#   DS_CONFIG=configs/deepspeed/zero2_bf16.json CONFIG=configs/gpt/linglong-317m.yaml \
#   DATA_DIR=/data/corpus SAVE=/data/runs/linglong bash scripts/ds_pretrain_gpt.sh
# Without ssh: run the same command on every machine, with LAUNCHER_ARGS="--no_ssh
#   --node_rank R --master_addr <machine 0>" (R = 0 .. NUM_WORKERS-1, the hostfile's order).
#
# Variables (see scripts/ds_launcher.sh for the launcher ones):
#   NUM_WORKERS, NUM_GPUS_PER_WORKER, MP_SIZE (default 1), HOST_FILE_PATH, DS_CONFIG,
#   MASTER_PORT, LAUNCHER_ARGS
#   CONFIG    model + training YAML (configs/gpt/tiny.yaml)
#   DATA_DIR  tokenizer/ and train.{bin,idx} (valid.* if present), as tools/preprocess_data.py
#             writes them (data/sample)
#   SAVE      checkpoint directory (runs/gpt); logs go to $SAVE/logs
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ds_launcher.sh"

MP_SIZE=${MP_SIZE:-1}
CONFIG=${CONFIG:-$ROOT/configs/gpt/tiny.yaml}
DATA_DIR=${DATA_DIR:-data/sample}
SAVE=${SAVE:-runs/gpt}

[ -f "$CONFIG" ] || die "CONFIG=$CONFIG does not exist (see configs/gpt/)"
[ -f "$DATA_DIR/train.idx" ] \
    || die "$DATA_DIR/train.idx not found: set DATA_DIR to a directory made like data/sample (make demo, or tools/preprocess_data.py)"
ds_resolve_launch

DATA_FLAGS=(--tokenizer "$DATA_DIR/tokenizer" --train-data-prefix "$DATA_DIR/train")
[ -f "$DATA_DIR/valid.idx" ] && DATA_FLAGS+=(--valid-data-prefix "$DATA_DIR/valid")

set -x
"${LAUNCH[@]}" "$ROOT/pretrain_gpt.py" --config "$CONFIG" "${DATA_FLAGS[@]}" \
    --tensor-model-parallel-size "$MP_SIZE" --save "$SAVE" \
    --deepspeed --deepspeed_config "$DS_CONFIG" "$@"
