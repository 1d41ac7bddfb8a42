#!/usr/bin/env bash
# Generate text from a checkpoint: an interactive prompt loop by default (as Chinese-Transformer-XL's
# scripts/generate_text.sh), or any generate.py mode given after CKPT.
#
#   bash scripts/generate_text.sh runs/demo                     # TP size read from the checkpoint
#   bash scripts/generate_text.sh runs/demo --prompt 中国人民 --greedy
#   MP_SIZE=1 bash scripts/generate_text.sh runs/demo_MP1 --input-file prompts.txt --output-file out.jsonl
#
# Environment:
#   MP_SIZE (or Chinese-Transformer-XL's MPSIZE)  model-parallel ranks; default: the checkpoint's
#       tensor-parallel size (its model-state files), 1 for a safetensors export (any size works)
#   TEMP (0.9), TOPK (0), TOPP (0.9), MAX_NEW_TOKENS (256)  sampling defaults; flags after CKPT win
#   PYTHON (python), MASTER_PORT (29600)
#   DRY_RUN=1  print the command instead of running it
set -euo pipefail
cd "$(dirname "$0")/.."

CKPT=${1:?usage: scripts/generate_text.sh CKPT_DIR [generate.py flags...]}
shift

checkpoint_tp() {
    # The number of mp_rank_XX_model_states.pt files in the tag that 'latest' names.
    local n=0
    if [ -f "$CKPT/latest" ]; then
        n=$(ls "$CKPT/$(cat "$CKPT/latest")" 2>/dev/null \
            | grep -cE '^mp_rank_[0-9]+_model_states\.pt$' || true)
    fi
    [ "${n:-0}" -ge 1 ] && echo "$n" || echo 1
}

MP=${MP_SIZE:-${MPSIZE:-$(checkpoint_tp)}}
ARGS=(generate.py --load "$CKPT" --temperature "${TEMP:-0.9}" --top-k "${TOPK:-0}"
      --top-p "${TOPP:-0.9}" --max-new-tokens "${MAX_NEW_TOKENS:-256}" "$@")
if [ "$MP" -le 1 ]; then
    CMD=("${PYTHON:-python}" "${ARGS[@]}")
else
    CMD=(deepspeed --num_gpus "$MP" --master_port "${MASTER_PORT:-29600}" "${ARGS[@]}")
fi

if [ -n "${DRY_RUN:-}" ]; then
    echo "${CMD[*]}"
else
    exec "${CMD[@]}"
fi
