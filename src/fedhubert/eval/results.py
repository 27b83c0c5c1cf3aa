"""The run-level results table: one JSON line per evaluation (`results.jsonl`) and its Markdown view (`results.md`).

Evaluations of a run (pretrained, random-init, distilled, fbank...) write their rows into the same table so they
compare side by side. Re-running an evaluation into the same output folder replaces its row rather than adding one.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedhubert.atomic import atomic_write_text

COLUMNS = ("evaluation", "upstream", "checkpoint", "steps", "dev acc (step)", "test acc")


def read_results(table: Path) -> list[dict]:
    """The rows of a results table; a line that is not JSON is an error naming the file and line."""
    table = Path(table)
    if not table.is_file():
        return []
    rows = []
    for number, line in enumerate(table.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{table}:{number} is not a JSON line ({error}); fix or delete that line") from None
    return rows


def append_result(table: Path, result: dict) -> list[dict]:
    """Add `result` to the table (replacing an earlier row from the same output folder); rewrite its .md view."""
    table = Path(table)
    rows = [r for r in read_results(table) if r.get("out") != result.get("out")] + [result]
    table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(table.with_suffix(".md"), "# Speech Commands (SUPERB KS) results\n\n" + result_markdown(rows))
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def result_markdown(results: list[dict]) -> str:
    """A Markdown table of evaluations: name, S3PRL upstream, checkpoint hash, steps, dev-best and test accuracy."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        sha = r.get("checkpoint_sha256")
        checkpoint = f"`{sha[:12]}`" + (" (random init)" if r.get("random_init") else "") if sha else "-"
        best = r.get("dev_best") or {}
        dev = f"{_percent(best.get('acc'))} ({best['step']})" if best else "-"
        lines.append(f"| {r['name']} | {r['upstream']} | {checkpoint} | {r['steps']} | {dev} | "
                     f"{_percent(r.get('test_acc'))} |")
    return "\n".join(lines) + "\n"
