"""Reliability drills summary: runs tests/reliability (kills, SIGTERM, hostile clients, storage faults, hostile
inputs) and writes benchmarks/results/reliability.json: drills run, passed, failed, skipped, and the data lost
(files that a drill changed or removed although it must not; must be none). Exits 1 if a drill failed or lost data.

Usage: python benchmarks/reliability.py [extra pytest arguments]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import write_results

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        summary_path = Path(tmp) / "reliability.json"
        env = {**os.environ, "FEDHUBERT_RELIABILITY_JSON": str(summary_path)}
        pytest = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/reliability", "-q", "-p", "no:cacheprovider", *argv],
            cwd=REPO,
            env=env,
        )
        if not summary_path.is_file():
            print(f"the drills wrote no summary (pytest exited {pytest.returncode})", file=sys.stderr)
            return 1
        summary = json.loads(summary_path.read_text())
    figures = [
        {"figure": "drills run", "ours": summary["drills_run"], "unit": "drills"},
        {
            "figure": "drills passed",
            "ours": summary["passed"],
            "unit": "drills",
            "target": summary["drills_run"] - summary["skipped"],
            "met": summary["failed"] == 0,
        },
        {"figure": "drills skipped (environment)", "ours": summary["skipped"], "unit": "drills"},
        {
            "figure": "files lost",
            "ours": len(summary["data_lost"]),
            "unit": "files",
            "target": 0,
            "met": not summary["data_lost"],
        },
    ]
    notes = "; ".join(
        f"{d['drill']}: {d['outcome']}{' (' + d['reason'] + ')' if d.get('reason') else ''}"
        for d in summary["drills"]
        if d["outcome"] != "passed"
    )
    write_results("reliability", figures, notes or "every drill passed", extra=summary)
    return 0 if summary["failed"] == 0 and not summary["data_lost"] and pytest.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
