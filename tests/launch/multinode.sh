#!/usr/bin/env bash
# A real multi-node launch on one machine: two "hosts" on the loopback addresses 127.0.0.2 and
# 127.0.0.3, each running one rank, through scripts/ds_pretrain_gpt.sh and the deepspeed
# launcher.
#
#   bash tests/launch/multinode.sh [no_ssh|ssh|all]      (make test-multinode; default: all)
#
#   no_ssh  one `deepspeed --no_ssh --node_rank R` command per host, TP=2 across the hosts.
#           Needs neither sshd nor pdsh: always runs.
#   ssh     starts sshd on both addresses (throwaway host and client keys, nothing written
#           outside WORK except sshd's /run/sshd), writes a hostfile naming them and launches
#           once with TP=2 across the hosts and once with DP=2 across the hosts, through pdsh
#           and ssh as on a real cluster. Installs openssh-server and pdsh with apt-get when
#           they are missing (needs root). Where that cannot work it prints "SKIP: <reason>"
#           and exits 77, never 0.
# Every run trains a few steps and must save a checkpoint with one model-state file per TP rank.
#
# Environment: WORK (scratch directory; default a new temporary one), DATA_DIR (tokenizer/ and
# train.{bin,idx}; default: built from the sample corpus in WORK), PYTHON (python).
set -euo pipefail

MODE=${1:-all}
case "$MODE" in no_ssh|ssh|all) ;; *) echo "usage: $0 [no_ssh|ssh|all]" >&2; exit 2 ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python}
WORK=${WORK:-$(mktemp -d -t multinode.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
HOSTS=(127.0.0.2 127.0.0.3)
SKIP=77

log() { echo "[multinode] $*" >&2; }
fail() { echo "FAIL: $*" >&2; exit 1; }
skip() { echo "SKIP: $*"; exit $SKIP; }
free_port() { "$PYTHON" -c "from megatron_lite.testing import free_port; print(free_port())"; }

# Processes this script starts and must stop (by pid) when it exits, however it exits.
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

if [ -z "${DATA_DIR:-}" ]; then
    DATA_DIR=$WORK/data
    if [ ! -f "$DATA_DIR/train.idx" ]; then
        log "building a small dataset in $DATA_DIR"
        "$PYTHON" tools/prepare_sample_corpus.py --out-dir "$DATA_DIR" >/dev/null
        "$PYTHON" tools/train_tokenizer.py --input "$DATA_DIR/valid.jsonl" \
            --output-dir "$DATA_DIR/tokenizer" --type char --preset linglong >/dev/null
        "$PYTHON" tools/preprocess_data.py --input "$DATA_DIR/valid.jsonl" \
            --output-prefix "$DATA_DIR/train" --tokenizer "$DATA_DIR/tokenizer" --workers 1 --quiet
    fi
fi
[ -f "$DATA_DIR/train.idx" ] || fail "DATA_DIR=$DATA_DIR has no train.idx"

HOSTFILE=$WORK/hostfile
printf '# two hosts on loopback addresses, one rank each\n%s slots=1\n%s slots=1\n' \
    "${HOSTS[@]}" > "$HOSTFILE"

TRAIN_FLAGS=(--train-iters 3 --lr-warmup-iters 1 --seq-length 32 --micro-batch-size 2
             --global-batch-size 4 --eval-interval none --log-interval 1 --no-progress-bar
             --peak-flops 1e12)

# check_run NAME TP DP: the run trained every step and saved one model-state file per TP rank,
# with the sizes it ran at recorded in the checkpoint.
check_run() {
    local name=$1 tp=$2 dp=$3 save=$WORK/$1
    [ "$(cat "$save/latest" 2>/dev/null)" = global_step3 ] || fail "$name: no checkpoint at step 3 in $save"
    [ "$(wc -l < "$save/logs/metrics.jsonl")" = 3 ] || fail "$name: metrics.jsonl does not have 3 steps"
    "$PYTHON" - "$save" "$tp" "$dp" <<'EOF' || fail "$name: the checkpoint does not match the launch"
import os, sys
from megatron_lite.checkpoint.checkpointing import read_model_states
save, tp, dp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
files = sorted(f for f in os.listdir(os.path.join(save, "global_step3")) if f.startswith("mp_rank"))
assert files == [f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)], files
for r in range(tp):
    _, meta, _ = read_model_states(save, r)
    assert (meta.tp_size, meta.dp_size, meta.step) == (tp, dp, 3), meta
EOF
    log "$name: trained 3 steps at TP=$tp DP=$dp, saved mp_rank_00..$(printf %02d $((tp - 1)))"
}

# launch NAME LOGFILE MP_SIZE LAUNCHER_ARGS: scripts/ds_pretrain_gpt.sh with both hosts.
launch() {
    local name=$1 logfile=$2 mp=$3 launcher_args=$4
    HOST_FILE_PATH=$HOSTFILE NUM_WORKERS=2 NUM_GPUS_PER_WORKER=1 MP_SIZE=$mp \
    DS_CONFIG=$ROOT/configs/deepspeed/zero1.json DATA_DIR=$DATA_DIR SAVE=$WORK/$name \
    LAUNCHER_ARGS=$launcher_args MASTER_PORT=$MASTER_PORT \
        timeout 600 bash scripts/ds_pretrain_gpt.sh "${TRAIN_FLAGS[@]}" >"$logfile" 2>&1
}

run_no_ssh() {
    log "no_ssh: one launcher per host, TP=2 across ${HOSTS[*]}"
    MASTER_PORT=$(free_port)
    local pids=() rank status=0
    for rank in 0 1; do
        launch no_ssh_tp2 "$WORK/no_ssh_node$rank.log" 2 \
            "--no_ssh --node_rank $rank --master_addr ${HOSTS[0]}" &
        pids+=($!)
        PIDS+=($!)
    done
    for rank in 0 1; do
        wait "${pids[$rank]}" || { status=$?; tail -n 40 "$WORK/no_ssh_node$rank.log" >&2; }
    done
    [ "$status" = 0 ] || fail "no_ssh launch exited with status $status (logs: $WORK/no_ssh_node*.log)"
    grep -q "node_rank=1" "$WORK/no_ssh_node1.log" || fail "no_ssh: the second command did not run node 1"
    check_run no_ssh_tp2 2 1
}

setup_sshd() {
    [ "$(id -u)" = 0 ] || skip "the loopback multi-node launch needs root (apt-get install, sshd for root); run as root, as CI does"
    if [ ! -x /usr/sbin/sshd ] || ! command -v pdsh >/dev/null 2>&1; then
        log "installing openssh-server and pdsh (apt-get)"
        command -v apt-get >/dev/null 2>&1 || skip "sshd/pdsh are missing and there is no apt-get to install them"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                openssh-server pdsh; } >"$WORK/apt.log" 2>&1; then
            skip "apt-get could not install openssh-server and pdsh: $(tail -n 3 "$WORK/apt.log" | tr '\n' ' ')"
        fi
    fi
    command -v ssh >/dev/null 2>&1 || skip "no ssh client after installing openssh-server"

    local dir=$WORK/ssh
    mkdir -p "$dir" /run/sshd
    chmod 700 "$dir"
    rm -f "$dir"/host_key* "$dir"/client_key*
    ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key"
    cp "$dir/client_key.pub" "$dir/authorized_keys"
    SSH_PORT=$(free_port)
    # Only our key, only on the two loopback addresses, only for this run.
    cat > "$dir/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress ${HOSTS[0]}
ListenAddress ${HOSTS[1]}
HostKey $dir/host_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
EOF
    /usr/sbin/sshd -D -e -f "$dir/sshd_config" 2>"$dir/sshd.log" &
    PIDS+=($!)
    SSH_OPTS="-i $dir/client_key -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=5"
    local host tries
    for host in "${HOSTS[@]}"; do
        for tries in $(seq 20); do
            # shellcheck disable=SC2086
            ssh $SSH_OPTS -p "$SSH_PORT" "root@$host" true 2>"$dir/ssh_check.log" && continue 2
            sleep 0.5
        done
        skip "sshd on $host:$SSH_PORT did not accept our key: $(tail -n 3 "$dir/sshd.log" "$dir/ssh_check.log" | tr '\n' ' ')"
    done
    # pdsh runs ssh with these options; the launcher adds -p for --ssh_port. DeepSpeed's own ssh
    # pre-check cannot take options, hence --no_ssh_check (the launch itself goes over ssh).
    export PDSH_SSH_ARGS_APPEND="$SSH_OPTS"
    # DeepSpeed hands the variables of a .deepspeed_env file to every node. A remote shell
    # starts with the system PATH; without this the ranks there would run the system's ninja,
    # whose build log differs from the venv's, and rebuild DeepSpeed's compiled ops each time.
    echo "PATH=$PATH" > "$WORK/deepspeed_env"
    if [ -n "${TORCH_EXTENSIONS_DIR:-}" ]; then
        echo "TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR" >> "$WORK/deepspeed_env"
    fi
    export DS_ENV_FILE=$WORK/deepspeed_env
    log "sshd up on ${HOSTS[*]}, port $SSH_PORT"
}

run_ssh() {
    setup_sshd
    local mp name
    for mp in 2 1; do
        if [ "$mp" = 2 ]; then name=ssh_tp2; else name=ssh_dp2; fi
        log "$name: deepspeed --hostfile over pdsh/ssh, MP_SIZE=$mp"
        MASTER_PORT=$(free_port)
        launch "$name" "$WORK/$name.log" "$mp" \
            "--ssh_port $SSH_PORT --no_ssh_check --master_addr ${HOSTS[0]}" \
            || { tail -n 60 "$WORK/$name.log" >&2; fail "$name: the launch failed (log: $WORK/$name.log)"; }
        # pdsh prefixes each host's output with its name: both hosts started a rank.
        grep -q "^${HOSTS[1]}: .*node_rank=1" "$WORK/$name.log" \
            || fail "$name: no rank ran on ${HOSTS[1]} (log: $WORK/$name.log)"
        check_run "$name" "$mp" $((2 / mp))
    done
}

case "$MODE" in
    no_ssh) run_no_ssh ;;
    ssh) run_ssh ;;
    all) run_no_ssh; run_ssh ;;
esac
log "passed ($MODE)"
