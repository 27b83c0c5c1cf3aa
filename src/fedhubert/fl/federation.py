"""Running fedhubert's Flower app: in a private local simulation, or against a running SuperLink.

A run gets its own FLWR_HOME under the stage's output folder (`flwr/`), with a `config.toml` naming one
SuperLink connection, and a minimal app folder whose pyproject declares fedhubert's ServerApp and ClientApp (the
code itself is the installed package). For a simulation, a SuperLink in simulation mode is started on a free
loopback port and stopped afterwards, whatever happens. `flwr run --stream` follows the run; since it exits 0
even when the ServerApp fails, the run's final status is then read with `flwr ls` and anything but
`finished:completed` is an error that points at the logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedhubert import __version__
from fedhubert.atomic import atomic_write_text
from fedhubert.errors import FedhubertError
from fedhubert.fl.config import FederationConfig
from fedhubert.fl.resources import SimulationResources, simulation_resources

log = logging.getLogger(__name__)

CONNECTION = "fedhubert"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
# Lines of the stream worth showing on the console (all go to logs/flower.log): fedhubert's and Flower's own
# INFO/WARNING/ERROR lines, not Ray's worker chatter or HTTP traces.
_SHOWN = re.compile(r"^(\d\d:\d\d:\d\d (INFO|WARNING|ERROR)\s|(INFO|WARNING|ERROR)\s*:\s+\S|Successfully)")


class FederationError(FedhubertError):
    """The Flower run could not start or did not complete."""


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # superexec, serverapp
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _app_dir(flwr_home: Path, keys: list[str]) -> Path:
    app = flwr_home / "app"
    version = re.sub(r"[^0-9.]", "", __version__.split("+")[0]) or "0.0.0"
    config = "\n".join(f'{key} = ""' for key in keys)
    atomic_write_text(app / "pyproject.toml", f'''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedhubert-app"
version = "{version}"
description = "fedhubert's Flower app; its code is the installed fedhubert package"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedhubert"

[tool.flwr.app.components]
serverapp = "fedhubert.fl.server_app:app"
clientapp = "fedhubert.fl.client_app:app"

[tool.flwr.app.config]
{config}
''')
    return app


@dataclass
class _SuperLink:
    process: subprocess.Popen
    port: int
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=15)


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _start_simulation_superlink(flwr_home: Path, log_dir: Path, timeout: float = 90.0) -> _SuperLink:
    port = free_port()
    log_path = log_dir / "superlink.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [_bin("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"]
    with open(log_path, "ab") as sink:
        process = subprocess.Popen(command, env=_env(flwr_home), stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    superlink = _SuperLink(process, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(f"the simulation SuperLink exited with code {process.returncode}; see {log_path}")
        if _health(port):
            return superlink
        time.sleep(0.3)
    superlink.stop()
    raise FederationError(f"the simulation SuperLink did not answer within {timeout:.0f} s; see {log_path}")


def _write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> None:
    security = (f'root-certificates = "{Path(root_certificates).resolve()}"' if root_certificates
                else "insecure = true")
    atomic_write_text(flwr_home / "config.toml", f'''[superlink]
default = "{CONNECTION}"

[superlink.{CONNECTION}]
address = "{address}"
{security}
''')


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _run_status(flwr_home: Path, run_id: str, timeout: float = 60.0) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    status, details = "unknown", ""
    while time.monotonic() < deadline:
        result = subprocess.run([_bin("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
                                env=_env(flwr_home), capture_output=True, text=True, timeout=60)
        try:
            runs = json.loads(result.stdout).get("runs", [])
        except ValueError:
            runs = []
        if runs:
            status, details = runs[0].get("status", "unknown"), runs[0].get("status-details", "")
            if status.startswith("finished"):
                return status, details
        time.sleep(1.0)
    return status, details


def run_flower_app(
    run_config: dict[str, object], out_dir: Path, num_clients: int, federation: FederationConfig,
    resources: SimulationResources | None = None, app: Path | None = None,
) -> str:
    """Run fedhubert's Flower app with `run_config` (flat scalars); returns the run id once it has completed.
    `resources` (for a simulation) defaults to the machine's cores shared out over the clients; `app` is the
    Flower app folder (default: a minimal one made in the run's FLWR_HOME; the repository root works too)."""
    out_dir = Path(out_dir).resolve()
    flwr_home = out_dir / "flwr"
    log_dir = out_dir / "logs"
    app = Path(app).resolve() if app else _app_dir(flwr_home, sorted(run_config))
    superlink = None
    try:
        if federation.superlink is None:
            resources = resources or simulation_resources(federation, num_clients)
            superlink = _start_simulation_superlink(flwr_home, log_dir)
            _write_connection(flwr_home, f"127.0.0.1:{superlink.port}", None)
            log.info("Flower simulation SuperLink on 127.0.0.1:%d: %d virtual clients, %d CPU(s) and %.2f GPU each",
                     superlink.port, num_clients, resources.cpus_per_client, resources.gpus_per_client)
        else:
            _write_connection(flwr_home, federation.superlink, federation.root_certificates)
            log.info("Flower deployment: SuperLink %s, expecting %d clients", federation.superlink, num_clients)
        command = [_bin("flwr"), "run", str(app), CONNECTION, "--stream"]
        for key, value in run_config.items():
            command += ["--run-config", f"{key}={_toml_value(value)}"]
        if federation.superlink is None:
            command += ["--federation-config", resources.federation_config(num_clients)]
        return _follow(command, flwr_home, log_dir / "flower.log", federation.timeout_s)
    finally:
        if superlink is not None:
            superlink.stop()


def _follow(command: list[str], flwr_home: Path, log_path: Path, timeout_s: float) -> str:
    run_id = None
    tail: list[str] = []
    process = subprocess.Popen(command, env=_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)
    timer = threading.Timer(timeout_s, lambda: os.killpg(process.pid, signal.SIGKILL))
    timer.start()
    try:
        with open(log_path, "a", encoding="utf-8") as sink:
            assert process.stdout is not None
            for raw in process.stdout:
                line = _ANSI.sub("", raw.rstrip("\n"))
                sink.write(line + "\n")
                sink.flush()
                tail = (tail + [line])[-40:]
                match = _RUN_ID.search(line)
                if match:
                    run_id = match[1]
                if _SHOWN.search(line):
                    log.info("flower: %s", line.strip())
        process.wait()
    finally:
        timer.cancel()
    if process.returncode == -signal.SIGKILL:
        raise FederationError(f"the Flower run did not finish within {timeout_s:.0f} s; see {log_path}")
    if run_id is None:
        raise FederationError(
            f"the Flower run did not start (flwr exited {process.returncode}); see {log_path}:\n  " + "\n  ".join(tail)
        )
    status, details = _run_status(flwr_home, run_id)
    if status != "finished:completed":
        raise FederationError(
            f"Flower run {run_id} ended '{status}' ({details or 'no details'}); see {log_path}. Last lines:\n  "
            + "\n  ".join(tail[-15:])
        )
    return run_id
