"""`flwr run .` as a Flower user runs it: from a copy of the repository, with flat `--run-config` keys, on Flower's
own local simulation SuperLink (started by `flwr`, in a private FLWR_HOME on free ports). The run writes the same
records as `fedhubert pretrain`; too few SuperNodes give a waiting message and a bounded failure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from common import SECAGG_STAGES, aggregate_error_and_spread
from fedhubert.config import load_config
from fedhubert.fl.records import read_messages
from fedhubert.fl.runtime.deploy import flower_bin, free_port
from fedhubert.pretrain.config import PretrainConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# A YAML layer under the flat keys: what keeps the run small (the flat keys carry the rest).
FAST = {
    "train": {"device": "cpu", "data": {"min_seconds": 1, "max_seconds": 3, "batch_seconds": 12}},
    "federation": {"connect_timeout_s": 20},
}


@pytest.fixture(scope="module")
def flower_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """A copy of the repository (what `flwr run` packs) and the environment of a user whose `flwr` starts its
    own local SuperLink; that SuperLink is stopped afterwards (Flower leaves it running for later runs). The user
    has fedhubert installed and, as README advises, keeps the SuperLink from building a 1.8 GB `uv sync`
    environment for every run (and spending a minute deleting it)."""
    app = tmp_path_factory.mktemp("flower-user") / "fedhubert"
    for name in ("src", "configs"):
        shutil.copytree(REPO / name, app / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, app / name)
    port = str(free_port())
    env = {
        **os.environ,
        "FLWR_HOME": str(app.parent / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": port,
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(flower_bin('flwr')).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    yield app, env
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("flower-superlink" in part for part in cmdline) and port in cmdline:
            os.killpg(os.getpgid(process.pid), signal.SIGTERM)


def flwr_run(app: Path, env: dict, run_config: str, supernodes: int, folder: str = ".") -> subprocess.CompletedProcess:
    """`flwr run FOLDER --stream` in the user's copy of the repository (FOLDER: the Flower app, `.` by default)."""
    command = [flower_bin("flwr"), "run", folder, "--stream", "--run-config", run_config]
    command += ["--federation-config", f"num-supernodes={supernodes}"]
    return subprocess.run(command, cwd=app, env=env, capture_output=True, text=True, timeout=600)


def test_flwr_run_with_flat_keys_writes_the_stage_records(flower_user, small_partition, small_kmeans, tmp_path):
    app, env = flower_user
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(FAST))
    out = tmp_path / "run"
    result = flwr_run(
        app,
        env,
        f"num-server-rounds=2 local-steps=2 preset='tiny' strategy='fedavg' partition='{small_partition}' "
        f"kmeans='{small_kmeans}' out='{out}' config='{config}'",
        supernodes=3,
    )
    assert (out / "run.json").is_file(), result.stdout + result.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed", record.get("error")
    assert record["command"][:2] == ["flwr", "run"]
    saved = load_config(PretrainConfig, out / "config.yaml")
    assert (saved.num_rounds, saved.local_steps, saved.model.preset) == (2, 2, "tiny")
    assert saved.partition == small_partition and saved.train.data.max_seconds == 3
    assert record["summary"]["rounds"] == 2 and record["summary"]["clients"] == 3
    assert (out / "checkpoints" / "final.pt").is_file() and (out / "pretrain.png").is_file()
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if r["kind"] == "train"] == [1, 2]
    assert (out / "logs" / "pretrain.log").is_file()


def test_a_client_whose_supernode_never_connects_is_named_and_never_sampled(
    flower_user, small_partition, small_kmeans, tmp_path
):
    """With one SuperNode per client (`federation.virtual_clients=false`) a federation of 2 SuperNodes serves 2 of
    the 3 clients: the wait names the count and the fix, ends at connect_timeout_s, and the run starts without
    client 2 (named once, never sampled). With strategy.min_clients=3 the same wait is an error. (With virtual
    clients, the default in simulation, 2 SuperNodes serve all 3.)"""
    app, env = flower_user
    for min_clients, status in ((2, "completed"), (3, "failed")):
        config = tmp_path / f"fast-{min_clients}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    **FAST,
                    "federation": {**FAST["federation"], "virtual_clients": False},
                    "strategy": {"min_clients": min_clients},
                }
            )
        )
        out = tmp_path / f"run-{min_clients}"
        result = flwr_run(
            app,
            env,
            f"num-server-rounds=2 local-steps=2 preset='tiny' partition='{small_partition}' "
            f"kmeans='{small_kmeans}' out='{out}' config='{config}'",
            supernodes=2,
        )
        stream = result.stdout + result.stderr
        assert "waiting for 3 clients, 2 connected" in stream and "num-supernodes=3" in stream, stream[-3000:]
        record = json.loads((out / "run.json").read_text())
        assert record["status"] == status, record.get("error")
        if status == "failed":
            assert "gave up after 20 s (federation.connect_timeout_s)" in record["error"]
            continue
        log = (out / "logs" / "pretrain.log").read_text()
        assert log.count("no SuperNode serves 1 of the 3 clients (client(s) 2)") == 1, log
        assert "client 2: its SuperNode did not connect within 20 s" in log
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["clients"] for r in rounds if r["kind"] == "train"] == [2, 2]
        messages = read_messages(out / "messages.jsonl")
        assert {m["client"] for m in messages if m["type"] == "train"} == {0, 1}


def test_a_key_the_task_does_not_read_is_refused(flower_user, small_partition, tmp_path):
    app, env = flower_user
    out = tmp_path / "run"
    result = flwr_run(
        app, env, f"task='pretrain' teacher='/x/teacher.pt' partition='{small_partition}' out='{out}'", supernodes=3
    )
    stream = result.stdout + result.stderr
    assert "teacher='/x/teacher.pt': not read by task 'pretrain'" in stream, stream[-3000:]


def test_the_secagg_app_runs_as_the_readme_runs_it(flower_user, small_partition, small_kmeans, tmp_path):
    """README's `flwr run apps/secagg ...` from the checkout, on Flower's local SuperLink: the SecAgg+ stages run
    every round, the final model is written, and it is the mean of what the clients trained (which they also write
    here, `keep-client-weights`: the simulation shares the disk) within SecAgg+'s quantization step."""
    app, env = flower_user
    shutil.copytree(REPO / "apps" / "secagg", app / "apps" / "secagg")
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(FAST))
    out = tmp_path / "secagg"
    run_config = (
        f"num-server-rounds=2 local-steps=2 preset='tiny' partition='{small_partition}' kmeans='{small_kmeans}' "
        f"out='{out}' config='{config}' keep-client-weights=true"
    )
    result = flwr_run(app, env, run_config, supernodes=3, folder="apps/secagg")
    assert (out / "secagg.json").is_file(), (result.stdout + result.stderr)[-3000:]
    summary = json.loads((out / "secagg.json").read_text())
    assert summary["secagg"] is True and summary["clients"] == 3
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(list(r["stages"]) == SECAGG_STAGES for r in summary["rounds"])
    assert all(r["clients"] == 3 and r["out_of_range"] == 0 for r in summary["rounds"])
    assert (out / "final.pt").is_file() and (out / "logs" / "secagg.log").is_file()
    error, spread = aggregate_error_and_spread(out, summary)
    step = summary["quantization_step"]
    assert step == pytest.approx(2 * summary["clipping_range"] / 2**22)
    assert 0 < error <= step + 2e-7, "SecAgg+ gives the mean within its quantization step (and a float32 cast)"
    assert spread > 100 * step, "the clients differ by far more than the quantization error"
