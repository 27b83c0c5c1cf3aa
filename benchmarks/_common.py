"""Shared by the benchmarks: the machine record, the results file and a readable table."""

from __future__ import annotations

import json
import os
import platform
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
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "platform": platform.platform(),
            "python": env["python"], "packages": env["packages"], "git_commit": env["git_commit"]}


def write_results(name: str, figures: list[dict], notes: str = "") -> Path:
    """figures: [{figure, ours, unit, reference?, target?, met?}]; writes results/<name>.json and prints a table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "figures": figures,
              "notes": notes}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{name}: results in {path}")
    print(f"| {'figure':<40} | {'ours':>12} | {'unit':<8} | {'target':<12} | met |")
    print(f"|{'-' * 42}|{'-' * 14}|{'-' * 10}|{'-' * 14}|-----|")
    for f in figures:
        met = {True: "yes", False: "NO", None: ""}[f.get("met")]
        print(f"| {f['figure']:<40} | {f['ours']:>12} | {f['unit']:<8} | {str(f.get('target', '')):<12} | {met:<3} |")
    return path
