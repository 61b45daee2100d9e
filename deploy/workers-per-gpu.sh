#!/usr/bin/env bash
# Start one moe-worker per local NVIDIA GPU (GPU N on --device cuda:N, port BASE_PORT+N), or stop them.
#
#   deploy/workers-per-gpu.sh start   # prints: --workers HOST:PORT,...
#   deploy/workers-per-gpu.sh status
#   deploy/workers-per-gpu.sh stop
#
# On stdout `start` prints only the --workers argument for the coordinator, so this works (the workers start
# empty and receive their share of the experts from the coordinator, once; they need no copy of the model):
#   moe-coordinator serve --model /srv/models/Mixtral-8x7B $(deploy/workers-per-gpu.sh start)
#
# Settings (environment):
#   MODEL        optional: a local copy of the checkpoint for the workers to read instead of receiving it
#   GPUS         GPU indices, e.g. GPUS=1,2 (default: every GPU that `nvidia-smi -L` lists); leave out the
#                GPU the coordinator runs on when it is on this machine
#   HOST         address to listen on (default 127.0.0.1); anything but loopback needs MOESHARD_TOKEN
#   ADVERTISE    host name the coordinator should use (default: HOST, or `hostname` when HOST is 0.0.0.0/::)
#   BASE_PORT    port of GPU 0 (default 50051)
#   MEMORY       memory offered per worker, e.g. 20GiB (default: the worker's own, 80% of what is free)
#   SLOTS        experts per layer kept on each GPU (default 2)
#   EXPERT_BITS  with MODEL: HQQ bits for the hosted experts (16, 8, 4, 3, 2), as the coordinator's --expert-bits
#                (without MODEL the workers compute in whatever format the coordinator sends)
#   EXTRA_ARGS   more moe-worker flags, space-separated (e.g. "--disk 200GiB --tls-cert c.pem --tls-key k.pem")
#   RUN_DIR      where logs (worker-N.log), pids (worker-N.pid) and ready files go (default ./moeshard-workers)
#   MOE_WORKER   the moe-worker program (default: moe-worker on PATH, e.g. an activated virtualenv)
#   WAIT_S       seconds `start` waits for every worker to report SERVING (default 900; 0 = don't wait)
#   DRY_RUN=1    print the commands instead of running them
# The token is passed to the workers through the environment, never on their command lines.
set -euo pipefail

MODEL=${MODEL:-}
GPUS=${GPUS:-}
HOST=${HOST:-127.0.0.1}
ADVERTISE=${ADVERTISE:-}
BASE_PORT=${BASE_PORT:-50051}
MEMORY=${MEMORY:-}
SLOTS=${SLOTS:-2}
EXPERT_BITS=${EXPERT_BITS:-}
EXTRA_ARGS=${EXTRA_ARGS:-}
RUN_DIR=${RUN_DIR:-./moeshard-workers}
MOE_WORKER=${MOE_WORKER:-moe-worker}
WAIT_S=${WAIT_S:-900}
DRY_RUN=${DRY_RUN:-0}
GRACE_S=10

die() {
    echo "workers-per-gpu.sh: error: $*" >&2
    exit 2
}

info() {
    echo "workers-per-gpu.sh: $*" >&2
}

usage() {
    echo "usage: [GPUS=0,1] [HOST=...] [MODEL=...] $0 start|stop|status" >&2
    exit 2
}

is_loopback() {
    case "$1" in
        127.* | localhost | ::1 | "[::1]") return 0 ;;
        *) return 1 ;;
    esac
}

is_uint() {
    [[ $1 =~ ^[0-9]+$ ]]
}

# GPU indices, one per line: from GPUS=0,1 or from `nvidia-smi -L` ("GPU 0: NVIDIA ... (UUID: ...)").
gpu_indices() {
    local gpu
    if [[ -n $GPUS ]]; then
        local -a list
        IFS=',' read -r -a list <<<"$GPUS"
        for gpu in "${list[@]}"; do
            gpu=${gpu//[[:space:]]/}
            is_uint "$gpu" || die "GPUS=$GPUS: expected GPU indices such as 0,1"
            echo "$gpu"
        done
        return
    fi
    command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: install the NVIDIA driver, or set GPUS=0,1"
    local listing
    listing=$(nvidia-smi -L) || die "nvidia-smi -L failed (is the NVIDIA driver loaded?)"
    sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p' <<<"$listing"
}

# The pid in a pid file, if that process is alive and is a moe-worker (a recycled pid is not ours).
live_pid() {
    local pid_file=$1 pid
    [[ -f $pid_file ]] || return 1
    pid=$(<"$pid_file")
    is_uint "$pid" || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r /proc/$pid/cmdline ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q 'moe-worker' || return 1
    fi
    echo "$pid"
}

cmd_start() {
    local indices
    local -a gpus extra
    indices=$(gpu_indices)
    [[ -n $indices ]] || die "no NVIDIA GPU found by nvidia-smi -L; set GPUS=0,1 to choose"
    mapfile -t gpus <<<"$indices"
    is_uint "$BASE_PORT" || die "BASE_PORT=$BASE_PORT: expected a port number"
    is_uint "$SLOTS" || die "SLOTS=$SLOTS: expected a whole number"
    [[ -z $EXPERT_BITS || -n $MODEL ]] || die "EXPERT_BITS applies with MODEL (a local copy of the checkpoint);" \
        "workers without MODEL compute in the format the coordinator sends"
    if ! is_loopback "$HOST" && [[ -z ${MOESHARD_TOKEN:-} ]]; then
        die "HOST=$HOST is not loopback: export MOESHARD_TOKEN (e.g. \$(openssl rand -hex 32)) and give the" \
            "coordinator the same token"
    fi
    if [[ $DRY_RUN != 1 ]] && ! command -v "$MOE_WORKER" >/dev/null 2>&1; then
        die "$MOE_WORKER not found: activate moeshard's virtualenv or set MOE_WORKER=/path/to/moe-worker"
    fi
    local advertise=$ADVERTISE
    if [[ -z $advertise ]]; then
        case "$HOST" in
            0.0.0.0 | :: | "[::]") advertise=$(hostname) ;;
            *) advertise=$HOST ;;
        esac
    fi
    read -r -a extra <<<"$EXTRA_ARGS"
    # cuda:N means the same GPU as nvidia-smi's GPU N only in PCI bus order (CUDA's default is fastest first).
    export CUDA_DEVICE_ORDER=PCI_BUS_ID
    local gpu port listen pid_file log_file ready_file pid
    if [[ $DRY_RUN != 1 ]]; then
        mkdir -p "$RUN_DIR"
        for gpu in "${gpus[@]}"; do
            if pid=$(live_pid "$RUN_DIR/worker-$gpu.pid"); then
                die "GPU $gpu: a moe-worker (pid $pid) is already running from $RUN_DIR; run '$0 stop' first"
            fi
        done
    fi
    local -a addresses=() started=() cmd
    for gpu in "${gpus[@]}"; do
        port=$((BASE_PORT + gpu))
        listen="$HOST:$port"
        [[ $HOST == *:* && $HOST != \[* ]] && listen="[$HOST]:$port"
        pid_file="$RUN_DIR/worker-$gpu.pid"
        log_file="$RUN_DIR/worker-$gpu.log"
        ready_file="$RUN_DIR/worker-$gpu.ready"
        cmd=("$MOE_WORKER" --listen "$listen" --device "cuda:$gpu" --slots-per-layer "$SLOTS" --grace "$GRACE_S"
            --ready-file "$ready_file")
        [[ -n $MODEL ]] && cmd+=(--model "$MODEL")
        [[ -n $MEMORY ]] && cmd+=(--memory "$MEMORY")
        [[ -n $EXPERT_BITS ]] && cmd+=(--expert-bits "$EXPERT_BITS")
        cmd+=("${extra[@]}")
        addresses+=("$advertise:$port")
        if [[ $DRY_RUN == 1 ]]; then
            printf '%q ' "${cmd[@]}"
            printf '>>%q 2>&1 &\n' "$log_file"
            continue
        fi
        rm -f "$ready_file"
        nohup "${cmd[@]}" >>"$log_file" 2>&1 </dev/null &
        echo "$!" >"$pid_file"
        started+=("$gpu")
        info "GPU $gpu: moe-worker pid $! on $listen, log $log_file"
    done

    if [[ $DRY_RUN != 1 && $WAIT_S -gt 0 ]]; then
        local deadline=$((SECONDS + WAIT_S))
        for gpu in "${started[@]}"; do
            until [[ -s $RUN_DIR/worker-$gpu.ready ]]; do
                # kill -0, not live_pid: until exec, a fresh child's command line is still this script's.
                if ! kill -0 "$(<"$RUN_DIR/worker-$gpu.pid")" 2>/dev/null; then
                    tail -n 20 "$RUN_DIR/worker-$gpu.log" >&2 || true
                    die "GPU $gpu: moe-worker exited before SERVING (log above: $RUN_DIR/worker-$gpu.log);" \
                        "'$0 stop' stops the others"
                fi
                ((SECONDS < deadline)) || die "GPU $gpu: not SERVING after $WAIT_S s (see $RUN_DIR/worker-$gpu.log)"
                sleep 0.2
            done
        done
        info "all ${#started[@]} workers are SERVING"
    fi
    [[ -z $EXPERT_BITS ]] || info "start the coordinator with --expert-bits $EXPERT_BITS too"
    local IFS=','
    echo "--workers ${addresses[*]}"
}

cmd_stop() {
    local pid_file pid
    local -a pids=()
    shopt -s nullglob
    for pid_file in "$RUN_DIR"/worker-*.pid; do
        if pid=$(live_pid "$pid_file"); then
            if [[ $DRY_RUN == 1 ]]; then
                echo "kill -TERM $pid"
                continue
            fi
            kill -TERM "$pid" 2>/dev/null || continue
            pids+=("$pid")
            info "sent SIGTERM to moe-worker pid $pid ($pid_file)"
        fi
        [[ $DRY_RUN == 1 ]] || rm -f "$pid_file" "${pid_file%.pid}.ready"
    done
    # Workers drain in-flight requests for --grace seconds after SIGTERM; SIGKILL only past that.
    local deadline=$((SECONDS + GRACE_S + 5))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= deadline)); then
                info "pid $pid still running after $((GRACE_S + 5)) s: SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
    done
    info "stopped ${#pids[@]} workers"
}

cmd_status() {
    local pid_file pid running=0
    shopt -s nullglob
    for pid_file in "$RUN_DIR"/worker-*.pid; do
        if pid=$(live_pid "$pid_file"); then
            running=$((running + 1))
            echo "$(basename "$pid_file" .pid): pid $pid, $([[ -s ${pid_file%.pid}.ready ]] && echo SERVING || echo loading)"
        else
            echo "$(basename "$pid_file" .pid): not running (stale $pid_file)"
        fi
    done
    ((running > 0)) || info "no moe-worker running from $RUN_DIR"
    ((running > 0))
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) usage ;;
esac
