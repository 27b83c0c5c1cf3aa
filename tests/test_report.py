"""`fedhubert report RUN_DIR`: the Markdown report and its plots, rebuilt from a finished run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(small_librispeech, small_partition, small_kmeans, tiny_teacher, four_rounds, distilled, evaluations,
            tmp_path_factory) -> Path:
    """A run folder laid out as the demo lays it out, its stage folders linked from the session's real runs."""
    run = tmp_path_factory.mktemp("report") / "run"
    run.mkdir()
    for name, folder in (("LibriSpeech", small_librispeech), ("partition", small_partition),
                         ("kmeans", small_kmeans), ("central", tiny_teacher.parent.parent),
                         ("pretrain", four_rounds), ("distill", distilled), ("eval", evaluations)):
        (run / name).symlink_to(folder, target_is_directory=True)
    return run


def test_the_report_covers_every_stage_with_its_numbers_and_plots(run_dir, four_rounds, evaluations, capsys):
    assert run_cli("report", run_dir) == 0
    assert f"report: {run_dir / 'report.md'}" in capsys.readouterr().out
    report = (run_dir / "report.md").read_text()
    stages = [line.split("|")[1].strip() for line in report.split("## Stages")[1].split("\n## ")[0].splitlines()
              if line.startswith("| ") and not line.startswith("| stage")]
    assert stages == ["synth-librispeech", "partition", "kmeans", "train-local", "pretrain", "distill",
                      "evaluate-speech-commands", "evaluate-speech-commands"]
    for heading in ("## Data", "## Targets (k-means)", "## Centralized training (`central`)",
                    "## Federated pretraining (`pretrain`)", "## Federated distillation (`distill`)",
                    "## Speech Commands (SUPERB keyword spotting, S3PRL)", "## Provenance"):
        assert heading in report
    # The federated numbers are the run's own: first and last server evaluation from metrics.jsonl.
    evals = [json.loads(line) for line in (four_rounds / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert (f"loss {evals[0]['loss']:.3f} (round 0) -> {evals[-1]['loss']:.3f} (round 4)") in report
    for name in ("teacher", "student"):
        result = json.loads((evaluations / name / "result.json").read_text())
        assert f"| {name} | {result['upstream']} |" in report
        assert f"{100 * result['test_acc']:.2f}% |" in report
    figures = sorted(p.name for p in (run_dir / "report").glob("*.png"))
    assert figures == ["clients.png", "distill_distill.png", "kmeans_kmeans.png", "pretrain_pretrain.png",
                       "speech_commands.png", "train_local_central.png"]
    for figure in figures:
        assert f"(report/{figure})" in report
        assert (run_dir / "report" / figure).stat().st_size > 5000
    assert "fedhubert evaluate speech-commands --dataset" in report, "each stage's command is recorded"


def test_the_report_is_rebuilt_the_same_from_the_same_files(run_dir):
    assert run_cli("report", run_dir) == 0
    first = (run_dir / "report.md").read_text().split("\n", 3)[3]
    assert run_cli("report", run_dir) == 0
    assert (run_dir / "report.md").read_text().split("\n", 3)[3] == first


def test_a_folder_without_stage_runs_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli("report", tmp_path / "empty") == 2
    assert "holds no stage folders (run.json files up to three levels down)" in capsys.readouterr().err
    assert run_cli("report", tmp_path / "missing") == 2
    assert "is not a folder" in capsys.readouterr().err
