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
[ -f "$CKPT/latest" ] \
    || die "$CKPT/latest not found: CKPT must be a checkpoint directory (what --save wrote, e.g. runs/demo)"
[ -f "$DATA" ] || die "$DATA not found: expected a jsonl of {\"prompt\": ..., \"text\": ...} lines"
command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found: source .venv/bin/activate or set PYTHON"

# The checkpoint's metadata: its TP size, tokenizer and model shape (as flags, so every machine
# of a multi-node run gets them on the command line, with no file to copy around).
CKPT_INFO=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$CKPT" <<'EOF'
import os, shlex, sys
from megatron_lite.checkpoint.checkpointing import TOKENIZER_DIR, read_model_states
from megatron_lite.training.config import flag_name

_, meta, ckpt_dir = read_model_states(sys.argv[1], 0)
# The checkpoint's model; a model of your own needs its --model-module among the extra flags.
flags = ["--model", meta.model]
for name, value in meta.model_config.items():
    if isinstance(value, bool):
        flags.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
    else:
        flags += [flag_name(name), "none" if value is None else
                  ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
print(f"CKPT_TP={int(meta.tp_size)}")
print(f"CKPT_TOKENIZER={shlex.quote(os.path.join(ckpt_dir, TOKENIZER_DIR))}")
print(f"CKPT_MAX_POSITIONS={int(meta.model_config.get('max_position_embeddings') or 0)}")
print("MODEL_FLAGS=(" + " ".join(shlex.quote(f) for f in flags) + ")")
EOF
) || die "cannot read the checkpoint metadata of $CKPT (see the message above)"
eval "$CKPT_INFO"

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
"${LAUNCH[@]}" "$ROOT/pretrain_gpt.py" "${MODEL_FLAGS[@]}" --tokenizer "$CKPT_TOKENIZER" \
    --load "$CKPT" --finetune --finetune-data "$DATA" --save "$SAVE" \
    --seq-length "$SEQ_LENGTH" --micro-batch-size $MICRO_BATCH --global-batch-size $GLOBAL_BATCH --train-iters 100 \
    --lr 5e-4 --min-lr 5e-5 --lr-warmup-iters 10 --lr-decay-style cosine --log-interval 10 \
    --tensor-model-parallel-size "$MP_SIZE" \
    --deepspeed --deepspeed_config "$DS_CONFIG" "$@"
