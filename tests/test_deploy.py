"""Flower's deployment engine on loopback, as processes: `fedhubert superlink` with TLS and SuperNode
authentication, two `fedhubert supernode`s, federated k-means and a 2-round pretraining through them, a refused
unregistered node, a clean shutdown that leaves no process behind, and SuperNodes whose partition ids do not fit the
partition."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common import DISTILL_FAST, KMEANS_FAST, PRETRAIN_FAST, rows, run_cli
from fedhubert.fl.records import read_messages

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FEDHUBERT = str(Path(sys.executable).parent / "fedhubert")


def start(*args: str | Path, log: Path) -> subprocess.Popen:
    """A fedhubert daemon command in its own session, its output in `log`."""
    with open(log, "wb") as sink:
        return subprocess.Popen(
            [FEDHUBERT, *map(str, args)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "FEDHUBERT_PROGRESS": "0"},
        )


def flower_processes(marker: str) -> list[psutil.Process]:
    """Processes whose command line mentions `marker` (this test's temporary folder)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def superlink_address(superlink: subprocess.Popen, ready: Path, output: Path) -> str:
    """The loopback address of a `fedhubert superlink` once its ready file appears (within 60 s)."""
    deadline = time.monotonic() + 60
    while not ready.is_file():
        assert superlink.poll() is None, output.read_text()
        assert time.monotonic() < deadline, "the SuperLink did not get ready within 60 s"
        time.sleep(0.3)
    return "127.0.0.1:" + ready.read_text().strip().rsplit(":", 1)[1]


def stop_daemons(processes: list[subprocess.Popen]) -> list[int | None]:
    """SIGTERM to each daemon still running, then their exit codes (None: killed after 60 s)."""
    codes = []
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            codes.append(process.wait(timeout=60))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            codes.append(None)
    return codes


class Federation:
    def __init__(self, root: Path):
        self.root = root
        self.certs = root / "certs"
        subprocess.run(
            ["bash", REPO / "scripts" / "make_certificates.sh", self.certs, "--nodes", "3"],
            check=True,
            capture_output=True,
        )
        self.ready = root / "superlink.ready"
        self.superlink = start(
            "superlink",
            "--tls",
            self.certs,
            "--authorized-keys",
            self.certs / "supernodes" / "client_0.pub",
            self.certs / "supernodes" / "client_1.pub",
            "--flwr-home",
            root / "superlink-home",
            "--log",
            root / "flower-superlink.log",
            "--ready-file",
            self.ready,
            log=root / "superlink.out",
        )
        self.address = superlink_address(self.superlink, self.ready, root / "superlink.out")
        self.supernodes = [self.supernode(i, f"client_{i}") for i in range(2)]

    def supernode(self, index: int, key: str) -> subprocess.Popen:
        return start(
            "supernode",
            "--superlink",
            self.address,
            "--partition-id",
            index,
            "--num-partitions",
            2,
            "--root-certificates",
            self.certs / "ca.crt",
            "--auth-key",
            self.certs / "supernodes" / key,
            "--flwr-home",
            self.root / f"supernode-{key}-home",
            "--log",
            self.root / f"flower-{key}.log",
            "--max-wait-time",
            60,
            log=self.root / f"supernode-{key}.out",
        )

    def federation_keys(self) -> list[str]:
        return [
            f"federation.superlink={self.address}",
            f"federation.root_certificates={self.certs / 'ca.crt'}",
            "federation.timeout_s=600",
        ]

    def stop(self) -> list[int | None]:
        return stop_daemons([*self.supernodes, self.superlink])


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("deploy"))
    yield fed
    fed.stop()
    for process in flower_processes(str(fed.root)):
        process.kill()


@pytest.fixture(scope="module")
def two_clients(small_librispeech, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy-data") / "partition"
    assert run_cli("partition", "--corpus", small_librispeech, "--out", out, "--clients", "2", "use_cache=false") == 0
    return out


def test_kmeans_pretraining_and_distillation_run_through_tls_and_authenticated_supernodes(
    federation, two_clients, tmp_path
):
    kmeans = tmp_path / "kmeans"
    assert (
        run_cli(
            "kmeans",
            "--partition",
            two_clients,
            "--out",
            kmeans,
            *KMEANS_FAST,
            "reference=false",
            *federation.federation_keys(),
        )
        == 0
    )
    assert sorted(p.name for p in kmeans.glob("client_*/train.km")) == ["train.km", "train.km"]
    run = tmp_path / "pretrain"
    assert (
        run_cli(
            "pretrain",
            "--partition",
            two_clients,
            "--kmeans",
            kmeans,
            "--out",
            run,
            *PRETRAIN_FAST,
            "--rounds",
            "2",
            *federation.federation_keys(),
        )
        == 0
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in rows if r["kind"] == "train"] == [(1, 2), (2, 2)]
    assert (run / "checkpoints" / "final.pt").is_file()
    summary = json.loads((run / "run.json").read_text())["summary"]
    assert summary["rounds"] == 2 and summary["flower_run_id"]
    distill = tmp_path / "distill"
    assert (
        run_cli(
            "distill",
            "--teacher",
            run / "checkpoints" / "final.pt",
            "--partition",
            two_clients,
            "--out",
            distill,
            *DISTILL_FAST,
            "--rounds",
            "1",
            *federation.federation_keys(),
        )
        == 0
    )
    assert (distill / "checkpoints" / "final.pt").is_file()
    # The clients were the SuperNodes: each one's Flower log shows the rounds' messages arriving over TLS, all
    # run by the node's one long-lived executor (no flwr-clientapp process per message).
    for key in ("client_0", "client_1"):
        said = (federation.root / f"flower-{key}.log").read_text()
        for message in ("query.kmeans_stats", "train", "train.distill"):
            assert f"Receiving: {message} message" in said
        assert said.count("fedhubert executor: serving") == 1 and "Start `flwr-clientapp` process" not in said


def test_a_supernode_without_a_registered_key_is_refused(federation):
    intruder = federation.supernode(0, "client_2")
    assert intruder.wait(timeout=90) == 2, "the SuperNode command reports the refusal as a failure"
    said = (federation.root / "supernode-client_2.out").read_text()
    assert "the SuperNode for client 0 exited with code" in said
    assert "ERROR" in (federation.root / "flower-client_2.log").read_text()


def test_stopping_the_daemons_is_clean_and_leaves_no_process(federation):
    assert federation.stop() == [0, 0, 0]
    time.sleep(1.0)
    assert flower_processes(str(federation.root)) == []
    assert not federation.ready.exists(), "the ready file goes with the SuperLink"


def test_supernodes_that_do_not_fit_the_partition_are_named(two_clients, tmp_path):
    """Two SuperNodes started as client 0 of 3 for a 2-client partition (an insecure SuperLink): the run stops
    before its first round, naming both nodes and the partition-id they share, and says which --num-partitions fits."""
    ready = tmp_path / "superlink.ready"
    home = tmp_path / "superlink-home"
    daemons = [start("superlink", "--flwr-home", home, "--ready-file", ready, log=tmp_path / "superlink.out")]
    try:
        address = superlink_address(daemons[0], ready, tmp_path / "superlink.out")
        for key in ("a", "b"):
            daemons.append(
                start(
                    *("supernode", "--superlink", address, "--partition-id", "0", "--num-partitions", "3"),
                    *("--flwr-home", tmp_path / f"supernode-{key}-home", "--max-wait-time", "60"),
                    log=tmp_path / f"supernode-{key}.out",
                )
            )
        out = tmp_path / "kmeans"
        keys = [f"federation.superlink={address}", "federation.connect_timeout_s=60", "reference=false"]
        assert run_cli("kmeans", "--partition", two_clients, "--out", out, *KMEANS_FAST, *keys) != 0
        error = json.loads((out / "run.json").read_text())["error"]
        assert "both say partition-id=0" in error and "--partition-id I" in error, error
        log = (out / "logs" / "kmeans.log").read_text()
        assert "was started with partition-id=0, num-partitions=3, but the partition has 2 clients" in log
        assert "--num-partitions 2" in log
    finally:
        stop_daemons(daemons[::-1])  # the SuperNodes first, as Federation.stop does
        for process in flower_processes(str(tmp_path)):
            process.kill()


def test_a_pool_node_that_dies_mid_round_costs_only_the_clients_it_serves(small_partition, small_kmeans, tmp_path):
    """Virtual clients on the deployment engine: 2 SuperNodes serve the partition's 3 clients. One is killed as
    round 1 is sent: exactly the clients it was given fail (after round_timeout_s), the round completes from the
    others, and the run ends its 2 rounds on the node that is left."""
    ready = tmp_path / "superlink.ready"
    daemons = [
        start("superlink", "--flwr-home", tmp_path / "superlink-home", "--ready-file", ready, log=tmp_path / "sl.out")
    ]
    out = tmp_path / "pretrain"
    try:
        address = superlink_address(daemons[0], ready, tmp_path / "sl.out")
        for index in range(2):
            daemons.append(
                start(
                    *("supernode", "--superlink", address, "--partition-id", index, "--num-partitions", 2),
                    *("--flwr-home", tmp_path / f"supernode-{index}-home", "--max-wait-time", "60"),
                    log=tmp_path / f"supernode-{index}.out",
                )
            )
        keys = [
            f"federation.superlink={address}",
            "federation.virtual_clients=true",
            "federation.supernodes=2",
            "federation.connect_timeout_s=60",
            "federation.timeout_s=600",
            "round_timeout_s=30",
            "strategy.min_clients=1",
        ]
        args = ("--partition", small_partition, "--kmeans", small_kmeans, "--out", out, "--rounds", "2")
        stage = subprocess.Popen(
            [FEDHUBERT, "pretrain", *map(str, args), *PRETRAIN_FAST, *keys],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "FEDHUBERT_PROGRESS": "0"},
        )
        sent: list[dict] = []
        deadline = time.monotonic() + 300
        while not sent:
            assert stage.poll() is None and time.monotonic() < deadline, "round 1 was never sent"
            time.sleep(0.2)
            log = out / "messages.jsonl"
            lines = log.read_text().splitlines() if log.is_file() else []
            logged = [json.loads(line) for line in lines[:-1]]  # the last line may be half-written
            sent = [m for m in logged if m.get("direction") == "to_client" and m["type"] == "train"]
        os.killpg(daemons[2].pid, signal.SIGKILL)
        assert stage.wait(timeout=600) == 0
        messages = read_messages(out / "messages.jsonl")
        round_one = [m for m in messages if m["direction"] == "to_client" and m["type"] == "train" and m["round"] == 1]
        assert len(round_one) == 3 and len({m["node"] for m in round_one}) == 2, round_one
        failed = {f["client"] for f in rows(out, "failure") if f["round"] == 1}
        by_node: dict[int, set[int]] = {}
        for m in round_one:
            by_node.setdefault(m["node"], set()).add(m["client"])
        assert failed in by_node.values(), (failed, by_node)
        train = rows(out, "train")
        assert [r["round"] for r in train] == [1, 2] and train[0]["clients"] == 3 - len(failed)
    finally:
        stop_daemons(daemons[::-1])
        for process in flower_processes(str(tmp_path)):
            process.kill()


@pytest.fixture(scope="module")
def six_clients(tmp_path_factory) -> Path:
    """One client per training speaker of a corpus with 6 of them (and 2 held-out speakers in dev-clean)."""
    root = tmp_path_factory.mktemp("deploy-six")
    corpus = root / "LibriSpeech"
    shares = ["subsets.train-clean-100=5", "subsets.train-clean-360=0", "subsets.train-other-500=0"]
    shares += ["subsets.dev-clean=1", "subsets.dev-other=0", "subsets.test-clean=0"]
    synth = ["--speakers", "8", "--minutes", "0.15", "--seed", "3", "chapters=2", "max_seconds=5", *shares]
    assert run_cli("synth", "librispeech", "--out", corpus, "--workers", "2", *synth) == 0
    out = root / "partition"
    subsets = "train_subsets=[train-clean-100]"
    assert run_cli("partition", "--corpus", corpus, "--out", out, "--clients", "6", "use_cache=false", subsets) == 0
    return out


def test_six_supernodes_one_never_connecting_and_two_killed_mid_run(six_clients, tmp_path):
    """The deployment drill: a 6-client partition and a SuperNode per client, of which the one for client 5 never
    starts. Federated k-means through the other 5 starts without it once connect_timeout_s has passed, naming it
    once; pretraining on those labels loses two SuperNodes as round 1 is sent, so 3 of 5 train. Every run completes:
    the missing client is never sampled, the killed nodes' clients are the round's failures, named, and nothing
    written is lost (the metrics rows and the final checkpoint of both rounds)."""
    ready = tmp_path / "superlink.ready"
    daemons = [
        start("superlink", "--flwr-home", tmp_path / "superlink-home", "--ready-file", ready, log=tmp_path / "sl.out")
    ]
    try:
        address = superlink_address(daemons[0], ready, tmp_path / "sl.out")
        nodes = {}
        for index in range(5):  # client 5's SuperNode never connects
            nodes[index] = start(
                *("supernode", "--superlink", address, "--partition-id", index, "--num-partitions", 6),
                *("--flwr-home", tmp_path / f"supernode-{index}-home", "--max-wait-time", "60"),
                log=tmp_path / f"supernode-{index}.out",
            )
        daemons += list(nodes.values())
        keys = [f"federation.superlink={address}", "federation.connect_timeout_s=30", "federation.timeout_s=900"]
        kmeans = tmp_path / "kmeans"
        assert (
            run_cli(
                *("kmeans", "--partition", six_clients, "--out", kmeans, *KMEANS_FAST, *keys),
                *("reference=false", "lloyd.max_rounds=3"),  # each Lloyd round starts 5 ClientApp processes
            )
            == 0
        )
        record = json.loads((kmeans / "kmeans.json").read_text())
        assert [(f["client"], f["stage"]) for f in record["failed_clients"]] == [(5, "connect")]
        assert "did not connect within 30 s" in record["failed_clients"][0]["reason"]
        assert not (kmeans / "client_5" / "train.km").exists() and (kmeans / "client_4" / "train.km").is_file()
        named = "no SuperNode serves 1 of the 6 clients (client(s) 5)"
        assert (kmeans / "logs" / "server-kmeans.log").read_text().count(named) == 1  # named once

        out = tmp_path / "pretrain"
        args = ("--partition", six_clients, "--kmeans", kmeans, "--out", out, "--rounds", "2")
        stage = subprocess.Popen(
            [
                FEDHUBERT,
                "pretrain",
                *map(str, args),
                *PRETRAIN_FAST,
                *keys,
                "round_timeout_s=180",  # SuperNodes start their executors on 2 cores in round 1 (11 of them took 76 s)
                "federation.connect_timeout_s=5",  # the 5 are connected already: this is client 5's wait
                "strategy.min_clients=1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "FEDHUBERT_PROGRESS": "0"},
        )
        deadline = time.monotonic() + 600
        while True:
            assert stage.poll() is None and time.monotonic() < deadline, "round 1 was never sent"
            messages = out / "messages.jsonl"
            lines = messages.read_text().splitlines()[:-1] if messages.is_file() else []  # the last may be half-written
            if any(json.loads(line).get("type") == "train" for line in lines):
                break
            time.sleep(0.2)
        for index in (1, 3):
            os.killpg(nodes[index].pid, signal.SIGKILL)
        assert stage.wait(timeout=900) == 0
        messages = read_messages(out / "messages.jsonl")
        sent = [m for m in messages if m["direction"] == "to_client" and m["type"] == "train"]
        assert 5 not in {m["client"] for m in sent}
        assert {m["client"] for m in sent if m["round"] == 1} == set(range(5))
        failures = rows(out, "failure")
        assert {f["client"] for f in failures if f["round"] == 1} == {1, 3}, failures
        assert {f["client"] for f in failures} == {1, 3} and all(f["reason"] for f in failures), failures
        train = rows(out, "train")
        assert [r["round"] for r in train] == [1, 2] and train[0]["clients"] == 3, train
        assert (out / "checkpoints" / "final.pt").is_file()
        assert json.loads((out / "run.json").read_text())["status"] == "completed"
        assert (out / "logs" / "server-pretrain.log").read_text().count(named) == 1
    finally:
        stop_daemons(daemons[::-1])
        for process in flower_processes(str(tmp_path)):
            process.kill()


def test_daemon_commands_name_their_mistakes(tmp_path, capsys):
    assert run_cli("supernode", "--superlink", "127.0.0.1:1", "--partition-id", "3", "--num-partitions", "2") == 2
    assert "partition id 3 is outside 0..1" in capsys.readouterr().err
    assert run_cli("supernode", "--superlink", "127.0.0.1:1", "--num-partitions", "2") == 2
    assert "give --partition-id (or run under srun, which sets SLURM_PROCID)" in capsys.readouterr().err
    assert (
        run_cli(
            "supernode",
            "--superlink",
            "127.0.0.1:1",
            "--partition-id",
            "0",
            "--num-partitions",
            "2",
            "--root-certificates",
            tmp_path / "ca.crt",
        )
        == 2
    )
    assert (
        f"CA certificate {tmp_path / 'ca.crt'} does not exist; make them with scripts/make_certificates.sh"
        in capsys.readouterr().err
    )
    (tmp_path / "node.pub").write_text("ecdsa-sha2-nistp384 AAAA test\n")
    assert run_cli("superlink", "--authorized-keys", tmp_path / "node.pub") == 2
    assert "--authorized-keys needs --tls DIR" in capsys.readouterr().err
    assert run_cli("superlink", "--tls", tmp_path) == 2
    assert f"TLS file {tmp_path / 'ca.crt'} does not exist" in capsys.readouterr().err


def test_a_supernode_helper_that_dies_is_started_again_and_one_that_cannot_start_is_an_error(tmp_path):
    """wait_forever with real processes: the SuperNode's ClientApp executor (here a process that exits at once, or
    once and then runs) is started again when it exits; one that exits within seconds 3 times in a row stops the
    node with an error naming it, instead of a restart loop."""
    from fedhubert.fl.runtime.deploy import Daemon, DeploymentError, wait_forever

    node = Daemon("node", [sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "home", None)
    try:
        with pytest.raises(DeploymentError, match="exited with code 3 3 times in a row"):
            wait_forever(node, restart=lambda: Daemon("helper", [sys.executable, "-c", "exit(3)"], tmp_path, None))
        assert node.alive(), "the caller stops the node"
    finally:
        node.stop()
    starts = tmp_path / "starts"
    script = f"import pathlib, time; p = pathlib.Path({str(starts)!r}); p.write_text(p.read_text() + 'x')\n"
    script += "if len(p.read_text()) == 1: exit(9)\ntime.sleep(120)"
    starts.write_text("")
    node = Daemon("node", [sys.executable, "-c", "import time; time.sleep(4)"], tmp_path / "home", None)
    assert wait_forever(node, restart=lambda: Daemon("helper", [sys.executable, "-c", script], tmp_path, None)) == 0
    assert starts.read_text() == "xx", "started, exited with 9, started again, stopped with the node"
