# Sourced by scripts/ds_*.sh: the recipe variables of Chinese-Transformer-XL's scripts, turned
# into one `deepspeed` launcher command. Not meant to be run on its own.
#
#   NUM_WORKERS          machines to run on (default: the hosts in HOST_FILE_PATH, else 1)
#   NUM_GPUS_PER_WORKER  ranks per machine (default: its GPUs; on a CPU machine, MP_SIZE ranks)
#   MP_SIZE              tensor-model-parallel size; the other ranks are data parallel
#   HOST_FILE_PATH       DeepSpeed hostfile ("worker-1 slots=8" lines, see hostfiles/example);
#                        empty (the default): this machine only, no ssh needed
#   DS_CONFIG            DeepSpeed engine JSON (configs/deepspeed/*.json)
#   MASTER_PORT          rendezvous port of rank 0 (default 29500, DeepSpeed's)
#   LAUNCHER_ARGS        more launcher flags, e.g. "--master_addr worker-1" or, one command per
#                        machine without ssh, "--no_ssh --node_rank 1 --master_addr worker-1"
#   DEEPSPEED            the launcher command (default: deepspeed on PATH, else the repo's .venv)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
    echo "error: $*" >&2
    exit 2
}

# `make demo` installs into .venv; without an activated environment, use that one.
if [ -z "${DEEPSPEED:-}" ] && ! command -v deepspeed >/dev/null 2>&1 \
        && [ -x "$ROOT/.venv/bin/deepspeed" ]; then
    export PATH="$ROOT/.venv/bin:$PATH"
fi
DEEPSPEED=${DEEPSPEED:-deepspeed}
PYTHON=${PYTHON:-python}

is_count() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# Fills the defaults, checks that the ranks fill whole TP groups, and sets LAUNCH (an array)
# and DP_SIZE.
# Call after MP_SIZE is known.
ds_resolve_launch() {
    HOST_FILE_PATH=${HOST_FILE_PATH:-}
    DS_CONFIG=${DS_CONFIG:-$ROOT/configs/deepspeed/zero1.json}
    MASTER_PORT=${MASTER_PORT:-29500}
    is_count "$MP_SIZE" || die "MP_SIZE must be a positive integer, got '$MP_SIZE'"
    if [ -n "$HOST_FILE_PATH" ]; then
        [ -f "$HOST_FILE_PATH" ] || die "HOST_FILE_PATH=$HOST_FILE_PATH does not exist (see hostfiles/example)"
        local hosts
        hosts=$(grep -cE '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOST_FILE_PATH" || true)
        [ "$hosts" -ge 1 ] || die "$HOST_FILE_PATH names no host: write lines like 'worker-1 slots=8'"
        NUM_WORKERS=${NUM_WORKERS:-$hosts}
        is_count "$NUM_WORKERS" || die "NUM_WORKERS must be a positive integer, got '$NUM_WORKERS'"
        [ "$NUM_WORKERS" -le "$hosts" ] \
            || die "NUM_WORKERS=$NUM_WORKERS but $HOST_FILE_PATH names only $hosts host(s)"
    else
        NUM_WORKERS=${NUM_WORKERS:-1}
        [ "$NUM_WORKERS" = 1 ] \
            || die "NUM_WORKERS=$NUM_WORKERS needs HOST_FILE_PATH, a hostfile naming the machines (see hostfiles/example)"
    fi
    if [ -z "${NUM_GPUS_PER_WORKER:-}" ]; then
        NUM_GPUS_PER_WORKER=$(gpu_count)
        # A CPU machine runs one rank per TP shard; its cores are split between them.
        [ "$NUM_GPUS_PER_WORKER" -gt 0 ] || NUM_GPUS_PER_WORKER=$MP_SIZE
    fi
    is_count "$NUM_GPUS_PER_WORKER" \
        || die "NUM_GPUS_PER_WORKER must be a positive integer, got '$NUM_GPUS_PER_WORKER'"
    local world=$((NUM_WORKERS * NUM_GPUS_PER_WORKER))
    (( world % MP_SIZE == 0 )) \
        || die "NUM_WORKERS x NUM_GPUS_PER_WORKER = $NUM_WORKERS x $NUM_GPUS_PER_WORKER = $world rank(s) cannot be split into tensor-parallel groups of MP_SIZE=$MP_SIZE: make the rank count a multiple of MP_SIZE"
    [ -f "$DS_CONFIG" ] || die "DS_CONFIG=$DS_CONFIG does not exist (see configs/deepspeed/)"
    command -v "$DEEPSPEED" >/dev/null 2>&1 \
        || die "'$DEEPSPEED' not found: run 'make install' and 'source .venv/bin/activate', or set DEEPSPEED"

    LAUNCH=("$DEEPSPEED" --num_gpus "$NUM_GPUS_PER_WORKER" --master_port "$MASTER_PORT")
    if [ -n "$HOST_FILE_PATH" ]; then
        LAUNCH+=(--hostfile "$HOST_FILE_PATH" --num_nodes "$NUM_WORKERS")
    fi
    local extra=()
    read -r -a extra <<< "${LAUNCHER_ARGS:-}"
    LAUNCH+=("${extra[@]}")
    DP_SIZE=$((world / MP_SIZE))
    echo "launching $world rank(s): $NUM_WORKERS worker(s) x $NUM_GPUS_PER_WORKER, tensor-parallel size $MP_SIZE, data-parallel size $DP_SIZE, engine $DS_CONFIG" >&2
}

# Reads a checkpoint's metadata (CKPT: a --save directory with `latest`) and sets CKPT_MODEL,
# CKPT_TP, CKPT_TOKENIZER, CKPT_MAX_POSITIONS (0 when the model has no position table) and
# MODEL_FLAGS (an array: the model's shape as flags, so every machine of a multi-node run gets
# it on the command line, with no file to copy around). A model of your own needs its
# --model-module among the recipe's extra flags.
ds_read_checkpoint() {
    [ -f "$1/latest" ] \
        || die "$1/latest not found: CKPT must be a checkpoint directory (what --save wrote, e.g. runs/demo)"
    command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found: source .venv/bin/activate or set PYTHON"
    local info
    info=$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$1" <<'EOF'
import os, shlex, sys
from megatron_lite.checkpoint.checkpointing import TOKENIZER_DIR, read_model_states
from megatron_lite.training.config import flag_name

_, meta, ckpt_dir = read_model_states(sys.argv[1], 0)
flags = []
for name, value in meta.model_config.items():
    if isinstance(value, bool):
        flags.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
    else:
        flags += [flag_name(name), "none" if value is None else
                  ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
print(f"CKPT_MODEL={shlex.quote(meta.model)}")
print(f"CKPT_TP={int(meta.tp_size)}")
print(f"CKPT_TOKENIZER={shlex.quote(os.path.join(ckpt_dir, TOKENIZER_DIR))}")
print(f"CKPT_MAX_POSITIONS={int(meta.model_config.get('max_position_embeddings') or 0)}")
print("MODEL_FLAGS=(" + " ".join(shlex.quote(f) for f in flags) + ")")
EOF
) || die "cannot read the checkpoint metadata of $1 (see the message above)"
    eval "$info"
}
