"""A real one-node Slurm cluster on localhost for the tests: Debian's slurm-wlm (slurmctld + slurmd) and a private
munged, all under one temporary folder, started and stopped by the test session.

`SlurmCluster.unavailable()` says why one cannot run here (no slurm-wlm or munge, not root); the tests are then
skipped with that reason. CI installs the packages (`make test WITH_SLURM=1`) and runs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "munged")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @staticmethod
    def unavailable() -> str | None:
        missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
        if missing:
            return (
                f"Slurm is not installed here (missing {', '.join(missing)}): 'make test WITH_SLURM=1' installs "
                f"slurm-wlm and munge with apt"
            )
        if os.geteuid() != 0:
            return "a private Slurm cluster needs root here (slurmd runs jobs as their users)"
        return None

    def _binary(self, name: str) -> str:
        return shutil.which(name) or str(Path("/usr/sbin") / name)

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")
        process = subprocess.Popen(
            [self._binary(name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process

    def start(self, timeout_s: float = 60.0) -> None:
        for sub in ("etc", "log", "run", "spool/ctld", "spool/d", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge.chmod(0o700)
        socket_path = munge / "munge.socket"
        self._start(
            "munged",
            "--foreground",
            "--force",
            f"--socket={socket_path}",
            f"--key-file={key}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
        )
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        cpus = os.cpu_count() or 1
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=fedhubert-test",
                    f"SlurmctldHost={self.host}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire is also how long a requeued job waits before it may start again (default 120 s)
                    f"AuthInfo=socket={socket_path},cred_expire=30",
                    f"StateSaveLocation={self.root / 'spool' / 'ctld'}",
                    f"SlurmdSpoolDir={self.root / 'spool' / 'd'}",
                    f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'run' / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "ReturnToService=2",
                    "MailProg=/bin/true",
                    "KillWait=10",
                    # sbatch --wait polls every 2 s only while MinJobAge / 2 > 2 s is false; with the default (300 s) it
                    # sleeps 2, 8, then 32 s between polls, so a 20 s job was seen ended 22 s late
                    "MinJobAge=4",
                    f"NodeName={self.host} CPUs={cpus} RealMemory={int(memory_mb * 0.8)} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self.log('munged.out')}")
            time.sleep(0.1)
        self._start("slurmctld", "-D", "-f", str(self.conf))
        time.sleep(1.0)
        self._start("slurmd", "-D", "-f", str(self.conf))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() in ("idle", "mix", "alloc"):
                return
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{process.args[0]} exited ({process.returncode}): "
                        f"{self.log('slurmctld.log')}\n{self.log('slurmd.log')}"
                    )
            time.sleep(0.5)
        raise RuntimeError(f"the node did not become idle: {state.stdout} {state.stderr}\n{self.log('slurmd.log')}")

    def log(self, name: str) -> str:
        path = self.root / "log" / name
        return path.read_text(errors="replace")[-3000:] if path.is_file() else f"({name} missing)"

    def run(self, *command: str | Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(c) for c in command], env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )

    def queue(self, job: str) -> str:
        return self.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip()

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        time.sleep(1.0)
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
