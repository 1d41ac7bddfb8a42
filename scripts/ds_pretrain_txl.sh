#!/usr/bin/env bash
# Pretrain a Transformer-XL (Chinese-Transformer-XL) under the deepspeed launcher: the GPT recipe
# (scripts/ds_pretrain_gpt.sh, same variables) with the model and its config switched.
#
#   bash scripts/ds_pretrain_txl.sh [more pretrain_gpt.py flags, which win over the defaults]
#
# One CPU machine (the defaults): the tiny XL on the sample corpus left by `make demo`.
#   bash scripts/ds_pretrain_txl.sh --train-iters 50
# The released shape (2.9B) on 8 machines of 8 GPUs, TP=2, ZeRO-2 in fp16:
#   HOST_FILE_PATH=hostfiles/example NUM_WORKERS=8 NUM_GPUS_PER_WORKER=8 MP_SIZE=2 \
#   DS_CONFIG=configs/deepspeed/zero2_fp16.json CONFIG=configs/transformer_xl/txl-2.9b.yaml \
#   DATA_DIR=/data/corpus SAVE=/data/runs/txl bash scripts/ds_pretrain_txl.sh
#
# Variables: those of scripts/ds_pretrain_gpt.sh; CONFIG defaults to
# configs/transformer_xl/tiny.yaml and SAVE to runs/txl.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=${CONFIG:-$ROOT/configs/transformer_xl/tiny.yaml} SAVE=${SAVE:-runs/txl} \
    exec bash "$ROOT/scripts/ds_pretrain_gpt.sh" --model transformer_xl "$@"
