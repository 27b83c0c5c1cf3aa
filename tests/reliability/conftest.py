"""The reliability drills: each test is a drill. `intact(*paths)` snapshots files (inputs, earlier checkpoints)
and checks after the drill that none changed or vanished; a change counts as data lost and fails the drill.

With FEDHUBERT_RELIABILITY_JSON=FILE (benchmarks/reliability.py sets it) the session writes a summary there:
drills run, passed, failed, skipped, and the data lost (must be none)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

SUMMARY_ENV = "FEDHUBERT_RELIABILITY_JSON"
_HERE = Path(__file__).resolve().parent
_results: dict[str, dict] = {}
_lost: list[dict] = []


def _digests(paths: tuple[Path, ...]) -> dict[str, str]:
    files = []
    for path in map(Path, paths):
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def intact(request):
    """Call with files or folders that the drill must leave as they were."""
    watched: list[dict[str, str]] = []

    def watch(*paths: Path) -> None:
        watched.append(_digests(tuple(paths)))

    yield watch
    for before in watched:
        now = _digests(tuple(Path(p) for p in before))
        changed = [p for p, digest in before.items() if now.get(p) != digest]
        for path in changed:
            _lost.append({"drill": request.node.nodeid, "file": path})
        assert not changed, f"data lost in the drill: {changed}"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not Path(report.fspath).resolve().is_relative_to(_HERE):
        return
    entry = _results.setdefault(report.nodeid, {"drill": report.nodeid, "outcome": "passed", "seconds": 0.0})
    entry["seconds"] = round(entry["seconds"] + report.duration, 2)
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        entry["reason"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get(SUMMARY_ENV)
    if not target or not _results:
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker saw only its share of the drills: no summary (-n 0 for one)
        return
    drills = sorted(_results.values(), key=lambda e: e["drill"])
    count = {k: sum(e["outcome"] == k for e in drills) for k in ("passed", "failed", "skipped")}
    record = {"drills_run": len(drills), **count, "data_lost": _lost, "drills": drills}
    Path(target).write_text(json.dumps(record, indent=2) + "\n")
