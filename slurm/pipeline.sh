#!/bin/bash
# The whole pipeline on SLURM: Stage 1 (teacher annotation) -> Stage 2 (distil-tuning) -> evaluation, and
# alignment (DPO, docs/align.md) between Stage 2 and evaluation when --stages names it; on-policy rounds
# (docs/onpolicy.md: the teacher on slurm.stage1_nodes, the student on slurm.stage2_nodes of one allocation)
# after Stage 1 when --stages names onpolicy.
# Each job starts only when the one before it succeeded (afterok); when one fails, SLURM cancels the
# rest (--kill-on-invalid-dep=yes).
#
#   slurm/pipeline.sh [--dry-run] [--stages stage1,stage2,[onpolicy,][align,]eval] CONFIG.yaml [section.key=value ...]
#
# sbatch options come from the config's slurm section, DISTIL_SLURM_<KEY> variables and the overrides
# (launch/slurm_args.py), never from editing the templates. Prints "<stage> <job id>" per job;
# --dry-run prints the sbatch commands instead (a runnable script). Run it in the project's environment.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
usage() { sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

dry_run=0
stages=stage1,stage2,eval
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --stages) [[ $# -ge 2 ]] || die "--stages needs a list, e.g. --stages stage2,eval"; stages=$2; shift 2 ;;
    --stages=*) stages=${1#--stages=}; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option $1; see slurm/pipeline.sh --help" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; die "missing CONFIG.yaml"; }
[[ -f $1 ]] || die "config $1 not found"
CONFIG=$(realpath "$1")
shift
OVERRIDES=("$@")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

IFS=, read -r -a STAGES <<< "$stages"
order=" stage1 stage2 onpolicy align eval "
last=-1
for stage in "${STAGES[@]}"; do
  [[ $order == *" $stage "* ]] || die "unknown stage '$stage' in --stages; use stage1, stage2, onpolicy, align, eval"
  position=$(( $(awk -v s="$stage" '{for (i = 1; i <= NF; i++) if ($i == s) print i}' <<< "$order") ))
  (( position > last )) || die "--stages must be in pipeline order (stage1,stage2,onpolicy,align,eval), got $stages"
  last=$position
done
(( dry_run )) || command -v sbatch > /dev/null || die "sbatch not found: run on a SLURM login node, or use --dry-run"
python -c "import distil" 2> /dev/null || die "python cannot import distil: activate the project's environment first"

stage_vars=$(python launch/slurm_args.py vars "$CONFIG" "${OVERRIDES[@]}") || die "cannot read $CONFIG (see above)"
eval "$stage_vars"
export DISTIL_SLURM_ENV_SETUP  # the jobs run slurm.env_setup first
(( dry_run )) || mkdir -p "$DISTIL_LOG_DIR"

previous=""
for stage in "${STAGES[@]}"; do
  options_text=$(python launch/slurm_args.py sbatch "$stage" "$CONFIG" "${OVERRIDES[@]}") || die "cannot read $CONFIG"
  mapfile -t options <<< "$options_text"
  dependency=()
  [[ -z $previous ]] || dependency=("--dependency=afterok:$previous" --kill-on-invalid-dep=yes)
  command=(sbatch --parsable "--chdir=$REPO" "${options[@]}" "${dependency[@]}" "slurm/$stage.sbatch" "$CONFIG"
           "${OVERRIDES[@]}")
  if (( dry_run )); then
    printf -v line '%q ' "${command[@]}"
    line=${line//\\\$JOB_/\$JOB_}  # keep $JOB_<stage> references live in the printed script
    echo "JOB_$stage=\$(${line% })"
    previous="\$JOB_$stage"
  else
    job=$("${command[@]}") || die "sbatch of $stage failed (its reason is above): fix the option it names in the" \
      "config's slurm section (docs/slurm.md), or rerun once the SLURM controller answers"
    job=${job%%;*}
    echo "$stage $job"
    previous=$job
  fi
done
if (( ! dry_run )); then
  echo "logs: $DISTIL_LOG_DIR/distil-<stage>-$(basename "${CONFIG%.*}")-<job id>.out; watch: squeue -u ${USER:-$(id -un)}"
fi
