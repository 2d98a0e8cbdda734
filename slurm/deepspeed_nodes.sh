#!/bin/bash
# The --launcher of launch/onpolicy.py in slurm/onpolicy.sbatch: one round's training on the student's nodes,
# `deepspeed --no_ssh` on each (one srun task per node, no ssh, no pdsh), DISTIL_RANKS_PER_NODE ranks each.
#
#   bash slurm/deepspeed_nodes.sh launch/train.py --config CONFIG [section.key=value ...]
#
# Reads DISTIL_DEEPSPEED_NODES (the nodes, space-separated), DISTIL_RANKS_PER_NODE, MASTER_ADDR, MASTER_PORT and
# DISTIL_STOP_FILE from slurm/onpolicy.sbatch. Exits with the training's status (2 = bad input).
set -euo pipefail
: "${DISTIL_DEEPSPEED_NODES:?set by slurm/onpolicy.sbatch}" "${DISTIL_RANKS_PER_NODE:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}"
read -ra nodes <<< "$DISTIL_DEEPSPEED_NODES"
hostfile=$(dirname "$DISTIL_STOP_FILE")/.hostfile-$SLURM_JOB_ID
printf "%s slots=$DISTIL_RANKS_PER_NODE\n" "${nodes[@]}" > "$hostfile"
trap 'rm -f "$hostfile"' EXIT
# A node's rank is its place in the list (SLURMD_NODENAME: the node's SLURM name; the step has these nodes only).
# shellcheck disable=SC2016  # expanded on each node
node_launcher='read -ra nodes <<< "$DISTIL_DEEPSPEED_NODES"
for rank in "${!nodes[@]}"; do [[ ${nodes[$rank]} == "$SLURMD_NODENAME" ]] && break; done
exec deepspeed --hostfile="$1" --no_ssh --node_rank="$rank" --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" "${@:2}"'
status=0
srun --nodes="${#nodes[@]}" --ntasks="${#nodes[@]}" --nodelist="$(IFS=,; echo "${nodes[*]}")" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  --label bash -c "$node_launcher" launcher "$hostfile" "$@" || status=$?
exit "$status"
