"""Running fedhubert's Flower app: in a private local simulation, or against a running SuperLink.

A run gets its own FLWR_HOME under the stage's output folder (`flwr/`), with a `config.toml` naming one
SuperLink connection, and a minimal app folder whose pyproject declares fedhubert's ServerApp and ClientApp (the
code itself is the installed package). For a simulation, a SuperLink in simulation mode is started on a free
loopback port and stopped afterwards, whatever happens: even if the stage is killed, the SuperLink gets SIGTERM
from the kernel and a watchdog (`fl.runtime.reaper`) ends the simulation it started. `flwr run --stream` follows the
run; since it exits 0 even when the ServerApp fails, the run's final status is then read with `flwr ls` and
anything but `finished:completed` is an error that points at the logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fedhubert import __version__
from fedhubert.atomic import atomic_write_text
from fedhubert.errors import ConfigError, FedhubertError, StageStopped
from fedhubert.fl.config import FederationConfig, RoundsConfig
from fedhubert.fl.local import client_configs
from fedhubert.fl.privacy import check_settings
from fedhubert.fl.rounds import CHECKPOINTS, STOP_FILE, newest_checkpoint, summary_path
from fedhubert.fl.runtime.deploy import (
    CONNECTION,
    Daemon,
    DeploymentError,
    end_with_parent,
    flower_bin,
    flower_env,
    free_port,
    start_superlink,
    write_connection,
)
from fedhubert.fl.runtime.reaper import Reaper
from fedhubert.fl.runtime.resources import SimulationResources, simulation_resources, supernodes
from fedhubert.runlog import CONFIG_FILE, StageRun

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
# Lines of the stream worth showing on the console (all go to logs/flower.log): the ServerApp's own log lines
# (fedhubert's format, whose timestamp the console adds again, so it is cut), and Flower's INFO/WARNING/ERROR lines
# other than start-up notices that say nothing about this run. Not Ray's worker chatter or HTTP traces.
_OURS = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR)\s+(.*)$")
_FLOWER = re.compile(r"^(INFO|WARNING|ERROR)\s*:\s+(\S.*)$")
_QUIET = re.compile(
    r"default simulated SuperNodes changed|To change federation size|flwr federation simulation-config|"
    r"Starting logstream|Successfully installed|Using SuperLink"
)


class FederationError(FedhubertError):
    """The Flower run could not start or did not complete."""


def _app_dir(flwr_home: Path, keys: list[str]) -> Path:
    app = flwr_home / "app"
    version = re.sub(r"[^0-9.]", "", __version__.split("+")[0]) or "0.0.0"
    config = "\n".join(f'{key} = ""' for key in keys)
    atomic_write_text(
        app / "pyproject.toml",
        f'''[build-system]
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
serverapp = "fedhubert.app:serverapp"
clientapp = "fedhubert.app:clientapp"

[tool.flwr.app.config]
{config}
''',
    )
    return app


def _start_simulation_superlink(flwr_home: Path, log_dir: Path) -> tuple[Daemon, int]:
    port = free_port()
    try:
        return start_superlink(flwr_home, log_dir / "superlink.log", port=port, simulation=True), port
    except DeploymentError as error:
        raise FederationError(f"the simulation SuperLink did not start: {error}") from None


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
        result = subprocess.run(
            [flower_bin("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
            env=flower_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=60,
        )
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


def run_training_stage(
    stage: str,
    cfg: RoundsConfig,
    out: Path,
    run: StageRun,
    *,
    num_clients: int,
    checkpoint_kind: str,
    gpu_bytes: Callable[[], int],
    plot: Callable[[dict], None],
) -> dict:
    """The command's side of a federated training stage (pretrain, distill) once its inputs are read: the privacy
    settings and every client's overrides checked before Flower starts, the simulation's resources (`gpu_bytes`:
    one client's estimate), the Flower run, the plot, the run record's summary, and StageStopped when the run
    ended early."""
    check_settings(cfg.privacy, num_clients, cfg.strategy.sample_size(num_clients))
    client_configs(cfg, num_clients)  # a bad client_configs file fails here, not inside a round
    resources = (
        simulation_resources(cfg.federation, num_clients, gpu_bytes()) if cfg.federation.superlink is None else None
    )
    summary = run_training_task(
        stage,
        out,
        num_clients,
        cfg.federation,
        resources,
        checkpoint_kind=checkpoint_kind,
        resume=run.resume,
        force=run.force,
    )
    plot(summary)
    run.summary.update(summary)
    check_stopped(stage, summary, out)
    return summary


def run_training_task(
    task: str,
    out: Path,
    num_clients: int,
    federation: FederationConfig,
    resources: SimulationResources | None,
    *,
    checkpoint_kind: str,
    resume: bool,
    force: bool = False,
) -> dict:
    """Run a round-based training task (pretrain, distill) of the ServerApp on the stage's saved config and return
    the summary it wrote, with the Flower run id. SIGTERM ends it after a round (see `run_flower_app`). `resume`
    with no readable checkpoint (of `checkpoint_kind`) is an error, unless `force`: then the run starts over in the
    same folder."""
    out = Path(out)
    if resume and newest_checkpoint(out, checkpoint_kind) is None:
        if not force:
            raise ConfigError(
                f"--resume {out}: no readable checkpoint in {out / CHECKPOINTS} to continue from. Start "
                f"the run again without --resume, or add --force to start over in this folder"
            )
        log.warning("--resume --force: no readable checkpoint in %s; starting over at round 1", out / CHECKPOINTS)
        resume = False
    run_id = run_flower_app(
        {
            "task": task,
            "config": str(out / CONFIG_FILE),
            "out": str(out),
            "resume": resume,
            "threads": resources.cpus_per_client if resources else 0,
        },
        out,
        num_clients,
        federation,
        resources,
        stop_file=out / STOP_FILE,
        written=summary_path(out, task),
    )
    summary = json.loads(summary_path(out, task).read_text())
    summary["flower_run_id"] = run_id
    return summary


def check_stopped(stage: str, summary: dict, out: Path) -> None:
    """StageStopped when the run ended early (at request, or at its privacy budget), saying what to do next."""
    if summary["stopped_after_round"] is None:
        return
    if summary.get("stopped_because") == "privacy budget":
        privacy = summary["privacy"]
        raise StageStopped(
            f"{stage} stopped after round {summary['stopped_after_round']} of {summary['rounds']}: one more round "
            f"would take epsilon above privacy.target_epsilon={privacy['target_epsilon']:g} (spent "
            f"{privacy['epsilon']:.3f} at delta {privacy['delta']:g}). The state is checkpointed in {out}; the "
            "latest checkpoint is the model of this privacy budget"
        )
    raise StageStopped(
        f"{stage} stopped after round {summary['stopped_after_round']} of {summary['rounds']}, at "
        f"request; its state is checkpointed. Continue with: fedhubert {stage} --resume {out}"
    )


def run_flower_app(
    run_config: dict[str, object],
    out_dir: Path,
    num_clients: int,
    federation: FederationConfig,
    resources: SimulationResources | None = None,
    stop_file: Path | None = None,
    managed: bool = True,
    written: Path | None = None,
) -> str:
    """Run fedhubert's Flower app with `run_config` (flat scalars); returns the run id once it has completed.
    `resources` (for a simulation) defaults to the machine's cores shared out over the clients. The Flower app is
    `federation.app` (the repository root works too) or else a minimal one made in the run's FLWR_HOME. `managed`
    adds `managed=true` to the run config (this command keeps the records); another app (apps/secagg) may not
    declare that key.

    SIGTERM or Ctrl-C: with `stop_file` (a task that checkpoints per round), the first one writes that file, which
    the ServerApp reads after the current round to save its state and end; a second one, or the first without
    `stop_file`, ends the run at once.

    `written`: the file the ServerApp writes once it has done its work (the stage's summary). When `flwr run` ends
    with it written during this run, the run completed and its status is not asked of the SuperLink (`flwr ls`, a
    process start of 2-3 s); otherwise it is, for Flower's reason."""
    started = time.time()
    out_dir = Path(out_dir).resolve()
    if managed:
        run_config = {**run_config, "managed": True}  # this command keeps the run's records (fedhubert.fl.tasks)
    flwr_home = out_dir / "flwr"
    log_dir = out_dir / "logs"
    app = Path(federation.app).resolve() if federation.app else _app_dir(flwr_home, sorted(run_config))
    superlink = None
    reaper = Reaper(flwr_home)
    try:
        if federation.superlink is None:
            resources = resources or simulation_resources(federation, num_clients)
            nodes = supernodes(federation, num_clients, resources)
            superlink, port = _start_simulation_superlink(flwr_home, log_dir)
            write_connection(flwr_home, f"127.0.0.1:{port}", None)
            log.info(
                "Flower simulation SuperLink on 127.0.0.1:%d: %d clients served by %d SuperNode(s)%s, %d training at "
                "once with %d CPU(s) and %.2f GPU each",
                port,
                num_clients,
                nodes,
                "" if federation.virtual() else " (one per client: federation.virtual_clients=false)",
                resources.workers,
                resources.cpus_per_client,
                resources.gpus_per_client,
            )
        else:
            write_connection(flwr_home, federation.superlink, federation.root_certificates)
            log.info(
                "Flower deployment: SuperLink %s, %d clients%s",
                federation.superlink,
                num_clients,
                ", served by whichever SuperNodes connect (federation.virtual_clients=true: shared storage)"
                if federation.virtual()
                else ", one SuperNode per partition-id",
            )
        command = [flower_bin("flwr"), "run", str(app), CONNECTION, "--stream"]
        for key, value in run_config.items():
            command += ["--run-config", f"{key}={_toml_value(value)}"]
        if federation.superlink is None:
            command += ["--federation-config", resources.federation_config(nodes)]
        if stop_file is not None:
            Path(stop_file).unlink(missing_ok=True)  # a request left over from an earlier run of this folder
        done = None if written is None else lambda: written.is_file() and written.stat().st_mtime >= started
        return _follow(command, flwr_home, log_dir / "flower.log", federation.timeout_s, stop_file, done)
    finally:
        if superlink is not None:
            superlink.stop()
        reaper.close()
        if stop_file is not None:
            Path(stop_file).unlink(missing_ok=True)


class _Signals:
    """SIGTERM / SIGINT while a run is followed: the first asks for a stop after the round (when the task can),
    any other ends the run now."""

    def __init__(self, process: subprocess.Popen, stop_file: Path | None):
        self.process, self.stop_file = process, stop_file
        self.requested: str | None = None
        self.aborted: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_file is not None and self.requested is None:
            self.requested = name
            atomic_write_text(self.stop_file, f"{name} received\n")
            log.warning(
                "%s: the run stops after the current round, with a checkpoint (send it again to abort now)", name
            )
            return
        self.aborted = name
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _show(line: str) -> None:
    """Pass a line of the Flower stream on to the console at its own level, with one timestamp (ours)."""
    if _QUIET.search(line):
        return
    if match := _OURS.match(line):
        log.log(logging.getLevelName(match[1]), "server: %s", match[2])
    elif match := _FLOWER.match(line):
        log.log(logging.getLevelName(match[1]), "flower: %s", match[2])
    elif line.startswith("Successfully started run"):
        log.info("flower: %s", line)


def _follow(
    command: list[str],
    flwr_home: Path,
    log_path: Path,
    timeout_s: float,
    stop_file: Path | None,
    done: Callable[[], bool] | None = None,
) -> str:
    run_id = None
    tail: list[str] = []
    process = subprocess.Popen(
        command,
        env=flower_env(flwr_home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        start_new_session=True,
        preexec_fn=end_with_parent,
    )
    timer = threading.Timer(timeout_s, lambda: os.killpg(process.pid, signal.SIGKILL))
    timer.start()
    try:
        with _Signals(process, stop_file) as signals, open(log_path, "a", encoding="utf-8") as sink:
            assert process.stdout is not None
            for raw in process.stdout:
                line = _ANSI.sub("", raw.rstrip("\n"))
                sink.write(line + "\n")
                sink.flush()
                tail = (tail + [line])[-40:]
                match = _RUN_ID.search(line)
                if match:
                    run_id = match[1]
                _show(line)
            process.wait()
    finally:
        timer.cancel()
    if signals.aborted or process.returncode == -signal.SIGKILL:
        if run_id is not None:  # on a SuperLink the run goes on without its viewer: stop it there
            subprocess.run(
                [flower_bin("flwr"), "stop", run_id, CONNECTION],
                env=flower_env(flwr_home),
                capture_output=True,
                timeout=60,
            )
    if signals.aborted:
        raise FederationError(
            f"the Flower run was aborted ({signals.aborted}); its last checkpoint is in the run "
            f"folder (continue with --resume where the stage has it); see {log_path}"
        )
    if process.returncode == -signal.SIGKILL:
        raise FederationError(f"the Flower run did not finish within {timeout_s:.0f} s; see {log_path}")
    if run_id is None:
        raise FederationError(
            f"the Flower run did not start (flwr exited {process.returncode}); see {log_path}:\n  " + "\n  ".join(tail)
        )
    if process.returncode == 0 and done is not None and done():
        return run_id
    status, details = _run_status(flwr_home, run_id)
    if status != "finished:completed":
        raise FederationError(
            f"Flower run {run_id} ended '{status}' ({details or 'no details'}); see {log_path}. Last lines:\n  "
            + "\n  ".join(tail[-15:])
        )
    return run_id
