"""Kills: the server side killed outright (SIGKILL, as when a node dies or the OOM killer strikes) in the middle
of a round, then resumed: every stage ends exactly as an uninterrupted run. SIGTERM (what Slurm sends at its time
limit) ends a training run after its round with a final checkpoint, and the run continues exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from common import DISTILL_FAST, KMEANS_FAST, PRETRAIN_FAST, run_cli
from fedhubert.fl.runtime import reaper
from fedhubert.model.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
FEDHUBERT = str(Path(sys.executable).parent / "fedhubert")
HOSTILE_APP = Path(__file__).resolve().parent / "hostile_app"


@pytest.fixture
def stalled(tmp_path, monkeypatch):
    """Runs started now use the hostile app, whose clients stall for a minute in round `round_` (so a kill lands
    mid-round whatever the machine's speed; 0 stalls no round); returns the override that selects the app. The
    app reads the plan per message, so calling again re-plans a resume; without FEDHUBERT_DRILL_PLAN it runs
    normally."""

    def plan(round_: int) -> str:
        path = tmp_path / "stall.json"
        path.write_text(json.dumps({str(c): {str(round_): "stall"} for c in range(3)}))
        monkeypatch.setenv("FEDHUBERT_DRILL_PLAN", str(path))
        return f"federation.app={HOSTILE_APP}"

    yield plan


def _messages(out: Path) -> list[dict]:
    path = out / "messages.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
    return [row for row in rows if row.get("kind", "message") == "message"]


def sent(kind: str, round_: int) -> Callable[[Path], bool]:
    """The server has sent `kind` messages of round `round_` (so the clients are working on that round)."""
    return lambda out: any(
        m["direction"] == "to_client" and m["type"] == kind and m["round"] == round_ for m in _messages(out)
    )


def start(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [FEDHUBERT, *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FEDHUBERT_PROGRESS": "0"},
    )


def wait_for(process: subprocess.Popen, out: Path, ready: Callable[[Path], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready(out):
        assert process.poll() is None, f"the run ended before the kill: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.1)


def run_processes(out: Path) -> list[int]:
    """Every live process of the run: its Flower processes (SuperLink, simulation, Ray's workers, some of them
    re-parented to init) carry FLWR_HOME=<out>/flwr in their environment."""
    return reaper.run_processes(out / "flwr")


def kill_everything(process: subprocess.Popen, out: Path) -> None:
    """SIGKILL the stage's command and everything it started at once: nothing gets to clean up or finish a
    write, as when the node dies."""
    pids = [process.pid, *run_processes(out)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=60)
    reaper.end_processes(run_processes(out))  # whatever a dying process was still starting
    assert not run_processes(out)


def same_weights(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different[:5]}"


def stop_with_sigterm(process: subprocess.Popen, out: Path, stage: str, rounds: int) -> None:
    """What Slurm sends before a time limit, sent while round 1 trains: the run ends after that round, checkpointed,
    with the command to continue it, and a new run over the stopped one is refused."""
    wait_for(process, out, sent(f"train{'.distill' if stage == 'distill' else ''}", 1))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 75, stderr
    assert f"Continue with: fedhubert {stage} --resume {out}" in stderr and "Traceback" not in stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "stopped" and record["summary"]["stopped_after_round"] == 1 < rounds, record
    assert load_checkpoint(out / "checkpoints" / "round_00001.pt")["state"]["round"] == 1
    assert not (out / "checkpoints" / "final.pt").exists() and not (out / "STOP").exists()
    assert not run_processes(out), "the stopped run left processes behind"
    assert run_cli(stage, "--out", out, "--config", out / "config.yaml") == 2, "no restart over a stopped run"


def test_pretraining_stopped_orphaned_and_killed_resumes_to_the_same_weights(
    four_rounds, small_partition, small_kmeans, tmp_path, intact, stalled, monkeypatch
):
    """One run of four_rounds' settings through the three ways a run is ended early, each followed by --resume:
    SIGTERM in round 1; `kill -9` of the stage command alone in round 2 (as on a login node: the SuperLink it
    started gets SIGTERM from the kernel, the parent-death signal, and ends the simulation and the ServerApp, so no
    server goes on writing into the run folder unseen); and SIGKILL of everything in round 3 (a node dies or the
    OOM killer strikes: nothing gets to clean up or finish a write). It ends with the uninterrupted run's weights."""
    intact(small_partition, small_kmeans)
    out = tmp_path / "interrupted"
    run = ("--partition", small_partition, "--kmeans", small_kmeans, "--out", out, *PRETRAIN_FAST, "--rounds", "4")
    app = stalled(0)  # the hostile app, with no stall in the rounds a SIGTERM must let finish
    process = start("pretrain", *run, "strategy.fraction=0.6", "strategy.name=fedadam", app)
    stop_with_sigterm(process, out, "pretrain", 4)

    stalled(2)
    process = start("pretrain", "--resume", out)
    wait_for(process, out, sent("train", 2))
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 60
    while run_processes(out) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not run_processes(out), run_processes(out)
    assert not (out / "checkpoints" / "round_00002.pt").exists()

    stalled(3)
    process = start("pretrain", "--resume", out)
    wait_for(process, out, sent("train", 3))
    kill_everything(process, out)
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["best.pt", "round_00001.pt", "round_00002.pt"]
    # the checkpoint the resume starts from is not touched by it (best.pt moves on as later rounds beat it, and
    # round 1's goes once round 4's is written: checkpoint_keep=3)
    intact(*sorted((out / "checkpoints").glob("round_00002*")))
    monkeypatch.delenv("FEDHUBERT_DRILL_PLAN")
    assert run_cli("pretrain", "--resume", out) == 0
    same_weights(four_rounds / "checkpoints" / "final.pt", out / "checkpoints" / "final.pt")
    assert json.loads((out / "run.json").read_text())["summary"]["resumed_after_round"] == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("round_*.pt")) == [f"round_0000{r}.pt" for r in (2, 3, 4)]


def test_distillation_stopped_and_killed_resumes_to_the_same_weights(
    distilled, tiny_teacher, small_partition, tmp_path, intact, stalled, monkeypatch
):
    """The distilled fixture's run, stopped by SIGTERM in round 1 and resumed, then killed outright (everything,
    SIGKILL) in round 2 and resumed: it ends with the uninterrupted run's weights."""
    intact(small_partition, tiny_teacher)
    out = tmp_path / "interrupted"
    run = ("--teacher", tiny_teacher, "--partition", small_partition, "--out", out, "--rounds", "2", *DISTILL_FAST)
    process = start("distill", *run, stalled(0))
    stop_with_sigterm(process, out, "distill", 2)

    stalled(2)
    process = start("distill", "--resume", out)
    wait_for(process, out, sent("train.distill", 2))
    kill_everything(process, out)
    assert not (out / "checkpoints" / "round_00002.pt").exists()
    monkeypatch.delenv("FEDHUBERT_DRILL_PLAN")
    assert run_cli("distill", "--resume", out) == 0
    same_weights(distilled / "checkpoints" / "final.pt", out / "checkpoints" / "final.pt")


def test_federated_kmeans_killed_mid_round_resumes_to_the_same_codebook(
    small_kmeans, small_partition, kmeans_features, tmp_path, intact
):
    intact(small_partition)
    out = tmp_path / "killed"
    process = start(
        "kmeans", "--partition", small_partition, "--out", out, *KMEANS_FAST, f"feature_dir={kmeans_features}"
    )
    wait_for(process, out, sent("query.kmeans_stats", 3))
    kill_everything(process, out)
    saved = sorted(p.name for p in (out / "checkpoints").glob("round_*.pt"))
    assert saved and not (out / "codebook.npy").exists(), saved
    assert run_cli("kmeans", "--resume", out) == 0
    assert np.array_equal(np.load(small_kmeans / "codebook.npy"), np.load(out / "codebook.npy"))
    for client in ("client_0", "client_1", "client_2"):
        for split in ("train", "valid"):
            assert (small_kmeans / client / f"{split}.km").read_text() == (out / client / f"{split}.km").read_text()
    record = json.loads((out / "kmeans.json").read_text())
    untimed = lambda history: [{k: v for k, v in row.items() if k != "seconds"} for row in history]  # noqa: E731
    assert untimed(record["history"]) == untimed(json.loads((small_kmeans / "kmeans.json").read_text())["history"])
    assert "skipping checkpoint" not in (out / "logs" / "kmeans.log").read_text()
