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

# run_status OUT: the status of the last run in OUT as its run.json records it (running, stopped, failed,
# completed), or nothing when there is none. A top-level key of run.json is indented by exactly two spaces.
run_status() {
  [ -f "$1/run.json" ] || return 0
  sed -n 's/^  "status": "\([a-z]*\)",\{0,1\}$/\1/p' "$1/run.json"
}

# has_round_checkpoint OUT: true when OUT holds a round checkpoint (checkpoints/round_<n>.pt) to continue from.
has_round_checkpoint() {
  compgen -G "$1/checkpoints/round_*.pt" >/dev/null
}

# resumable OUT: true when a new submission should continue the run in OUT with --resume (and its own config)
# rather than start afresh with the submission's arguments: the run did not complete and left a round checkpoint.
# That is a run stopped before its time limit (exit 75, status "stopped"), and one killed outright ("running")
# or failed after checkpointing ("failed": too few clients, a full disk; a killed k-means job). A run that failed
# before its first checkpoint (a pre-flight error such as a wrong path or config key) is not: the new submission
# starts afresh with its arguments, and fedhubert replaces that failed run's partial outputs.
resumable() {
  case "$(run_status "$1")" in
    stopped | running | failed) has_round_checkpoint "$1" ;;
    *) return 1 ;;
  esac
}
