"""`fedhubert report RUN_DIR`: the Markdown report and its plots, rebuilt from a finished run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common import run_cli
from fedhubert.fl.round_log import round_panels, rounds_figure
from fedhubert.labels.run import inertia_gap_text, kmeans_figure
from fedhubert.report import _random_init_of, evaluations_caption, evaluations_figure
from fedhubert.train.learning import learning_check


@pytest.fixture(scope="module")
def run_dir(
    small_librispeech,
    small_partition,
    small_kmeans,
    tiny_teacher,
    four_rounds,
    distilled,
    evaluations,
    tmp_path_factory,
) -> Path:
    """A run folder laid out as the demo lays it out, its stage folders linked from the session's real runs."""
    run = tmp_path_factory.mktemp("report") / "run"
    run.mkdir()
    for name, folder in (
        ("LibriSpeech", small_librispeech),
        ("partition", small_partition),
        ("kmeans", small_kmeans),
        ("central", tiny_teacher.parent.parent),
        ("pretrain", four_rounds),
        ("distill", distilled),
        ("eval", evaluations),
    ):
        (run / name).symlink_to(folder, target_is_directory=True)
    return run


@pytest.mark.slow
def test_the_report_covers_every_stage_with_its_numbers_and_plots(run_dir, four_rounds, evaluations, capsys):
    assert run_cli("report", run_dir) == 0
    assert f"report: {run_dir / 'report.md'}" in capsys.readouterr().out
    report = (run_dir / "report.md").read_text()
    stages = [
        line.split("|")[1].strip()
        for line in report.split("## Stages")[1].split("\n## ")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| stage")
    ]
    assert stages == [
        "synth-librispeech",
        "partition",
        "kmeans",
        "train-local",
        "pretrain",
        "distill",
        "evaluate-speech-commands",
        "evaluate-speech-commands",
    ]
    for heading in (
        "## Data",
        "## Targets (k-means)",
        "## Centralized training (`central`)",
        "## Federated pretraining (`pretrain`)",
        "## Federated distillation (`distill`)",
        "## Speech Commands (SUPERB keyword spotting, S3PRL)",
        "## Provenance",
    ):
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
    assert figures == [
        "clients.png",
        "distill_distill.png",
        "kmeans_kmeans.png",
        "pretrain_pretrain.png",
        "speech_commands.png",
        "train_local_central.png",
    ]
    for figure in figures:
        assert f"(report/{figure})" in report
        assert (run_dir / "report" / figure).stat().st_size > 5000
    assert "fedhubert evaluate speech-commands --dataset" in report, "each stage's command is recorded"


@pytest.mark.slow
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


# ------------------------------------------------------------------------ interpretation, from hand-made stage files
def write_stage(
    folder: Path, stage: str, summary: dict | None = None, config: dict | None = None, **files: dict | list[dict]
) -> None:
    """A stage folder as the report reads it: run.json, and JSON files (a list is written as JSON lines)."""
    folder.mkdir(parents=True)
    record = {
        "stage": stage,
        "status": "completed",
        "summary": summary or {},
        "config": config or {},
        "command": ["fedhubert", stage],
        "started": "2025-01-01T00:00:00",
    }
    (folder / "run.json").write_text(json.dumps(record))
    for name, content in files.items():
        text = "".join(json.dumps(r) + "\n" for r in content) if isinstance(content, list) else json.dumps(content)
        (folder / name.replace("_json", ".json").replace("_jsonl", ".jsonl")).write_text(text)


def probe_model(name: str, architecture: str, mean: float, sd: float, random_init: bool = False) -> dict:
    return {
        "name": name,
        "architecture": architecture,
        "random_init": random_init,
        "accuracy_mean": mean,
        "accuracy_sd": sd,
    }


def s3prl_result(
    name: str, sha: str | None, test_acc: float, *, kind: str = "hubert", random_init: bool = False, **extra
) -> dict:
    return {
        "name": name,
        "upstream": "hubert_local" if sha else "fbank",
        "kind": kind if sha else "baseline",
        "checkpoint_sha256": sha,
        "random_init": random_init,
        "steps": 2000,
        "dev_best": {"step": 1000, "acc": test_acc},
        "test_acc": test_acc,
        "data": {"root": "/data/sc", "train_clips": 800, "dev_clips": 94, "test_clips": 120},
        **extra,
    }


def eval_rows(gain: float, clusters: int, acc: float, baseline: float, kind: str, at: str) -> list[dict]:
    return [
        {
            "kind": kind,
            at: i,
            "loss": 3.0 - i,
            "ce_masked": 3.0 - i,
            "gain_nats": gain * i,
            "predicted_clusters": clusters,
            "acc_masked": acc * i / 2,
            "baseline_acc_masked": baseline,
        }
        for i in (0, 2)
    ]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> str:
    """The report of a run whose stage files were written by hand: probes and S3PRL evaluations of pretrained
    models against random init (one pair within the error bars, one clearly apart), a pretraining run that
    collapsed onto one cluster, and a centralized run that learned."""
    run = tmp_path_factory.mktemp("interpreted")
    write_stage(
        run / "probe",
        "probe",
        probe_json={
            "folds": 5,
            "data": {"clips": 600, "words": 10, "speakers": 30, "chance": 0.1},
            "models": [
                probe_model("hubert-close", "hubert tiny", 0.42, 0.05),
                probe_model("random-close", "hubert tiny", 0.40, 0.04, random_init=True),
                probe_model("hubert-apart", "hubert small", 0.62, 0.03),
                probe_model("random-apart", "hubert small", 0.40, 0.04, random_init=True),
            ],
        },
    )
    write_stage(
        run / "eval" / "close",
        "evaluate-speech-commands",
        result_json=s3prl_result("teacher-close", "a" * 64, 0.50, test_ci95=[0.4119, 0.5881]),
    )
    write_stage(
        run / "eval" / "close-random",
        "evaluate-speech-commands",
        result_json=s3prl_result("random-close", "a" * 64, 0.45, random_init=True),
    )
    write_stage(
        run / "eval" / "apart", "evaluate-speech-commands", result_json=s3prl_result("teacher-apart", "b" * 64, 0.80)
    )
    write_stage(
        run / "eval" / "apart-random",
        "evaluate-speech-commands",
        result_json=s3prl_result("random-apart", "b" * 64, 0.40, random_init=True),
    )
    write_stage(run / "eval" / "fbank", "evaluate-speech-commands", result_json=s3prl_result("fbank", None, 0.30))
    collapsed = eval_rows(-0.1, 1, 0.2, 0.21, "eval", "round")
    write_stage(
        run / "pretrain",
        "pretrain",
        config={"strategy": {"name": "fedavg"}, "local_steps": 3},
        summary={
            "rounds": 2,
            "final_checkpoint": "/runs/pretrain/final.pt",
            "seconds": 12.0,
            "learning": learning_check([{"at": r["round"], **r} for r in collapsed], "the held-out speakers"),
        },
        metrics_jsonl=[{"kind": "train", "round": 2, "clients": 2, "train_loss": 4.0}, *collapsed],
    )
    learned = eval_rows(0.4, 17, 0.5, 0.12, "valid", "step")
    summary = {
        "parameters": 1000,
        "num_classes": 20,
        "steps": 2,
        "device": "cpu",
        "checkpoint": "/c/final.pt",
        "train": {"loss": 2.0, "acc_masked": 0.4},
        "valid_first": learned[0],
        "valid_last": learned[-1],
        "learning": learning_check([{"at": r["step"], **r} for r in learned], "the validation set"),
    }
    write_stage(
        run / "central",
        "train-local",
        summary=summary,
        metrics_jsonl=[{"kind": "train", "step": 2, "loss": 2.0, "acc_masked": 0.4}, *learned],
    )
    assert run_cli("report", run) == 0
    return (run / "report.md").read_text()


def warnings_in(report: str) -> str:
    return "\n".join(line for line in report.splitlines() if line.startswith("**Not better than random init**"))


def test_a_probe_within_the_error_bars_of_random_init_is_flagged_and_a_clear_gain_is_not(interpreted):
    probe = interpreted.split("## Linear probe")[1].split("\n## ")[0]
    assert (
        "**Not better than random init**: hubert-close (42.0 +- 5.0%) is within the error bars of random init "
        "of its architecture (random-close: 40.0 +- 4.0%)"
    ) in probe
    assert "| hubert-apart | 62.0 +- 3.0% | +22.0 points |" in probe
    assert "hubert-apart" not in warnings_in(interpreted)


def test_s3prl_intervals_are_shown_and_overlapping_pairs_are_flagged(interpreted):
    section = interpreted.split("## Speech Commands")[1].split("\n## ")[0]
    # 60 of 120 test clips: Wilson 95% interval (41.2%, 58.8%) by hand (p = 0.5, z^2/n = 0.032, half-width 0.088).
    assert "| teacher-close | hubert_local | `aaaaaaaaaaaa` | 2000 | 50.00% (1000) |" in section
    assert "| 50.00% | 41.2-58.8% | 94 / 120 |" in section
    # Results without recorded intervals get them from accuracy and clip counts: 96 of 120 -> (72.0%, 86.2%).
    assert "| 80.00% | 72.0-86.2% |" in section
    assert "95% CI: Wilson score interval" in section
    assert (
        "**Not better than random init**: teacher-close (test 50.0%, 95% CI 41.2-58.8%) is within the error "
        "bars of random init of its architecture (random-close: test 45.0%, 95% CI 36.4-53.9%)"
    ) in section
    flagged = warnings_in(interpreted)
    assert "teacher-apart" not in flagged and "fbank" not in flagged
    assert len(flagged.splitlines()) == 2, "one probe and one S3PRL pair"
    assert "(report/speech_commands.png)" in section


def test_masked_accuracies_stand_beside_the_most_frequent_cluster_and_collapse_is_named(interpreted):
    pretrain = interpreted.split("## Federated pretraining")[1].split("\n## ")[0]
    assert "masked accuracy 0.0% -> 20.0% (always predicting the most frequent cluster: 21.0%)" in pretrain
    assert "**Did not learn**: the model predicts only 1 distinct cluster(s) on the held-out speakers." in pretrain
    assert "Gain per round (nats): 0: -0.000, 2: -0.200." in pretrain
    central = interpreted.split("## Centralized training")[1].split("\n## ")[0]
    assert "masked accuracy 50.0% (always predicting the most frequent cluster: 12.0%)" in central
    assert "**Learned**" in central and "Did not learn" not in central


def test_a_random_init_is_paired_by_checkpoint_else_by_a_unique_kind():
    teacher = s3prl_result("teacher", "a" * 64, 0.5)
    same, other = (s3prl_result(n, sha, 0.4, random_init=True) for n, sha in (("same", "a" * 64), ("other", "c" * 64)))
    student = s3prl_result("student", "d" * 64, 0.5, kind="distiller")
    student_random = s3prl_result("student-random", "e" * 64, 0.4, kind="distiller", random_init=True)
    results = [teacher, same, other, student, student_random]
    assert _random_init_of(teacher, results) is same
    assert _random_init_of(student, results) is student_random
    assert _random_init_of(teacher, [teacher, other, student]) is other
    assert _random_init_of(teacher, [teacher, other, same | {"checkpoint_sha256": "f" * 64}]) is None, "ambiguous"
    assert _random_init_of(same, results) is None and _random_init_of(s3prl_result("fbank", None, 0.3), results) is None


# ------------------------------------------------------------------------------------- figures and their captions
def tick_values(ax) -> list[float]:
    """The x tick values of `ax` within its view, as drawn."""
    ax.figure.canvas.draw()
    low, high = sorted(ax.get_xlim())
    return [float(t) for t in ax.get_xticks() if low <= t <= high]


@pytest.mark.parametrize("rounds", [1, 2, 3, 7, 40])
def test_round_axes_tick_whole_rounds(rounds):
    rows = [{"kind": "train", "round": r, "clients": 2, "train_loss": 3.0 / r} for r in range(1, rounds + 1)]
    rows += [{"kind": "eval", "round": r, "loss": 3.0 / (r + 1), "gain_nats": 0.1 * r} for r in range(rounds + 1)]
    fig = rounds_figure(rows, "distill", acc_key=None)
    assert len(fig.axes) == 2 == len(round_panels(rows, acc_key=None))
    for ax in fig.axes:
        ticks = tick_values(ax)
        assert ticks and all(t == int(t) for t in ticks), ticks
    history = [{"round": r, "inertia": 10.0 - r} for r in range(1, rounds + 1)]
    ax_rounds = kmeans_figure({"history": history, "cluster_usage": [3, 1], "num_clusters": 2}).axes[0]
    ticks = tick_values(ax_rounds)
    assert ticks and all(t == int(t) for t in ticks), ticks


def test_speech_commands_figure_has_the_binomial_intervals_as_error_bars():
    recorded = s3prl_result("teacher", "a" * 64, 0.50, test_ci95=[0.4119, 0.5881])
    unknown = s3prl_result("fbank", None, 0.30) | {"data": {"root": "/data/sc"}}
    ax = evaluations_figure([recorded, unknown]).axes[0]
    dev, test = (c for c in ax.containers if hasattr(c, "errorbar"))
    (segments,) = test.errorbar.lines[2]
    low, high = segments.get_segments()[0][:, 1]
    assert (round(low, 2), round(high, 2)) == (41.19, 58.81)
    low, high = segments.get_segments()[1][:, 1]
    assert low == high == 30.0, "no interval without clip counts"
    assert "95% confidence intervals" in evaluations_caption([recorded])
    assert "error bars" not in evaluations_caption([unknown])


@pytest.fixture(scope="module")
def kmeans_and_distill(tmp_path_factory) -> str:
    """The report of a hand-made run: federated k-means 2.4% below the centralized inertia, per-client codebooks,
    and a distillation without a k-means head (loss and gain panels, no accuracy)."""
    run = tmp_path_factory.mktemp("captions")
    kmeans = {
        "mode": "federated",
        "num_clusters": 2,
        "label_rate": 50,
        "unused_clusters": 0,
        "features": {"dims": 39, "kind": "mfcc"},
        "rounds": 3,
        "inertia": 9.0,
        "history": [{"round": r, "inertia": 10.0 - r} for r in (1, 2, 3)],
        "cluster_usage": [3, 1],
        "reference": {"inertia": 10.0, "federated_inertia": 9.76, "relative_gap": -0.024, "frames": 100},
    }
    write_stage(run / "kmeans", "kmeans", kmeans_json=kmeans)
    clients = kmeans | {"mode": "per-client", "rounds": 0, "history": [], "reference": {}}
    clients["clients"] = [{"client": 0, "inertia": 9.0}, {"client": 1, "inertia": 8.0}]
    write_stage(run / "kmeans-clients", "kmeans", kmeans_json=clients)
    rows = [{"kind": "train", "round": r, "clients": 2, "train_loss": 3.0 / r} for r in (1, 2)]
    rows += [{"kind": "eval", "round": r, "loss": 3.0 - r, "gain_nats": 0.1 * r} for r in (0, 1, 2)]
    write_stage(
        run / "distill",
        "distill",
        config={"strategy": {"name": "fedavg"}, "local_steps": 3},
        summary={
            "rounds": 2,
            "final_checkpoint": "/runs/distill/final.pt",
            "student_parameters": 10,
            "teacher_parameters": 100,
        },
        metrics_jsonl=rows,
    )
    assert run_cli("report", run) == 0
    return (run / "report.md").read_text()


def test_captions_say_what_each_figure_shows(kmeans_and_distill):
    report = kmeans_and_distill
    assert "![distill per round: loss and gain over the label-frequency baseline](report/distill_distill.png)" in report
    assert "accuracy" not in report.split("## Federated distillation")[1]
    assert "![k-means: inertia per Lloyd round, and cluster usage](report/kmeans_kmeans.png)" in report
    assert (
        "![k-means: inertia of each client's codebook, and cluster usage](report/kmeans_kmeans-clients.png)" in report
    )


def test_the_federated_codebook_is_compared_in_plain_words(kmeans_and_distill):
    assert (
        "Centralized k-means on the pooled sample: inertia 10.00 per frame; federated codebook inertia 2.4% below "
        "(better than) the centralized codebook's."
    ) in kmeans_and_distill
    assert inertia_gap_text(0.031) == "federated codebook inertia 3.1% above (worse than) the centralized codebook's"
    assert "from it" not in kmeans_and_distill
