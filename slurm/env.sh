# Sourced by every fedhubert batch script: the job's environment and its helpers. Set by slurm/submit.sh:
# FEDHUBERT_DIR (the checkout). Optional: FEDHUBERT_VENV (default $FEDHUBERT_DIR/.venv), FEDHUBERT_MODULES
# (modules to load first, e.g. "python/3.11 sox").
set -euo pipefail
: "${FEDHUBERT_DIR:?submit with slurm/submit.sh, which sets FEDHUBERT_DIR to the fedhubert checkout}"
if [ -n "${FEDHUBERT_MODULES:-}" ]; then
  # shellcheck disable=SC2086
  module load $FEDHUBERT_MODULES
fi
venv=${FEDHUBERT_VENV:-$FEDHUBERT_DIR/.venv}
[ -f "$venv/bin/activate" ] || { echo "error: no virtual environment at $venv: set FEDHUBERT_VENV to fedhubert's venv" >&2; exit 2; }
# shellcheck disable=SC1091
source "$venv/bin/activate"
echo "fedhubert job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) on $(hostname), $(date -u '+%Y-%m-%d %H:%M:%S UTC')"

# run_stage COMMAND...: run a fedhubert command so that the signals Slurm sends the batch shell reach it as SIGTERM:
# federated stages then finish their round, save a checkpoint and exit with 75 (k-means stops at once; its Lloyd
# rounds are checkpointed). SIGUSR1 is the time-limit warning the resumable scripts ask for
# (#SBATCH --signal=B:USR1@...): it also sets time_limit_near, so that requeue_at_time_limit requeues the job.
# SIGTERM (scancel, or --signal=B:TERM@...) stops the stage the same way without requeueing it.
time_limit_near=0 stage_pid="" stop_requested=0
trap 'time_limit_near=1' USR1   # a warning outside run_stage must not end the job (USR1's default)
if ! [[ ${FEDHUBERT_MAX_REQUEUES:-5} =~ ^[0-9]+$ ]]; then
  echo "error: FEDHUBERT_MAX_REQUEUES must be a whole number >= 0, not '$FEDHUBERT_MAX_REQUEUES'" >&2
  exit 2
fi
stop_stage() {  # stop_stage WHY: SIGTERM to the running stage (once it has started)
  echo "batch job: $1, passing it to fedhubert as SIGTERM${stage_pid:+ (pid $stage_pid)}"
  stop_requested=1
  [ -z "$stage_pid" ] || kill -TERM "$stage_pid" 2>/dev/null || true
}
run_stage() {
  local code=0
  stage_pid="" stop_requested=0
  trap 'stop_stage SIGTERM' TERM INT   # set before the stage starts: a signal is never missed
  trap 'time_limit_near=1; stop_stage "SIGUSR1, the time limit is near"' USR1
  "$@" &
  stage_pid=$!
  [ "$stop_requested" = 0 ] || kill -TERM "$stage_pid" 2>/dev/null || true   # a signal before its pid was known
  while :; do
    code=0
    wait "$stage_pid" || code=$?
    kill -0 "$stage_pid" 2>/dev/null || break   # wait returned early for a trapped signal: keep waiting
  done
  trap - TERM INT
  trap 'time_limit_near=1' USR1
  stage_pid=""
  return "$code"
}

# requeue_at_time_limit OUT CODE: the end of a resumable batch script, after `run_stage ... || code=$?`. When the
# time-limit warning (SIGUSR1) stopped the stage and OUT can be continued (see resumable), requeue this job: it
# keeps its id, arguments and output file, and its next start continues the run with --resume. At most
# FEDHUBERT_MAX_REQUEUES times (default 5; Slurm counts them in SLURM_RESTART_COUNT); after that, or otherwise,
# the job exits with CODE.
requeue_at_time_limit() {
  local out=$1 code=$2 max=${FEDHUBERT_MAX_REQUEUES:-5} count=${SLURM_RESTART_COUNT:-0}
  if [ "$time_limit_near" = 1 ] && resumable "$out"; then
    if [ "$count" -lt "$max" ]; then
      echo "batch job: requeueing job $SLURM_JOB_ID (requeue $((count + 1)) of at most $max," \
           "FEDHUBERT_MAX_REQUEUES): its next start continues the run in $out"
      scontrol requeue "$SLURM_JOB_ID" || {
        echo "error: scontrol requeue failed; submit the same command again to continue the run" >&2
        exit "$code"
      }
      exit 0
    fi
    echo "batch job: not requeued, the job was requeued $count times already (FEDHUBERT_MAX_REQUEUES=$max);" \
         "submit the same command again to continue the run in $out"
  fi
  exit "$code"
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
