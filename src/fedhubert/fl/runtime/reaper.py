"""A watchdog that ends a run's Flower processes once the stage's command is gone, even killed by SIGKILL.

The SuperLink that a stage starts runs SuperExec, which runs the simulation (the ServerApp and Ray's workers), each
in a session of its own. The kernel's parent-death signal reaches the SuperLink only (see `deploy.end_with_parent`),
and the simulation outlives it, going on writing into the run folder. So the stage also starts this watchdog: it
waits on a pipe whose other end only the stage holds, and at end of file (the stage has ended, however it ended)
it ends every process whose environment has this run's FLWR_HOME and that started while the stage ran (a run
resumed at once in the same folder is left alone). Linux only (it reads /proc); elsewhere it finds nothing to end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_processes(flwr_home: Path, started: tuple[int, int] | None = None) -> list[int]:
    """Pids of the live processes started with FLWR_HOME=`flwr_home` (the run's Flower processes), optionally
    only those whose start time (clock ticks since boot) is within `started`."""
    marker = b"\0FLWR_HOME=" + os.fsencode(str(flwr_home)) + b"\0"
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
            state, begun = _state_and_start(int(entry.name))
        except (OSError, IndexError, ValueError):  # gone, or not ours
            continue
        if (
            marker in b"\0" + environ
            and int(entry.name) != os.getpid()
            and state not in "ZX"
            and (started is None or started[0] <= begun <= started[1])
        ):
            found.append(int(entry.name))
    return found


def _state_and_start(pid: int) -> tuple[str, int]:
    """A process's state letter and start time (clock ticks since boot), from /proc/<pid>/stat."""
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(") ", 1)[1].split()
    return fields[0], int(fields[19])


def _now_ticks() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")) + 1


def end_processes(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return _state_and_start(pid)[0] not in "ZX"
    except (OSError, IndexError, ValueError):
        return False


class Reaper:
    """Start the watchdog for `flwr_home`; `close()` (at the stage's normal end) lets it sweep and exit now."""

    def __init__(self, flwr_home: Path):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedhubert.fl.runtime.reaper", str(Path(flwr_home).resolve())],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def close(self, timeout_s: float = 60.0) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()


def main() -> None:
    home = Path(sys.argv[1])
    if not Path("/proc/self/stat").is_file():  # not Linux: nothing to find
        return
    began = _state_and_start(os.getpid())[1]
    sys.stdin.buffer.read()  # returns at end of file: the stage has closed its end or is gone
    ended = _now_ticks()
    for _ in range(3):  # processes may still be starting others while the first are ended
        pids = run_processes(home, (began, ended))
        if not pids:
            break
        end_processes(pids)


if __name__ == "__main__":
    main()
