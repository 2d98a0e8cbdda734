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
