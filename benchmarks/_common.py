"""Shared by the benchmarks: the machine record, the results file and a readable table."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from fedhubert.runlog import environment_record

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    env = environment_record()
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": env["python"],
        "packages": env["packages"],
        "git_commit": env["git_commit"],
    }


def run_cli(*args: object) -> None:
    """Run a fedhubert command (making a benchmark's inputs); a failure ends the benchmark."""
    from fedhubert.cli import main

    if main([str(a) for a in args]):
        sys.exit(1)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file that parse (a line cut short by a stopped run is skipped); none if it is
    missing."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def write_results(
    name: str, figures: list[dict], notes: str = "", extra: dict | None = None, path: Path | None = None
) -> Path:
    """figures: [{figure, ours, unit, reference?, target?, met?}]; writes results/<name>.json (with `extra`'s
    keys) and prints a table. `path` writes the record there instead (a check run's), and RESULTS.md is then
    regenerated only if that is in results/."""
    path = Path(path) if path is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "figures": figures,
        "notes": notes,
        **(extra or {}),
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    if path.resolve().parent == RESULTS.resolve():
        write_results_md()
    print(f"\n{name}: results in {path}")
    print(f"| {'figure':<40} | {'ours':>12} | {'unit':<8} | {'target':<12} | met |")
    print(f"|{'-' * 42}|{'-' * 14}|{'-' * 10}|{'-' * 14}|-----|")
    for f in figures:
        met = {True: "yes", False: "NO", None: ""}[f.get("met")]
        print(f"| {f['figure']:<40} | {f['ours']:>12} | {f['unit']:<8} | {str(f.get('target', '')):<12} | {met:<3} |")
    return path


def _machine_line(machine: dict) -> str:
    return f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB"


def write_results_md() -> Path:
    """benchmarks/RESULTS.md: every figure of every results file in one table, with the machine it came from."""
    rows = [
        "# Benchmark results",
        "",
        "Made by `make bench` from `benchmarks/results/*.json` (do not edit). Ratios are measured side by side in "
        "one run; absolute figures hold for the machine named.",
        "",
        "| benchmark | figure | ours | unit | reference | target | met | machine | date |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        machine = _machine_line(record["machine"])
        for f in record["figures"]:
            met = {True: "yes", False: "**no**", None: ""}[f.get("met")]
            rows.append(
                f"| {record['benchmark']} | {f['figure']} | {f['ours']} | {f['unit']} | "
                f"{f.get('reference', '')} | {f.get('target', '')} | {met} | {machine} | {record['date']} |"
            )
        if record.get("notes"):
            notes.append(f"- **{record['benchmark']}**: {record['notes']}")
    if notes:
        rows += ["", "## Notes", "", *notes]
    out = RESULTS.parent / "RESULTS.md"
    out.write_text("\n".join(rows) + "\n")
    return out
