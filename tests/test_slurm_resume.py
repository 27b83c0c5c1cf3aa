"""What a new submission of a batch script in slurm/ runs, given what the earlier run left in its output folder: the
scripts' own decision (slurm/env.sh `resumable`), run with bash and a stand-in `fedhubert` that records its
arguments, so no Slurm is needed. A run stopped at its time limit (exit 75) continues with --resume; a run that
failed before its first checkpoint (a pre-flight error) starts afresh with the new arguments. A stop on the
time-limit warning (SIGUSR1) requeues the job, at most FEDHUBERT_MAX_REQUEUES times; a SIGTERM stop does not."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fedhubert.pretrain.config import PretrainConfig
from fedhubert.runlog import StageRun

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_env(tmp_path) -> dict:
    """A venv whose `fedhubert` appends its arguments to calls.txt and succeeds."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    fake = venv / "bin" / "fedhubert"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{tmp_path / "calls.txt"}"\n')
    fake.chmod(0o755)
    return {**os.environ, "FEDHUBERT_DIR": str(REPO), "FEDHUBERT_VENV": str(venv)}


def earlier_run(out: Path, status: str | None, checkpoint: bool) -> None:
    """What a run of fedhubert leaves: run.json with `status` (None: no run yet), a round checkpoint or not."""
    if status is not None:
        out.mkdir(parents=True)
        run = StageRun("pretrain", out, PretrainConfig(), command=["fedhubert", "pretrain"])
        run.record["status"] = status
        run.summary["last_client"] = {"status": "completed"}  # a nested key of the same name is not the run's
        run.write()
    if checkpoint:
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "round_00003.pt").write_bytes(b"")


def submitted(script: str, args: list[str], env: dict, tmp_path: Path) -> str:
    """The fedhubert command line the batch script ran."""
    result = subprocess.run(
        ["bash", REPO / "slurm" / script, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return (tmp_path / "calls.txt").read_text().strip()


@pytest.mark.parametrize(
    "status, checkpoint, resumes",
    [
        (None, False, False),  # a first submission
        ("failed", False, False),  # a pre-flight failure: a wrong path or config, before any round
        ("stopped", True, True),  # the graceful stop before the time limit (exit 75)
        ("running", True, True),  # killed outright after a round checkpoint
        ("failed", True, True),  # failed after checkpointing (too few clients, a full disk)
        ("running", False, False),  # killed before its first checkpoint: nothing to continue
        ("completed", True, False),  # nothing left to do: fedhubert itself refuses the non-empty folder
    ],
)
def test_pretrain_resumes_only_a_checkpointed_run(fake_env, tmp_path, status, checkpoint, resumes):
    out = tmp_path / "run"
    earlier_run(out, status, checkpoint)
    command = submitted(
        "pretrain.sbatch", ["/data/part", "/data/km", str(out), "--rounds", "4", "seed=3"], fake_env, tmp_path
    )
    fresh = f"pretrain --partition /data/part --kmeans /data/km --out {out} --rounds 4 seed=3"
    assert command == (f"pretrain --resume {out}" if resumes else fresh)


@pytest.mark.parametrize(
    "script, args, fresh",
    [
        (
            "distill.sbatch",
            ["/t.pt", "/data/part", "{out}", "seed=3"],
            "distill --teacher /t.pt --partition /data/part --out {out} seed=3",
        ),
        (
            "kmeans.sbatch",
            ["/data/part", "{out}", "/data/feats", "seed=3"],
            "kmeans --partition /data/part --out {out} --workers 0 feature_dir=/data/feats seed=3",
        ),
    ],
)
@pytest.mark.parametrize(
    "status, checkpoint, resumes", [("failed", False, False), ("stopped", True, True), ("failed", True, True)]
)
def test_distill_and_kmeans_decide_alike(fake_env, tmp_path, script, args, fresh, status, checkpoint, resumes):
    out = tmp_path / "run"
    earlier_run(out, status, checkpoint)
    command = submitted(script, [a.format(out=out) for a in args], fake_env, tmp_path)
    stage = script.split(".")[0]
    assert command == (f"{stage} --resume {out}" if resumes else fresh.format(out=out))


# ------------------------------------------------------------------ requeueing at the time limit (slurm/env.sh)
STOPPING_FEDHUBERT = """#!/usr/bin/env bash
echo "$*" >> "CALLS"
stop() {
  kill "$sleeper"
  mkdir -p "OUT/checkpoints"
  : > "OUT/checkpoints/round_00002.pt"
  printf '{\\n  "status": "stopped"\\n}\\n' > "OUT/run.json"
  exit 75
}
sleep 30 &
sleeper=$!
trap stop TERM
kill -"$FAKE_SIGNAL" "$PPID"
wait "$sleeper"
"""


@pytest.fixture
def stopping_env(fake_env, tmp_path) -> dict:
    """`fedhubert` sends the batch shell FAKE_SIGNAL (as Slurm would), then stops like fedhubert on SIGTERM: a
    round checkpoint, run.json status "stopped", exit 75; `scontrol` records its arguments in scontrol.txt."""
    bin_dir = Path(fake_env["FEDHUBERT_VENV"]) / "bin"
    out = tmp_path / "run"
    fake = STOPPING_FEDHUBERT.replace("CALLS", str(tmp_path / "calls.txt")).replace("OUT", str(out))
    (bin_dir / "fedhubert").write_text(fake)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{tmp_path / "scontrol.txt"}"\n')
    scontrol.chmod(0o755)
    return {**fake_env, "SLURM_JOB_ID": "42", "FAKE_SIGNAL": "USR1"}


def batch_job(env: dict, tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    """pretrain.sbatch for a first submission into tmp_path/run."""
    args = ["/data/part", "/data/km", str(tmp_path / "run"), "--rounds", "4"]
    return subprocess.run(
        ["bash", REPO / "slurm" / "pretrain.sbatch", *args],
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=60,
    )


def requeues(tmp_path: Path) -> str:
    path = tmp_path / "scontrol.txt"
    return path.read_text().strip() if path.is_file() else ""


def test_the_time_limit_warning_stops_the_stage_and_requeues_the_job(stopping_env, tmp_path):
    result = batch_job(stopping_env, tmp_path, SLURM_RESTART_COUNT="2")
    assert result.returncode == 0, result.stderr
    assert "SIGUSR1, the time limit is near, passing it to fedhubert as SIGTERM" in result.stdout
    assert "requeueing job 42 (requeue 3 of at most 5, FEDHUBERT_MAX_REQUEUES)" in result.stdout
    assert requeues(tmp_path) == "requeue 42"


def test_requeues_stop_at_the_maximum_and_the_job_exits_stopped(stopping_env, tmp_path):
    result = batch_job(stopping_env, tmp_path, SLURM_RESTART_COUNT="2", FEDHUBERT_MAX_REQUEUES="2")
    assert result.returncode == 75 and requeues(tmp_path) == ""
    assert "not requeued, the job was requeued 2 times already (FEDHUBERT_MAX_REQUEUES=2)" in result.stdout


def test_sigterm_stops_the_stage_without_requeueing(stopping_env, tmp_path):
    result = batch_job(stopping_env, tmp_path, FAKE_SIGNAL="TERM")  # scancel, or --signal=B:TERM@...
    assert result.returncode == 75 and requeues(tmp_path) == ""
    assert "batch job: SIGTERM, passing it to fedhubert as SIGTERM" in result.stdout


def test_a_bad_maximum_is_refused(stopping_env, tmp_path):
    result = batch_job(stopping_env, tmp_path, FEDHUBERT_MAX_REQUEUES="five")
    assert result.returncode == 2 and not (tmp_path / "calls.txt").exists(), "refused before the stage runs"
    assert "FEDHUBERT_MAX_REQUEUES must be a whole number >= 0, not 'five'" in result.stderr


def test_the_venv_is_taken_from_fedhubert_venv(fake_env, tmp_path):
    result = subprocess.run(
        ["bash", REPO / "slurm" / "pretrain.sbatch", "/p", "/k", str(tmp_path / "run")],
        env={**fake_env, "FEDHUBERT_VENV": str(tmp_path / "missing")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"no virtual environment at {tmp_path / 'missing'}: set FEDHUBERT_VENV" in result.stderr
