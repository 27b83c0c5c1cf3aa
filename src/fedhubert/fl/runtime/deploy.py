"""Flower's processes as daemons: a SuperLink (simulation or deployment engine) and SuperNodes, with TLS and
SuperNode authentication.

Every daemon gets its own FLWR_HOME and session (so stopping it stops all it started: superexec, serverapp and
clientapp processes), the venv's bin on PATH (the SuperLink starts `flower-superexec` from PATH), and its output
in a log file. `fedhubert superlink` / `fedhubert supernode`, the Slurm scripts, the federated stages and the
tests all start Flower through here.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedhubert.atomic import atomic_write_text
from fedhubert.errors import FedhubertError
from fedhubert.fl.runtime.actors import write_launcher

log = logging.getLogger(__name__)

CONNECTION = "fedhubert"  # the one SuperLink connection in a FLWR_HOME's config.toml
CERTIFICATES_HELP = "make them with scripts/make_certificates.sh (see setup.md, 'Secure deployment')"


class DeploymentError(FedhubertError):
    """A Flower daemon could not start, or a deployment file is missing."""


def flower_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # superexec, serverapp
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # A SuperExec asks for its next task every second by default: a run's ServerApp waited 0.5 s on average to start.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.05")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the OS picks it: two jobs sharing a node cannot get the same one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _existing(path: Path | str | None, what: str) -> Path | None:
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DeploymentError(f"{what} {path} does not exist; {CERTIFICATES_HELP}")
    return path


@dataclass(frozen=True)
class TLSFiles:
    """The SuperLink's TLS files: the CA certificate (which SuperNodes and `flwr` trust), the server's
    certificate (its SAN must name every host the SuperLink is reached by) and its private key."""

    ca: Path
    certificate: Path
    key: Path

    @classmethod
    def from_dir(cls, folder: Path) -> TLSFiles:
        """The layout scripts/make_certificates.sh writes: ca.crt, server.pem, server.key."""
        folder = Path(folder)
        return cls(*(_existing(folder / name, "TLS file") for name in ("ca.crt", "server.pem", "server.key")))


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> None:
    """FLWR_HOME/config.toml naming one SuperLink connection (`flwr` would otherwise write a default whose
    `local` connection starts a background SuperLink of its own)."""
    security = f'root-certificates = "{Path(root_certificates).resolve()}"' if root_certificates else "insecure = true"
    atomic_write_text(
        Path(flwr_home) / "config.toml",
        f'''[superlink]
default = "{CONNECTION}"

[superlink.{CONNECTION}]
address = "{address}"
{security}
''',
    )


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def end_with_parent() -> None:
    """Run in a child before it execs (Popen's preexec_fn): Linux sends it SIGTERM when the process that started it
    dies, even by SIGKILL, so a killed stage leaves no SuperLink (nor its ServerApp) running on unseen."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Daemon:
    """A Flower process in its own session, ended with its parent; `stop()` ends it and everything it started."""

    def __init__(
        self, name: str, command: list[str], flwr_home: Path, log_path: Path | None, first_on_path: Path | None = None
    ):
        self.name = name
        self.flwr_home = Path(flwr_home)
        self.log_path = log_path
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        sink: IO | None = None
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            sink = open(log_path, "ab")
        env = flower_env(self.flwr_home)
        if first_on_path is not None:
            env["PATH"] = f"{first_on_path}{os.pathsep}{env['PATH']}"
        try:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT if sink else None,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=end_with_parent,
            )
        finally:
            if sink is not None:
                sink.close()

    def alive(self) -> bool:
        return self.process.poll() is None

    def where(self) -> str:
        return f"see {self.log_path}" if self.log_path else "see its output above"

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the whole session, SIGKILL after `grace_s`; returns once the process is gone."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 15.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                try:  # the leader has exited: end what it left in its session (flwr-clientapp, superexec, ray)
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            except subprocess.TimeoutExpired:
                continue
        self.process.wait(timeout=15)


def _health(port: int, tls: TLSFiles | None) -> bool:
    scheme = "https" if tls else "http"
    # Liveness of our own child on loopback only; the certificate is verified where it matters (flwr, SuperNodes).
    context = ssl._create_unverified_context() if tls else None
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def start_superlink(
    flwr_home: Path,
    log_path: Path | None,
    *,
    port: int,
    host: str = "127.0.0.1",
    tls: TLSFiles | None = None,
    auth: bool = False,
    simulation: bool = False,
    timeout_s: float = 90.0,
) -> Daemon:
    """Start a SuperLink (Fleet, Control and Runtime APIs on one port) and wait until it answers /health.
    `auth`: only SuperNodes whose public keys are registered may join (needs TLS)."""
    if auth and tls is None:
        raise DeploymentError("SuperNode authentication needs TLS: give the SuperLink its certificates too")
    command = [
        flower_bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]  # the environment is installed already; no `uv sync`
    if tls:
        command += [
            "--ssl-ca-certfile",
            str(tls.ca),
            "--ssl-certfile",
            str(tls.certificate),
            "--ssl-keyfile",
            str(tls.key),
        ]
    else:
        command.append("--insecure")
    if auth:
        command.append("--enable-supernode-auth")
    launchers = None
    if simulation:
        command.append("--simulation")
        launchers = write_launcher(Path(flwr_home) / "bin").parent  # flwr-simulation with restartable actors
    daemon = Daemon("SuperLink", command, flwr_home, log_path, first_on_path=launchers)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise DeploymentError(f"the SuperLink exited with code {daemon.process.returncode}; {daemon.where()}")
        if _health(port, tls):
            return daemon
        time.sleep(0.3)
    daemon.stop()
    raise DeploymentError(f"the SuperLink did not answer on port {port} within {timeout_s:.0f} s; {daemon.where()}")


def register_supernodes(flwr_home: Path, address: str, ca: Path, public_keys: list[Path]) -> list[dict]:
    """Register SuperNodes' public keys (OpenSSH ECDSA, `KEY.pub`) with a SuperLink started with `auth`; each is
    named after its file. Returns Flower's answers."""
    write_connection(flwr_home, address, ca)
    answers = []
    for key in public_keys:
        key = _existing(key, "public key")
        result = subprocess.run(
            [
                flower_bin("flwr"),
                "supernode",
                "register",
                str(key),
                CONNECTION,
                "--name",
                key.name.removesuffix(".pub"),
                "--format",
                "json",
            ],
            env=flower_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        try:
            answer = json.loads(result.stdout)
        except ValueError:
            answer = {"success": False, "error-message": (result.stdout + result.stderr).strip()[-500:]}
        if result.returncode != 0 or not answer.get("success", True):
            raise DeploymentError(
                f"registering {key} with the SuperLink at {address} failed: {answer.get('error-message', answer)}"
            )
        answers.append(answer)
        log.info("registered SuperNode key %s", key)
    return answers


def supernode_command(
    *,
    superlink: str,
    partition_id: int,
    num_partitions: int,
    port: int,
    node_config: dict[str, str] | None = None,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    max_wait_s: float | None = 300.0,
) -> list[str]:
    """The command of a SuperNode serving client `partition_id` of `num_partitions`; extra node config keys
    (`partition-dir`, `kmeans-dir`, `work-dir`, `teacher-checkpoint`) say where this node keeps its data."""
    if not 0 <= partition_id < num_partitions:
        raise DeploymentError(f"partition id {partition_id} is outside 0..{num_partitions - 1}")
    pairs = {"partition-id": partition_id, "num-partitions": num_partitions, **(node_config or {})}
    config = " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={json.dumps(str(v))}" for k, v in pairs.items())
    command = [flower_bin("flower-supernode"), "--superlink", superlink, "--node-config", config]
    # The ClientApp runs in fedhubert's long-lived executor (fl/runtime/executor.py), not a process per message.
    command += ["--host", "127.0.0.1", "--port", str(port), "--isolation", "process"]
    ca = _existing(root_certificates, "CA certificate")
    command += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    key = _existing(auth_key, "SuperNode private key")
    if key:
        command += ["--auth-supernode-private-key", str(key)]
    if max_wait_s is not None:
        command += ["--max-wait-time", str(max_wait_s)]
    return command


# A helper that exits this many times in a row, each within HELPER_QUICK_EXIT_S of its start, is broken, not unlucky.
HELPER_RESTARTS, HELPER_QUICK_EXIT_S = 3, 20.0


def executor_command(runtime_port: int, flwr_home: Path) -> list[str]:
    """The long-lived ClientApp executor of a SuperNode whose Runtime API listens on loopback `runtime_port`."""
    address = f"127.0.0.1:{runtime_port}"
    module = "fedhubert.fl.runtime.executor"
    return [sys.executable, "-m", module, "--runtime-api-address", address, "--flwr-home", str(flwr_home)]


def wait_forever(daemon: Daemon, restart: Callable[[], Daemon] | None = None) -> int:
    """Run until the daemon exits or this process gets SIGTERM/SIGINT/SIGHUP (then stop it cleanly); the
    daemon's exit code, or 0 after a clean stop. `restart` (a SuperNode's executor) starts a helper process now
    and again whenever it exits (a ClientApp that killed its process costs that message only); it is stopped
    first."""
    stopping = []

    def request_stop(signum, _frame):
        stopping.append(signum)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    helper = restart() if restart else None
    started, quick_exits = time.monotonic(), 0
    try:
        while daemon.alive() and not stopping:
            if helper is not None and not helper.alive():
                code = helper.process.returncode
                quick_exits = quick_exits + 1 if time.monotonic() - started < HELPER_QUICK_EXIT_S else 0
                if quick_exits >= HELPER_RESTARTS:
                    raise DeploymentError(
                        f"{helper.name} exited with code {code} {quick_exits} times in a row, each within "
                        f"{HELPER_QUICK_EXIT_S:.0f} s of starting; {daemon.where()}"
                    )
                log.warning("%s exited with code %s; starting it again", helper.name, code)
                helper, started = restart(), time.monotonic()
            time.sleep(0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if helper is not None:
            helper.stop()
    if stopping:
        log.info("%s: stopping %s (signal %d)", daemon.name, daemon.name, stopping[0])
        daemon.stop()
        return 0
    return int(daemon.process.returncode or 0)


def _public_keys(paths: list[Path]) -> list[Path]:
    """`.pub` files, given one by one or as folders holding them."""
    keys: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.pub"))
            if not found:
                raise DeploymentError(f"{path} holds no .pub files; {CERTIFICATES_HELP}")
            keys += found
        else:
            keys.append(path)
    return keys


def serve_superlink(
    *,
    host: str,
    port: int,
    tls_dir: Path | None,
    authorized_keys: list[Path],
    flwr_home: Path | None,
    log_path: Path | None,
    ready_file: Path | None,
) -> int:
    """`fedhubert superlink`: start a deployment-engine SuperLink, register the SuperNodes' keys (which turns
    authentication on), write `ready_file` ("host:port") once it serves, and run until stopped."""
    tls = TLSFiles.from_dir(tls_dir) if tls_dir else None
    keys = _public_keys(authorized_keys)
    if keys and tls is None:
        raise DeploymentError("--authorized-keys needs --tls DIR: Flower authenticates SuperNodes over TLS only")
    port = port or free_port("0.0.0.0" if host in ("0.0.0.0", "") else host)
    home = Path(flwr_home) if flwr_home else Path(tempfile.mkdtemp(prefix="fedhubert-superlink-"))
    daemon = start_superlink(home, log_path, port=port, host=host, tls=tls, auth=bool(keys))
    try:
        if keys:
            register_supernodes(home, f"127.0.0.1:{port}", tls.ca, keys)
        log.info(
            "SuperLink serving on %s:%d (%s%s); FLWR_HOME %s",
            host,
            port,
            "TLS" if tls else "insecure",
            f", {len(keys)} SuperNode keys registered" if keys else "",
            home,
        )
        if ready_file:
            atomic_write_text(Path(ready_file), f"{socket.getfqdn() if host == '0.0.0.0' else host}:{port}\n")
        return wait_forever(daemon)
    finally:
        daemon.stop()
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)


def serve_supernode(
    *,
    superlink: str,
    partition_id: int | None,
    num_partitions: int | None,
    node_config: dict[str, str],
    root_certificates: Path | None,
    auth_key: Path | None,
    port: int,
    flwr_home: Path | None,
    log_path: Path | None,
    max_wait_s: float | None,
) -> int:
    """`fedhubert supernode`: one SuperNode for client `partition_id`, in the foreground until it exits or is
    stopped, with its ClientApp executor beside it (one process for all its messages: fl/runtime/executor.py).
    Under Slurm (`srun`), the partition id and count default to SLURM_PROCID and SLURM_NTASKS."""
    if partition_id is None:
        partition_id = _slurm_int("SLURM_PROCID", "--partition-id")
    if num_partitions is None:
        num_partitions = _slurm_int("SLURM_NTASKS", "--num-partitions")
    port = port or free_port()
    command = supernode_command(
        superlink=superlink,
        partition_id=partition_id,
        num_partitions=num_partitions,
        port=port,
        node_config=node_config,
        root_certificates=root_certificates,
        auth_key=auth_key,
        max_wait_s=max_wait_s,
    )
    temporary = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix=f"fedhubert-supernode-{partition_id}-")) if temporary else Path(flwr_home)
    log.info(
        "SuperNode for client %d of %d, SuperLink %s (%s%s)",
        partition_id,
        num_partitions,
        superlink,
        "TLS" if root_certificates else "insecure",
        ", authenticated" if auth_key else "",
    )
    daemon = Daemon(f"SuperNode {partition_id}", command, home, log_path)

    def executor() -> Daemon:
        name = f"the ClientApp executor of SuperNode {partition_id}"
        return Daemon(name, executor_command(port, home), home, log_path)

    try:
        code = wait_forever(daemon, restart=executor)
    finally:
        daemon.stop()
        if temporary:
            shutil.rmtree(home, ignore_errors=True)
    if code:
        raise DeploymentError(
            f"the SuperNode for client {partition_id} exited with code {code} (a refused key or an "
            f"unreachable SuperLink exits so); {daemon.where()}"
        )
    return 0


def _slurm_int(variable: str, flag: str) -> int:
    value = os.environ.get(variable)
    if value is None:
        raise DeploymentError(f"give {flag} (or run under srun, which sets {variable})")
    return int(value)
