"""The run-level results table: one JSON line per evaluation (`results.jsonl`) and its Markdown view (`results.md`).

Evaluations of a run (pretrained, random-init, distilled, fbank...) write their rows into the same table so they
compare side by side. Re-running an evaluation into the same output folder replaces its row rather than adding one.
Each accuracy comes with its 95% Wilson interval over the clips it was measured on: with a few hundred test clips
an accuracy is uncertain by several points, and two rows whose intervals overlap are not shown to differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedhubert.atomic import atomic_write_text
from fedhubert.eval.confidence import accuracy_interval

COLUMNS = (
    "evaluation",
    "upstream",
    "checkpoint",
    "steps",
    "dev acc (step)",
    "dev 95% CI",
    "test acc",
    "test 95% CI",
    "clips dev / test",
)
INTERVAL_NOTE = (
    "95% CI: Wilson score interval over the clips scored. The dev set is S3PRL's class-balanced draw "
    "(with replacement) of its dev clips and background-noise files, so its interval is approximate."
)


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


def dev_items(data: dict) -> int | None:
    """How many draws S3PRL's dev accuracy averages over: the dev clips and the background-noise files it adds to
    them as _silence_ (`noise_files`; results written before it was recorded count the dev clips only)."""
    return data["dev_clips"] + data.get("noise_files", 0) if data.get("dev_clips") else None


def ci95(accuracy: float | None, items: int | None) -> list[float] | None:
    """The 95% interval of an accuracy measured on `items` clips; None when either is unknown."""
    if accuracy is None or not items:
        return None
    return [round(bound, 4) for bound in accuracy_interval(accuracy, items)]


def intervals(result: dict) -> dict:
    """`dev_ci95` and `test_ci95` of an evaluation: as recorded, or (in results written before they were) from its
    accuracies and clip counts."""
    data = result.get("data") or {}
    return {
        "dev_ci95": result.get("dev_ci95") or ci95((result.get("dev_best") or {}).get("acc"), dev_items(data)),
        "test_ci95": result.get("test_ci95") or ci95(result.get("test_acc"), data.get("test_clips")),
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def interval_text(interval: list[float] | None) -> str:
    return "-" if interval is None else f"{100 * interval[0]:.1f}-{100 * interval[1]:.1f}%"


def result_markdown(results: list[dict]) -> str:
    """A Markdown table of evaluations: name, S3PRL upstream, checkpoint hash, steps, dev-best and test accuracy
    with their 95% intervals, and the number of clips each was measured on."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        sha = r.get("checkpoint_sha256")
        checkpoint = f"`{sha[:12]}`" + (" (random init)" if r.get("random_init") else "") if sha else "-"
        best = r.get("dev_best") or {}
        dev = f"{_percent(best.get('acc'))} ({best['step']})" if best else "-"
        ci = intervals(r)
        data = r.get("data") or {}
        clips = f"{dev_items(data) or '-'} / {data.get('test_clips', '-')}"
        lines.append(
            f"| {r['name']} | {r['upstream']} | {checkpoint} | {r['steps']} | {dev} | "
            f"{interval_text(ci['dev_ci95'])} | {_percent(r.get('test_acc'))} | "
            f"{interval_text(ci['test_ci95'])} | {clips} |"
        )
    return "\n".join(lines) + "\n\n" + INTERVAL_NOTE + "\n"
