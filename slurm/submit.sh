#!/usr/bin/env bash
# Submit a fedhubert stage to Slurm, with resources from variables (defaults per stage, below).
#
#   slurm/submit.sh partition CORPUS OUT [flags and KEY=VALUE ...]
#   slurm/submit.sh kmeans PARTITION OUT [KEY=VALUE ...]            a features array (one task per client), then
#                                                                    the k-means job once all tasks succeeded
#   slurm/submit.sh pretrain PARTITION KMEANS OUT [...]              one node, clients share its GPUs (simulation)
#   slurm/submit.sh distill TEACHER PARTITION OUT [...]              likewise
#   slurm/submit.sh multinode pretrain|distill PARTITION OUT [...]   deployment engine, one GPU task per client
#   slurm/submit.sh evaluate DATASET CHECKPOINT|fbank OUT [...]      S3PRL speech_commands
#
# Variables (unset: the default shown, or the cluster's own default where none is shown):
#   FEDHUBERT_ACCOUNT, FEDHUBERT_PARTITION    --account, --partition
#   FEDHUBERT_TIME        wall time: partition 01:00:00, features 02:00:00, kmeans 04:00:00, pretrain and
#                         distill and multinode 24:00:00, evaluate 12:00:00
#   FEDHUBERT_CPUS        cores per task: partition/features/kmeans 16, pretrain/distill 32, multinode 8, evaluate 8
#   FEDHUBERT_MEM         memory per node: 64G (pretrain, distill, multinode: 256G)
#   FEDHUBERT_GPUS        GPUs per node (pretrain, distill: 4; evaluate: 1); per task for multinode (1); 0 = none
#                         TYPE:N asks for a GPU type, e.g. h100:4 (--gpus-per-node=h100:4)
#   FEDHUBERT_NODES, FEDHUBERT_TASKS   multinode: nodes (2) and tasks = clients (8), or with
#                         FEDHUBERT_VIRTUAL_CLIENTS=1 tasks = SuperNodes serving all the clients
#   FEDHUBERT_CLIENTS     kmeans: clients in the partition (default: read from PARTITION/partition.json)
#   FEDHUBERT_FEATURES    kmeans: feature cache (default: OUT.features, beside OUT)
#   FEDHUBERT_LOGS        where Slurm writes job output (default: logs/slurm in the checkout)
#   FEDHUBERT_SBATCH_ARGS more sbatch options, e.g. "--qos=long --wait"; "--gres=gpu:h100:4" with FEDHUBERT_GPUS=0
#                         where a cluster wants --gres; "--signal=B:USR1@1800" to warn earlier of the time limit
#   FEDHUBERT_VENV        fedhubert's venv (default: .venv in the checkout), here and in the jobs
#   FEDHUBERT_MAX_REQUEUES  pretrain, distill, kmeans: how often a job stopped at its time limit requeues itself
#                         to continue the run (default 5; 0 = never)
# The batch scripts also read FEDHUBERT_MODULES (slurm/env.sh) and, for multinode, FEDHUBERT_TLS_DIR,
# FEDHUBERT_SUPERLINK_HOST and FEDHUBERT_VIRTUAL_CLIENTS (slurm/multinode.sbatch).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
stage=$1; shift
logs=${FEDHUBERT_LOGS:-$repo/logs/slurm}
mkdir -p "$logs"

gpus_flag=--gpus-per-node
case $stage in
  partition) script=partition.sbatch; time=01:00:00; cpus=16; mem=64G; gpus=0; args=2 ;;
  kmeans)    script=kmeans.sbatch;    time=04:00:00; cpus=16; mem=64G; gpus=0; args=2 ;;
  pretrain)  script=pretrain.sbatch;  time=24:00:00; cpus=32; mem=256G; gpus=4; args=3 ;;
  distill)   script=distill.sbatch;   time=24:00:00; cpus=32; mem=256G; gpus=4; args=3 ;;
  evaluate)  script=evaluate.sbatch;  time=12:00:00; cpus=8;  mem=64G; gpus=1; args=3 ;;
  multinode) script=multinode.sbatch; time=24:00:00; cpus=8;  mem=256G; gpus=1; args=3; gpus_flag=--gpus-per-task ;;
  *) echo "error: unknown stage '$stage'" >&2; usage ;;
esac
[ $# -ge "$args" ] || { echo "error: '$stage' needs $args arguments" >&2; usage; }

options=(--parsable --chdir="$repo" --export="ALL,FEDHUBERT_DIR=$repo" --output="$logs/%x-%j.out"
         --cpus-per-task="${FEDHUBERT_CPUS:-$cpus}" --mem="${FEDHUBERT_MEM:-$mem}")
[ -z "${FEDHUBERT_ACCOUNT:-}" ] || options+=(--account="$FEDHUBERT_ACCOUNT")
[ -z "${FEDHUBERT_PARTITION:-}" ] || options+=(--partition="$FEDHUBERT_PARTITION")
[ "${FEDHUBERT_GPUS:-$gpus}" = 0 ] || options+=("$gpus_flag=${FEDHUBERT_GPUS:-$gpus}")
if [ "$stage" = multinode ]; then
  options+=(--nodes="${FEDHUBERT_NODES:-2}" --ntasks="${FEDHUBERT_TASKS:-8}")
fi
read -r -a extra <<< "${FEDHUBERT_SBATCH_ARGS:-}"
options+=("${extra[@]}")

submit() {  # sbatch OPTIONS SCRIPT ARGS...: prints the command, returns the job id
  echo "+ sbatch $*" >&2
  sbatch "$@"
}

if [ "$stage" = kmeans ]; then
  partition=$1 out=$2; shift 2
  features=${FEDHUBERT_FEATURES:-${out%/}.features}
  clients=${FEDHUBERT_CLIENTS:-}
  if [ -z "$clients" ]; then
    [ -f "$partition/partition.json" ] || { echo "error: $partition/partition.json not found (set FEDHUBERT_CLIENTS while the partition job is pending)" >&2; exit 2; }
    python=${FEDHUBERT_VENV:-$repo/.venv}/bin/python
    [ -x "$python" ] || { echo "error: no $python: set FEDHUBERT_VENV to fedhubert's venv, or FEDHUBERT_CLIENTS" >&2; exit 2; }
    clients=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["num_clients"])' \
              "$partition/partition.json")
  fi
  array_options=("${options[@]}" --time="${FEDHUBERT_TIME:-02:00:00}" --array="0-$((clients - 1))")
  options+=(--time="${FEDHUBERT_TIME:-$time}")
  feature_keys=()  # the features tasks take the features.* keys; the k-means job takes everything
  for arg in "$@"; do [[ $arg != features.* ]] || feature_keys+=("$arg"); done
  array=$(submit "${array_options[@]}" "$here/features.sbatch" "$partition" "$features" "${feature_keys[@]}")
  array=${array%%;*}
  echo "features: job array $array ($clients tasks) -> $features" >&2
  job=$(submit "${options[@]}" --dependency="afterok:$array" "$here/kmeans.sbatch" "$partition" "$out" "$features" "$@")
else
  options+=(--time="${FEDHUBERT_TIME:-$time}")
  job=$(submit "${options[@]}" "$here/$script" "$@")
fi
job=${job%%;*}
echo "$stage: job $job; output in $logs/fedhubert-$stage-$job.out" >&2
echo "$job"
