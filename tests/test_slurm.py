"""The batch scripts in slurm/ on a real one-node Slurm cluster (tests/slurm_cluster.py): a tiny pipeline
submitted with slurm/submit.sh (partition, the k-means features array and k-means job, pretraining, distillation,
evaluation), the multi-node job with TLS, authenticated SuperNodes and virtual clients, one long job through a
time-limit warning (it requeues itself and continues the run) and a SIGTERM stop that a second submission finishes,
and a pre-flight failure that a second submission replaces instead. Skipped, with the reason, where Slurm cannot run."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from common import DISTILL_FAST, EVAL_SHORT, KMEANS_FAST, PRETRAIN_FAST
from slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.sh"
_WHY_NOT = SlurmCluster.unavailable()
# Rounds of the runs that are stopped after their first round: enough that the stop lands mid-run.
LONG = 16
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm-cluster"))
    slurm.start()
    yield slurm
    slurm.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-jobs")


def environment(work: Path, **extra: str) -> dict:
    return {
        "FEDHUBERT_LOGS": str(work / "logs"),
        "FEDHUBERT_GPUS": "0",
        "FEDHUBERT_CPUS": "2",
        "FEDHUBERT_MEM": "4G",
        "FEDHUBERT_TIME": "00:20:00",
        "FEDHUBERT_SBATCH_ARGS": "--wait",
        "FEDHUBERT_PROGRESS": "0",
        **extra,
    }


def job_output(work: Path) -> str:
    return "\n".join(
        f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted((work / "logs").glob("*.out"))
    )


def submit(cluster: SlurmCluster, work: Path, *args, **extra: str) -> str:
    """slurm/submit.sh with --wait: the job id once the job has ended successfully."""
    result = cluster.run("bash", SUBMIT, *args, env=environment(work, **extra))
    assert result.returncode == 0, f"{result.stderr}\n{job_output(work)}"
    return result.stdout.strip().splitlines()[-1]


def submit_failing(cluster: SlurmCluster, work: Path, *args) -> None:
    """slurm/submit.sh with --wait for a job that must fail."""
    result = cluster.run("bash", SUBMIT, *args, env=environment(work))
    assert result.returncode != 0, f"the job should have failed\n{job_output(work)}"


def status(folder: Path) -> str:
    return json.loads((folder / "run.json").read_text())["status"]


@pytest.fixture(scope="module")
def partition(cluster, work, small_librispeech) -> Path:
    out = work / "partition"
    submit(cluster, work, "partition", small_librispeech, out, "--clients", "2", "use_cache=false")
    return out


@pytest.fixture(scope="module")
def kmeans(cluster, work, partition) -> Path:
    out = work / "kmeans"
    submit(cluster, work, "kmeans", partition, out, *KMEANS_FAST)
    return out


def test_partition_and_kmeans_jobs_with_a_features_array(partition, kmeans, work):
    assert (
        status(partition) == "completed" and json.loads((partition / "partition.json").read_text())["num_clients"] == 2
    )
    features = Path(str(kmeans) + ".features")
    for client in (0, 1):  # one array task per client wrote its own feature cache ...
        assert status(features / f"client_{client}") == "completed"
        assert (features / f"client_{client}" / "train.feats.npy").is_file()
    summary = json.loads((kmeans / "run.json").read_text())["summary"]
    assert summary["features"]["computed"] == 0 and summary["features"]["reused"] == 4, "... which k-means reused"
    assert status(kmeans) == "completed" and (kmeans / "client_1" / "train.km").is_file()
    assert "fedhubert job" in job_output(work)


def test_pretrain_distill_and_evaluate_jobs(cluster, work, partition, kmeans, tiny_speech_commands):
    pretrain = work / "pretrain"
    submit(cluster, work, "pretrain", partition, kmeans, pretrain, *PRETRAIN_FAST, "--rounds", "2")
    assert status(pretrain) == "completed" and (pretrain / "checkpoints" / "final.pt").is_file()
    distill = work / "distill"
    submit(
        cluster,
        work,
        "distill",
        pretrain / "checkpoints" / "final.pt",
        partition,
        distill,
        *DISTILL_FAST,
        "--rounds",
        "1",
    )
    assert status(distill) == "completed"
    evaluation = work / "eval" / "student"
    submit(
        cluster, work, "evaluate", tiny_speech_commands, distill / "checkpoints" / "final.pt", evaluation, *EVAL_SHORT
    )
    result = json.loads((evaluation / "result.json").read_text())
    assert result["upstream"] == "distiller_local" and 0 <= result["test_acc"] <= 1


def test_multinode_job_runs_superlink_and_authenticated_supernodes(cluster, work, small_partition, small_kmeans):
    """TLS and authenticated SuperNodes, one per srun task, and virtual clients (FEDHUBERT_VIRTUAL_CLIENTS=1):
    the job's 2 SuperNodes serve the partition's 3 clients, each message naming its client; both nodes train."""
    certs = work / "certs"
    subprocess.run(
        ["bash", REPO / "scripts" / "make_certificates.sh", certs, "--nodes", "2", socket.gethostname()],
        check=True,
        capture_output=True,
    )
    out = work / "multinode"
    flower = work / "flower"
    job = submit(
        cluster,
        work,
        "multinode",
        "pretrain",
        small_partition,
        out,
        "--kmeans",
        small_kmeans,
        *PRETRAIN_FAST,
        "--rounds",
        "2",
        FEDHUBERT_NODES="1",
        FEDHUBERT_TASKS="2",
        FEDHUBERT_CPUS="1",
        FEDHUBERT_TLS_DIR=str(certs),
        FEDHUBERT_FLOWER_DIR=str(flower),
        FEDHUBERT_VIRTUAL_CLIENTS="1",
    )
    assert status(out) == "completed" and (out / "checkpoints" / "final.pt").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rows if r["kind"] == "train"] == [3, 3]
    assert {r["client"] for r in rows if r["kind"] == "client"} == {0, 1, 2}
    output = (work / "logs" / f"fedhubert-multinode-{job}.out").read_text()
    assert "virtual clients: 2 SuperNodes serve the partition's 3 clients" in output
    logs = flower / f"flower-{job}"
    for task in (0, 1):  # each SuperNode ran as its own srun task and served its rounds
        assert "Receiving: train message" in (logs / f"supernode-{task}.log").read_text()
    assert "SuperNodes and SuperLink stopped" in output
    leftover = cluster.run("pgrep", "-f", str(logs)).stdout.split()
    assert leftover == [], "no SuperLink, SuperNode or ClientApp process outlives the job"


def wait_for_a_round(cluster: SlurmCluster, work: Path, job: str, out: Path, timeout_s: float = 300) -> None:
    """Until the run in `out` has recorded its first aggregated round (the job still queued or running)."""
    deadline = time.monotonic() + timeout_s
    metrics = out / "metrics.jsonl"
    while not any(
        json.loads(line).get("kind") == "train"
        for line in (metrics.read_text().splitlines() if metrics.is_file() else [])
    ):
        assert time.monotonic() < deadline and cluster.queue(job), job_output(work)
        time.sleep(0.5)


def wait_until_gone(cluster: SlurmCluster, work: Path, job: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while cluster.queue(job):
        assert time.monotonic() < deadline, job_output(work)
        time.sleep(1.0)


def train_rounds(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["round"] for r in rows if r["kind"] == "train"]


def submit_long(cluster: SlurmCluster, work: Path, partition: Path, kmeans: Path, out: Path) -> str:
    """A pretraining job of LONG rounds, without --wait: its id once it is submitted."""
    args = ("pretrain", partition, kmeans, out, *PRETRAIN_FAST, "--rounds", str(LONG))
    return submit(cluster, work, *args, FEDHUBERT_SBATCH_ARGS="")


def last_round(out: Path) -> int:
    """The last round the run has recorded so far (0: none), skipping a line still being written."""
    last = 0
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train":
            last = max(last, row["round"])
    return last


def wait_for_a_round_after(cluster: SlurmCluster, work: Path, job: str, out: Path, text: str, timeout_s: float) -> None:
    """Until the job's output says `text` and the run has then recorded a round it had not before."""
    log = work / "logs" / f"fedhubert-pretrain-{job}.out"
    deadline = time.monotonic() + timeout_s
    while text not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline and cluster.queue(job), job_output(work)
        time.sleep(0.5)
    before = last_round(out)
    while last_round(out) <= before:
        assert time.monotonic() < deadline and cluster.queue(job), job_output(work)
        time.sleep(0.5)


def test_a_time_limit_warning_requeues_the_job_a_sigterm_stops_it_and_a_second_submission_finishes(
    cluster, work, partition, kmeans
):
    """One long job through both of Slurm's stops: the time-limit warning (the job requeues itself and continues the
    run), then SIGTERM (a checkpointed stop without requeue); a second submission finishes the run, every round
    trained exactly once."""
    out = work / "long"
    job = submit_long(cluster, work, partition, kmeans, out)
    wait_for_a_round(cluster, work, job, out)
    # What Slurm sends at the script's --signal=B:USR1@600 before the time limit: SIGUSR1 to the batch shell only.
    assert cluster.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    # a requeued job waits cred_expire (30 s here) before it starts again; then it continues the run
    wait_for_a_round_after(cluster, work, job, out, "continuing the run in", 600)
    # SIGTERM to the batch shell only (scancel --batch; a script's --signal=B:TERM@...): a stop without requeue.
    assert cluster.run("scancel", "--batch", "--signal=TERM", job).returncode == 0
    wait_until_gone(cluster, work, job, 300)
    output = (work / "logs" / f"fedhubert-pretrain-{job}.out").read_text()  # both starts: --open-mode=append
    assert "batch job: SIGUSR1, the time limit is near, passing it to fedhubert" in output
    assert f"requeueing job {job} (requeue 1 of at most 5, FEDHUBERT_MAX_REQUEUES)" in output
    assert output.count(f"fedhubert job {job} ") == 2, output
    assert "batch job: SIGTERM, passing it to fedhubert" in output and output.count("requeueing") == 1, output
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "stopped" and record["resumed"], output
    stopped = record["summary"]["stopped_after_round"]
    assert 1 <= stopped < LONG and (out / "checkpoints" / f"round_{stopped:05d}.pt").is_file()
    assert not (out / "checkpoints" / "final.pt").exists()
    again = submit(cluster, work, "pretrain", partition, kmeans, out, *PRETRAIN_FAST, "--rounds", str(LONG))
    assert status(out) == "completed" and (out / "checkpoints" / "final.pt").is_file()
    assert "continuing the run in" in (work / "logs" / f"fedhubert-pretrain-{again}.out").read_text()
    assert train_rounds(out) == list(range(1, LONG + 1))


def test_a_submission_after_a_pre_flight_failure_starts_afresh_with_its_arguments(cluster, work, partition, kmeans):
    out = work / "preflight"
    # the partition where the k-means folder belongs: the stage fails before any round
    submit_failing(cluster, work, "pretrain", partition, partition, out, *PRETRAIN_FAST, "--rounds", "1")
    assert status(out) == "failed" and not (out / "checkpoints").exists()
    job = submit(cluster, work, "pretrain", partition, kmeans, out, *PRETRAIN_FAST, "--rounds", "1")
    output = (work / "logs" / f"fedhubert-pretrain-{job}.out").read_text()
    assert "continuing the run in" not in output, output
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed" and not record["resumed"]
    assert Path(record["config"]["kmeans"]) == kmeans, "the new arguments, not the failed run's config"
    assert (out / "checkpoints" / "final.pt").is_file()
