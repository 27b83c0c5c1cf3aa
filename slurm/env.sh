# Sourced by every fedhubert batch script: the job's environment and two helpers. Set by slurm/submit.sh:
# FEDHUBERT_DIR (the checkout). Optional: FEDHUBERT_VENV (default $FEDHUBERT_DIR/.venv), FEDHUBERT_MODULES
# (modules to load first, e.g. "python/3.11 sox").
set -euo pipefail
: "${FEDHUBERT_DIR:?submit with slurm/submit.sh, which sets FEDHUBERT_DIR to the fedhubert checkout}"
if [ -n "${FEDHUBERT_MODULES:-}" ]; then
  # shellcheck disable=SC2086
  module load $FEDHUBERT_MODULES
fi
# shellcheck disable=SC1091
source "${FEDHUBERT_VENV:-$FEDHUBERT_DIR/.venv}/bin/activate"
echo "fedhubert job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) on $(hostname), $(date -u '+%Y-%m-%d %H:%M:%S UTC')"

# run_stage COMMAND...: run a fedhubert command so that the SIGTERM Slurm sends the batch shell before the time
# limit (#SBATCH --signal=B:TERM@...) reaches it: federated stages then finish their round, save a checkpoint
# and exit with 75; submitting the same job again continues the run (see resumable).
run_stage() {
  "$@" &
  local pid=$! code=0
  # shellcheck disable=SC2064
  trap "echo 'batch job: SIGTERM, passing it to fedhubert (pid $pid)'; kill -TERM $pid 2>/dev/null || true" TERM INT
  while :; do
    code=0
    wait "$pid" || code=$?
    kill -0 "$pid" 2>/dev/null || break   # wait returned early for a trapped signal: keep waiting
  done
  trap - TERM INT
  return "$code"
}

# resumable OUT: true when OUT holds a run that did not complete (stopped at a time limit, failed, or killed);
# the stage then continues it with --resume instead of starting again.
resumable() {
  [ -f "$1/run.json" ] && grep -Eq '"status": "(stopped|failed|running)"' "$1/run.json"
}
