# Sourced by slurm/*.sbatch from the repository root: arguments, the Python environment, the
# config's values (launch/slurm_args.py vars), node addresses and per-job ports.
# Sets CONFIG, OVERRIDES and the DISTIL_* variables of distil/slurm_args.py:stage_variables.
# Exit status (docs/install.md, "Exit status"): 0 = done, 2 = a user error whose fix the message names
# (die), 1 = a failure a resubmission may cure (fail); a stage's own command passes its 1 or 2 through.

die() { echo "error: $*" >&2; exit 2; }
fail() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date '+%F %T') ${SLURM_JOB_NAME:-distil} ${SLURM_JOB_ID:-}] $*"; }

[[ $# -ge 1 ]] || die "usage: sbatch slurm/$(basename "${0%.*}").sbatch CONFIG.yaml [section.key=value ...]"
CONFIG=$1
shift
OVERRIDES=("$@")
[[ -f $CONFIG ]] || die "config $CONFIG not found from $PWD; submit from the repository root or give an absolute path"

# The Python environment: slurm.env_setup (or DISTIL_SLURM_ENV_SETUP), else the one sbatch was called from.
applied_env_setup=${DISTIL_SLURM_ENV_SETUP:-}
if [[ -n $applied_env_setup ]]; then
  eval "$applied_env_setup" || die "slurm.env_setup failed: $applied_env_setup"
fi
python -c "import distil" 2>/dev/null \
  || die "python ($(command -v python || echo 'not on PATH')) cannot import distil on $(hostname -s): set" \
         "slurm.env_setup in $CONFIG (e.g. 'source .venv/bin/activate') or activate the environment before sbatch"
stage_vars=$(python launch/slurm_args.py vars "$CONFIG" "${OVERRIDES[@]}") || die "cannot read $CONFIG (see above)"
eval "$stage_vars"
if [[ -n $DISTIL_SLURM_ENV_SETUP && $DISTIL_SLURM_ENV_SETUP != "$applied_env_setup" ]]; then
  eval "$DISTIL_SLURM_ENV_SETUP" || die "slurm.env_setup failed: $DISTIL_SLURM_ENV_SETUP"
fi
export DISTIL_SLURM_ENV_SETUP
# What SLURM allocated wins over the config (sbatch may have been given other options than the YAML's).
DISTIL_GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$DISTIL_GPUS_PER_NODE}
DISTIL_CPUS_PER_NODE=${SLURM_CPUS_PER_TASK:-$DISTIL_CPUS_PER_NODE}
DISTIL_RANKS_PER_NODE=${DISTIL_RANKS_PER_NODE:-$DISTIL_GPUS_PER_NODE}

# The address SLURM reaches a node at (its NodeAddr on the cluster network), as an IPv4 address.
node_address() {
  local addr ip
  addr=$(scontrol show node "$1" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
  addr=${addr:-$1}
  ip=$(getent ahostsv4 "$addr" | awk 'NR == 1 {print $1}' || true)
  echo "${ip:-$addr}"
}

# Port $1 (0-15) of this job's block of 16: derived from the job id, below Linux's ephemeral range
# (32768+), so two jobs sharing a node never collide unless their ids differ by a multiple of 750.
job_port() {
  echo $((20000 + (SLURM_JOB_ID % 750) * 16 + $1))
}

# Fail early, with the port named, when one of this job's ports is taken on this node.
check_ports_free() {
  local addr=$1
  shift
  python - "$addr" "$@" <<'PY' || fail "port(s) above are in use on $(hostname -s); resubmit (the job id picks the ports)"
import socket, sys
busy = []
for port in map(int, sys.argv[2:]):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "in use"
        try:
            s.bind((sys.argv[1], port))
        except OSError:
            busy.append(port)
if busy:
    print(f"error: port(s) {busy} on {sys.argv[1]} are in use", file=sys.stderr)
    sys.exit(1)
PY
}

# Wait for background process $1, also across trapped signals (a trap interrupts `wait`); returns its status.
wait_for() {
  while kill -0 "$1" 2>/dev/null; do
    wait "$1" || true
  done
  wait "$1"
}

# Stage 2 and alignment: one `deepspeed --no_ssh --node_rank=N` launcher per node of the allocation (srun; no
# ssh, no pdsh), each starting DISTIL_RANKS_PER_NODE ranks of $1 (launch/train.py or launch/align.py) with the
# config; MASTER_ADDR is the first node. $2 = the run's output folder (shared filesystem: the hostfile, the stop
# file and the checkpoints it resumes from), $3 = what it does, for the messages. slurm.save_before_timeout_s
# before the time limit SLURM sends USR1 (--signal=B:USR1@N): the run saves a checkpoint at the next step end
# and stops (distil/preemption.py), and the job requeues itself. Exit 2 when the run refused its input, 1 for
# what a resubmission may cure (it resumes).
run_deepspeed_job() {
  local script=$1 output_dir=$2 what=$3 status
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  MASTER_ADDR=$(node_address "${NODES[0]}")
  MASTER_PORT=$(job_port 0)
  export MASTER_ADDR MASTER_PORT
  check_ports_free "$MASTER_ADDR" "$MASTER_PORT"
  ((DISTIL_RANKS_PER_NODE > 0)) || die "no GPUs allocated (SLURM_GPUS_ON_NODE) and slurm.ranks_per_node is not set;" \
    "submit with --gpus-per-node=N or, on a CPU-only cluster, set slurm.ranks_per_node"
  # Threads per rank: the node's CPUs shared by its ranks (on CPU-only nodes, 1 per rank).
  threads=$((DISTIL_CPUS_PER_NODE / DISTIL_RANKS_PER_NODE))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}

  # Every node reads the hostfile (the output folder is on the shared filesystem, like the checkpoints).
  mkdir -p "$output_dir"
  HOSTFILE=$(realpath "$output_dir")/.hostfile-$SLURM_JOB_ID
  DISTIL_STOP_FILE=$(realpath "$output_dir")/.save-and-stop-$SLURM_JOB_ID
  export DISTIL_STOP_FILE
  printf "%s slots=$DISTIL_RANKS_PER_NODE\n" "${NODES[@]}" > "$HOSTFILE"
  rm -f "$DISTIL_STOP_FILE" "$DISTIL_STOP_FILE.saved"
  trap 'rm -f "$HOSTFILE"' EXIT
  trap 'log "time limit near: asking the trainer to save a checkpoint and stop"; touch "$DISTIL_STOP_FILE"' USR1

  log "config $CONFIG ${OVERRIDES[*]}; nodes ${NODES[*]}; $DISTIL_RANKS_PER_NODE ranks per node;" \
      "master $MASTER_ADDR:$MASTER_PORT; restart ${SLURM_RESTART_COUNT:-0}"
  # shellcheck disable=SC2016  # expanded on each node
  node_launcher='exec deepspeed --hostfile="$1" --no_ssh --node_rank="$SLURM_NODEID" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$2" --config "${@:3}"'
  srun --nodes="${#NODES[@]}" --ntasks-per-node=1 --kill-on-bad-exit=1 --label \
    bash -c "$node_launcher" launcher "$HOSTFILE" "$script" "$CONFIG" "${OVERRIDES[@]}" &
  status=0
  wait_for $! || status=$?

  if [[ $status -eq 0 && -f $DISTIL_STOP_FILE.saved ]]; then
    log "saved $(cat "$DISTIL_STOP_FILE.saved") before the time limit; requeueing to resume from it"
    rm -f "$DISTIL_STOP_FILE" "$DISTIL_STOP_FILE.saved"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 300 &  # SLURM ends this script as it requeues the job; exiting first would race the requeue
    wait $! || true
    fail "the job was not requeued within 300 s; resubmit it (it resumes from the checkpoint)"
  fi
  rm -f "$DISTIL_STOP_FILE"
  [[ $status -ne 2 ]] || die "$what refused its input ($script exit 2); fix what the error above names," \
    "then resubmit"
  [[ $status -eq 0 ]] || fail "$what failed (exit $status); the log above names the rank and the error (lines start" \
    "with the node's number; 'srun: error: NODE: task N' names a node whose launcher failed). Resubmitting resumes" \
    "from the newest complete checkpoint in $output_dir"
  log "done: $output_dir/hf"
}

# Stage 1 and the on-policy rounds: a Ray cluster on nodes $@ (head on the first, a worker on each other one, each
# an `srun --overlap` step so they share the job's CPUs); returns when `ray status` shows every node and GPU.
# Ray listens on the nodes' cluster addresses (NodeAddr), never 0.0.0.0, on this job's ports (job_port 0-8),
# and only clients holding this job's token get in (RAY_AUTH_MODE=token: others on the cluster network cannot
# submit code to it, and a token another Ray left in ~/.ray/auth_token does not decide the mode). Sets GCS
# (HEAD:port, what a driver's RAY_ADDRESS is) and DASHBOARD (the job API); Ray stops on every exit path of the
# script, cancellation included (trap).
start_ray_cluster() {
  RAY_NODES=("$@")
  export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
  RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
  export RAY_AUTH_TOKEN
  HEAD_ADDR=$(node_address "${RAY_NODES[0]}")
  GCS=$HEAD_ADDR:$(job_port 0)
  DASHBOARD=http://$HEAD_ADDR:$(job_port 1)
  export RAY_TMP=/tmp/ray-distil-$SLURM_JOB_ID  # node-local and short: Ray's socket paths must stay under 108 bytes
  NODE_OPTIONS=(--node-manager-port="$(job_port 3)" --object-manager-port="$(job_port 4)"
                --metrics-export-port="$(job_port 5)" --dashboard-agent-listen-port="$(job_port 6)"
                --dashboard-agent-grpc-port="$(job_port 7)" --runtime-env-agent-port="$(job_port 8)"
                --num-cpus="$DISTIL_CPUS_PER_NODE" --num-gpus="$DISTIL_GPUS_PER_NODE" --temp-dir="$RAY_TMP"
                --disable-usage-stats --block)
  # shellcheck disable=SC2046  # one port per word
  check_ports_free "$HEAD_ADDR" $(for i in $(seq 0 8); do job_port "$i"; done)
  # The srun steps running `ray start --block`. SIGTERM makes each stop its node's Ray (raylet, workers,
  # the driver's actors, vLLM engines) and exit; on cancellation SLURM signals them too.
  RAY_STEPS=()
  trap stop_ray EXIT
  trap 'log "cancelled"; exit 143' TERM INT
  log "Ray head $GCS, dashboard $DASHBOARD, on ${RAY_NODES[*]}"
  srun --overlap --nodes=1 --ntasks=1 -w "${RAY_NODES[0]}" ray start --head --node-ip-address="$HEAD_ADDR" \
    --port="$(job_port 0)" --ray-client-server-port="$(job_port 2)" --include-dashboard=true \
    --dashboard-host="$HEAD_ADDR" --dashboard-port="$(job_port 1)" "${NODE_OPTIONS[@]}" &
  RAY_STEPS+=($!)
  wait_for_ray 1 "$DISTIL_GPUS_PER_NODE"
  local node
  for node in "${RAY_NODES[@]:1}"; do
    # a worker removes its node-local Ray folder when its Ray stops (the trap lets `ray start` finish first)
    srun --overlap --nodes=1 --ntasks=1 -w "$node" bash -c 'trap true TERM; ray start "$@"; rm -rf "$RAY_TMP"' \
      ray-worker --address="$GCS" --node-ip-address="$(node_address "$node")" "${NODE_OPTIONS[@]}" &
    RAY_STEPS+=($!)
  done
  wait_for_ray "${#RAY_NODES[@]}" $((${#RAY_NODES[@]} * DISTIL_GPUS_PER_NODE))
  log "Ray is up: ${#RAY_NODES[@]} node(s), $((${#RAY_NODES[@]} * DISTIL_GPUS_PER_NODE)) GPU(s)"
}

stop_ray() {
  trap - EXIT TERM INT
  log "stopping Ray on ${RAY_NODES[*]}"
  local pid
  for pid in "${RAY_STEPS[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  rm -rf "$RAY_TMP"  # now: on cancellation SLURM may SIGKILL this script while Ray drains
  for pid in "${RAY_STEPS[@]}"; do wait "$pid" 2> /dev/null || true; done
}

# Poll until Ray reports $1 nodes and $2 GPUs (and the job API answers), or fail after slurm.ray_start_timeout_s.
wait_for_ray() {
  local deadline=$((SECONDS + DISTIL_RAY_START_TIMEOUT_S)) status="" nodes=0 gpus=0 pid
  while true; do
    for pid in "${RAY_STEPS[@]}"; do
      kill -0 "$pid" 2> /dev/null || fail "a 'ray start' step exited early; its output is above; resubmit"
    done
    status=$(ray status --address="$GCS" 2> /dev/null || true)
    nodes=$(awk '/^Node status/ {on = 1} /^Pending:/ {on = 0} on && $2 ~ /^node_/ {n += $1} END {print n + 0}' <<< "$status")
    gpus=$(awk '$2 == "GPU" {split($1, a, "/"); n = a[2]} END {print int(n)}' <<< "$status")
    if ((nodes >= $1 && gpus >= $2)) && ray job list --address="$DASHBOARD" > /dev/null 2>&1; then
      return 0
    fi
    ((SECONDS < deadline)) || fail "after ${DISTIL_RAY_START_TIMEOUT_S}s (slurm.ray_start_timeout_s) Ray has" \
      "$nodes of $1 node(s) and $gpus of $2 GPU(s); check the worker steps' output above, then resubmit" \
      "(or raise slurm.ray_start_timeout_s). ray status:"$'\n'"$status"
    sleep 2
  done
}
