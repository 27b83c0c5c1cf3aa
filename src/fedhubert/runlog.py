"""One logging setup for every stage, progress bars, and the record of how a stage's outputs were made.

`stage_run(...)` wraps a stage: it prepares the output folder (refusing to overwrite results unless forced),
logs to the console and to `<out>/logs/<stage>.log`, writes the resolved config to `<out>/config.yaml`, and
keeps `<out>/run.json` (command, versions, git commit, timings, status and the stage's summary) up to date.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fedhubert import __version__
from fedhubert.atomic import atomic_write_text
from fedhubert.config import config_to_dict, save_config
from fedhubert.errors import OutputExistsError, StageStopped

log = logging.getLogger("fedhubert")
T = TypeVar("T")

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LOG_DIR = "logs"

_RECORDED_PACKAGES = ("torch", "torchaudio", "flwr", "s3prl", "numpy", "scikit-learn", "soundfile")


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Readable console lines on stderr, and full lines in `log_file` when given. Safe to call again."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_fedhubert", False):
            root.removeHandler(handler)
            handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    console._fedhubert = True  # type: ignore[attr-defined]
    console.setLevel(level)
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s %(processName)s: %(message)s")
        )
        file_handler._fedhubert = True  # type: ignore[attr-defined]
        file_handler.setLevel(level)
        root.addHandler(file_handler)
    root.setLevel(level)
    flower = logging.getLogger("flwr")
    if flower.handlers:  # Flower prints its own lines; passing them on to ours would print them twice
        flower.propagate = False
    for noisy in ("matplotlib", "numba", "PIL", "urllib3", "httpx", "httpcore", "s3prl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it") -> Iterator[T]:
    """A progress bar on terminals; on batch jobs (no terminal) a line every 30 s instead of a flood."""
    interactive = sys.stderr.isatty()
    return iter(
        tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            mininterval=0.5 if interactive else 30.0,
            dynamic_ncols=interactive,
            disable=os.environ.get("FEDHUBERT_PROGRESS", "1") == "0",
        )
    )


def clock(seconds: float) -> str:
    """12:05 or 1:02:05."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RoundClock:
    """Elapsed time and an estimate of the time left for a loop of rounds that may start part-way (a resumed run):
    the estimate is the mean time of the rounds run so far in this process times the rounds still to run."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.start = time.monotonic()

    def status(self, done: int, *, bound: bool = False) -> str:
        """`done`: the round just completed; `bound`: the last round is an upper bound (a loop that may converge
        before it), said as "at most"."""
        elapsed = time.monotonic() - self.start
        ran = done - self.first + 1
        left = elapsed / ran * (self.last - done) if ran > 0 else 0.0
        return f"{clock(elapsed)} elapsed, {'at most ' if bound else ''}{clock(left)} left"


def _git_state() -> dict[str, Any]:
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return {"git_commit": commit, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def environment_record() -> dict[str, Any]:
    packages = {}
    for name in _RECORDED_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "fedhubert_version": __version__,
        **_git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "packages": packages,
    }


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).astimezone().isoformat(timespec="seconds")


def _previous_run_failed(out_dir: Path, stage: str) -> bool:
    try:
        record = json.loads((out_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("stage") == stage and record.get("status") == "failed"


def prepare_output_dir(out_dir: Path, *, stage: str, force: bool, owned: Sequence[str]) -> None:
    """Create `out_dir`. If it already has content, refuse unless `force` or the last run of this stage there
    failed; then remove only the entries this stage writes (`owned`: names or glob patterns), nothing else."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force and _previous_run_failed(out_dir, stage):
            log.info("the previous %s run in %s failed; replacing its partial outputs", stage, out_dir)
            force = True
        if not force:
            raise OutputExistsError(
                f"output folder {out_dir} is not empty; choose another --out, or pass --force to replace "
                f"this stage's outputs there"
            )
        for pattern in (*owned, CONFIG_FILE, RUN_FILE, LOG_DIR):
            for target in out_dir.glob(pattern):
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


class StageRun:
    """Handle given to a stage inside `stage_run`: put results into `summary`; they land in run.json.
    `resume` says the stage continues an earlier run in the same folder."""

    def __init__(
        self, stage: str, out_dir: Path, config: Any, resume: bool = False, command: Sequence[str] | None = None
    ):
        self.stage = stage
        self.out_dir = out_dir
        self.config = config
        self.resume = resume
        self.force = False  # --force was given (with resume: start over when there is nothing to resume from)
        self.summary: dict[str, Any] = {}
        self.record: dict[str, Any] = {
            "stage": stage,
            "status": "running",
            "command": list(command) if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]],
            "cwd": str(Path.cwd()),
            "out_dir": str(out_dir),
            "resumed": resume,
            "started": _now(),
            **environment_record(),
            "config": config_to_dict(config),
        }

    def write(self) -> None:
        self.record["summary"] = self.summary
        atomic_write_text(self.out_dir / RUN_FILE, json.dumps(self.record, indent=2, default=str) + "\n")


@contextlib.contextmanager
def stage_run(
    stage: str,
    out_dir: Path,
    config: Any,
    *,
    force: bool = False,
    owned: Sequence[str] = (),
    resume: bool = False,
    command: Sequence[str] | None = None,
) -> Iterator[StageRun]:
    """With `resume`, the folder's earlier outputs stay (the stage continues them); the log is appended to."""
    out_dir = Path(out_dir)
    if not resume:
        prepare_output_dir(out_dir, stage=stage, force=force, owned=owned)
    setup_logging(out_dir / LOG_DIR / f"{stage}.log")
    run = StageRun(stage, out_dir, config, resume, command)
    run.force = force
    save_config(config, out_dir / CONFIG_FILE)
    run.write()
    log.info("%s: writing to %s (fedhubert %s)", stage, out_dir, __version__)
    start = time.monotonic()
    try:
        with logging_redirect_tqdm():
            yield run
    except StageStopped as err:
        run.record.update(status="stopped", error=str(err))
        raise
    except BaseException as err:
        run.record.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    else:
        run.record["status"] = "completed"
    finally:
        run.record.update(finished=_now(), elapsed_s=round(time.monotonic() - start, 3))
        run.write()
    log.info("%s: done in %.1f s; outputs in %s", stage, run.record["elapsed_s"], out_dir)
