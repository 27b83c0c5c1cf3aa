#!/usr/bin/env bash
# An interactive allocation with fedhubert's environment: a shell on the compute node (no COMMAND), or COMMAND
# run there, e.g.  slurm/salloc.sh fedhubert pretrain --partition ... --out ...
# Resources: FEDHUBERT_TIME (02:00:00), FEDHUBERT_CPUS (8), FEDHUBERT_MEM (32G), FEDHUBERT_GPUS (1; 0 = none),
# FEDHUBERT_ACCOUNT, FEDHUBERT_PARTITION, FEDHUBERT_SBATCH_ARGS (more options), FEDHUBERT_MODULES, FEDHUBERT_VENV.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
options=(--time="${FEDHUBERT_TIME:-02:00:00}" --cpus-per-task="${FEDHUBERT_CPUS:-8}" --mem="${FEDHUBERT_MEM:-32G}"
         --ntasks=1)
[ -z "${FEDHUBERT_ACCOUNT:-}" ] || options+=(--account="$FEDHUBERT_ACCOUNT")
[ -z "${FEDHUBERT_PARTITION:-}" ] || options+=(--partition="$FEDHUBERT_PARTITION")
[ "${FEDHUBERT_GPUS:-1}" = 0 ] || options+=(--gpus-per-node="${FEDHUBERT_GPUS:-1}")
read -r -a extra <<< "${FEDHUBERT_SBATCH_ARGS:-}"
options+=("${extra[@]}")
export FEDHUBERT_DIR=$repo
if [ $# -eq 0 ]; then
  echo "+ salloc ${options[*]} (then a shell on the compute node with fedhubert's environment)" >&2
  exec salloc "${options[@]}" srun --pty bash --rcfile "$here/shell.rc"
fi
echo "+ salloc ${options[*]} $*" >&2
exec salloc "${options[@]}" srun bash -c 'source "$FEDHUBERT_DIR/slurm/env.sh"; "$@"' fedhubert-salloc "$@"
