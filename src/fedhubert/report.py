"""`fedhubert report RUN_DIR`: one Markdown report of a run, rebuilt from the files its stages wrote.

A run folder holds stage folders (each with its run.json), at any depth up to three below RUN_DIR: the demo's
LibriSpeech/, partition/, kmeans/, pretrain/, distill/, eval/<name>/. The report reads only those files, so it can
be regenerated at any time; it writes `RUN_DIR/report.md` and its figures into `RUN_DIR/report/`.

It interprets as well as lists: masked accuracies stand beside the accuracy of always predicting the most frequent
cluster, Speech Commands accuracies carry their 95% intervals, and a pretrained model that does not beat the random
initialisation of its architecture (beyond the error bars) is said to in bold, as is a model that did not learn.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fedhubert.atomic import atomic_write_text
from fedhubert.errors import FedhubertError
from fedhubert.fl.round_log import plot_rounds, read_rows, round_panels
from fedhubert.runlog import RUN_FILE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

STAGE_ORDER = (
    "synth-librispeech",
    "synth-speech-commands",
    "partition",
    "kmeans",
    "train-local",
    "pretrain",
    "distill",
    "evaluate-speech-commands",
)
_SKIP_DIRS = {"checkpoints", "tensorboard", "logs", "flwr", "features", "s3prl", "report", "client_configs"}
FIGURES = "report"


class ReportError(FedhubertError):
    """The folder holds no stage runs to report on."""


@dataclass
class StageFolder:
    path: Path
    record: dict

    @property
    def stage(self) -> str:
        return self.record.get("stage", "?")

    @property
    def completed(self) -> bool:
        return self.record.get("status") == "completed"

    def json(self, name: str) -> dict | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None


def find_stages(run_dir: Path, depth: int = 3) -> list[StageFolder]:
    """Stage folders under `run_dir` (itself included), in pipeline order; unreadable run.json files are skipped
    with a warning."""
    found: list[StageFolder] = []
    for root, dirs, files in os.walk(run_dir, followlinks=True):
        level = len(Path(root).relative_to(run_dir).parts)
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and level < depth)
        if RUN_FILE in files:
            path = Path(root) / RUN_FILE
            try:
                found.append(StageFolder(Path(root), json.loads(path.read_text())))
            except (OSError, ValueError) as error:
                log.warning("skipping %s: not readable JSON (%s)", path, error)
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    return sorted(found, key=lambda s: (rank.get(s.stage, len(rank)), s.record.get("started", ""), str(s.path)))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


class Report:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(os.path.abspath(run_dir))  # not resolve(): stage folders may be symlinks
        self.figures = self.run_dir / FIGURES
        self.lines: list[str] = []

    def rel(self, path: Path | str, cwd: str | None = None) -> str:
        """`path` relative to the run folder (a relative path is taken from `cwd`, where its stage ran)."""
        path = Path(os.path.abspath(Path(cwd or ".") / path))
        try:
            return str(path.relative_to(self.run_dir)) or "."
        except ValueError:
            return str(path)

    def figure(self, name: str, caption: str) -> None:
        self.lines += [f"![{caption}]({FIGURES}/{name})", ""]

    def add(self, *lines: str) -> None:
        self.lines += [*lines, ""]


def _overview(report: Report, stages: list[StageFolder]) -> None:
    commits = sorted({s.record.get("git_commit") or "-" for s in stages})
    versions = sorted({s.record.get("fedhubert_version", "?") for s in stages})
    report.add("# fedhubert run report")
    report.add(
        f"Run folder: `{report.run_dir}`. Generated "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} by `fedhubert report` from the stages' "
        f"own files; fedhubert {', '.join(versions)}, git {', '.join(c[:10] for c in commits)}."
    )
    rows = ["| stage | folder | status | time | started |", "|---|---|---|---|---|"]
    for s in stages:
        status = s.record.get("status", "?")
        if status == "failed":
            status = f"**failed**: {s.record.get('error', '')[:120]}"
        rows.append(
            f"| {s.stage} | `{report.rel(s.path)}` | {status} | {_duration(s.record.get('elapsed_s'))} | "
            f"{s.record.get('started', '-')} |"
        )
    report.add("## Stages", *rows)


def _data(report: Report, stages: list[StageFolder]) -> None:
    lines = []
    for s in stages:
        summary = s.record.get("summary", {})
        if s.stage == "synth-librispeech" and s.completed:
            lines.append(
                f"- Synthetic LibriSpeech `{report.rel(s.path)}`: {summary['speakers']} speakers, "
                f"{summary['utterances']} utterances, {summary['hours']:.2f} h."
            )
        elif s.stage == "synth-speech-commands" and s.completed:
            split = summary["split_clips"]
            lines.append(
                f"- Synthetic Speech Commands `{report.rel(s.path)}`: {summary['words']} words; "
                f"{split['training']} training, {split['validation']} dev clips; {summary['test_clips']} "
                f"test clips."
            )
    partition = next((s for s in stages if s.stage == "partition" and s.completed), None)
    if partition:
        from fedhubert.partition.report import plot_clients, summary_table

        record = partition.json("partition.json")
        plot_clients(record, report.figures / "clients.png")
        table = summary_table(record).splitlines()
        lines += ["", f"Partition `{report.rel(partition.path)}`:", "", *table[2:]]
    if lines:
        report.add("## Data", *lines)
    if partition:
        report.figure("clients.png", "audio and sex mix per client")


def _kmeans(report: Report, stages: list[StageFolder]) -> None:
    for s in stages:
        record = s.json("kmeans.json") if s.stage == "kmeans" and s.completed else None
        if record is None:
            continue
        from fedhubert.labels.run import inertia_gap_text, kmeans_caption, plot_kmeans

        name = f"kmeans_{s.path.name}.png"
        plot_kmeans(record, report.figures / name)
        features = record["features"]
        lines = [
            f"`{report.rel(s.path)}`: {record['mode']} k-means, K={record['num_clusters']} on "
            f"{features['dims']}-dim {features['kind']} features, labels at {record['label_rate']} Hz; "
            f"{record['unused_clusters']} unused clusters."
        ]
        if record.get("rounds"):
            lines.append(f"Federated Lloyd rounds: {record['rounds']}, inertia per frame {record['inertia']:.2f}.")
        reference = record.get("reference") or {}
        if "relative_gap" in reference:
            lines.append(
                f"Centralized k-means on the pooled sample: inertia {reference['inertia']:.2f} per frame; "
                f"{inertia_gap_text(reference['relative_gap'])}."
            )
        elif "mean_matched_centroid_distance" in reference:
            lines.append(
                f"Per-client codebooks against a centralized one: mean distance to the matched centroid "
                f"{reference['mean_matched_centroid_distance']:.3f} (centroid spread "
                f"{reference['centroid_scale']:.3f})."
            )
        for subset, heldout in (record.get("global") or {}).items():
            lines.append(f"- held-out {subset}: {heldout['frames']} frames, inertia {heldout['inertia']:.2f}")
        report.add("## Targets (k-means)", *lines)
        report.figure(name, kmeans_caption(record))


def _training(report: Report, stages: list[StageFolder]) -> None:
    for s in stages:
        if s.stage == "train-local" and s.completed:
            from fedhubert.train.run import plot_training

            summary = s.record["summary"]
            name = f"train_local_{s.path.name}.png"
            rows = read_rows(s.path / "metrics.jsonl")
            plot_training(rows, report.figures / name)
            last_valid = next((r for r in reversed(rows) if r["kind"] == "valid"), {})
            valid = (
                f"; valid loss {_num(summary['valid_first']['loss'])} -> {_num(summary['valid_last']['loss'])}, "
                f"masked accuracy {_pct(summary['valid_last']['acc_masked'])}{_baseline(last_valid)}"
                if summary.get("valid_last")
                else ""
            )
            if summary.get("valid_last", {}).get("gain_nats") is not None:
                valid += (
                    f", gain over the label-frequency baseline {_gain(summary['valid_first']['gain_nats'])} -> "
                    f"{_gain(summary['valid_last']['gain_nats'])}"
                )
            report.add(
                f"## Centralized training (`{report.rel(s.path)}`)",
                f"{summary['parameters']:,} parameters, K={summary['num_classes']}, {summary['steps']} updates "
                f"on {summary['device']}: train loss {_num(summary['train']['loss'])}, masked accuracy "
                f"{_pct(summary['train']['acc_masked'])}{valid}. "
                f"Checkpoint `{report.rel(summary['checkpoint'], s.record.get('cwd'))}`.",
                *_verdict(summary.get("learning")),
            )
            report.figure(name, "centralized training curves")
        elif s.stage in ("pretrain", "distill") and s.completed:
            _federated(report, s)


def _federated(report: Report, s: StageFolder) -> None:
    summary = s.record["summary"]
    config = s.record.get("config", {})
    rows = read_rows(s.path / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    strategy = config.get("strategy", {}).get("name", "?")
    clients = max((r.get("clients", 0) for r in train), default=0)
    name = f"{s.stage}_{s.path.name}.png"
    distill = s.stage == "distill"
    acc_key = "train_acc_masked" if any("train_acc_masked" in r for r in train) else None
    plot_rounds(rows, report.figures / name, f"{s.stage} ({strategy}, {clients} clients)", acc_key=acc_key)
    lines = [
        f"{summary['rounds']} rounds of {config.get('local_steps', '?')} local steps with {clients} clients, "
        f"{strategy}; the rounds took {_duration(summary.get('seconds'))}. Final checkpoint "
        f"`{report.rel(summary['final_checkpoint'], s.record.get('cwd'))}`."
    ]
    if distill:
        lines.append(
            f"Student: {summary['student_parameters']:,} parameters, "
            f"{100 * summary['student_parameters'] / summary['teacher_parameters']:.1f}% of the teacher's."
        )
    if train:
        first, last = train[0], train[-1]
        lines.append(
            f"Client training loss: round {first['round']} {_num(first.get('train_loss'))} -> round "
            f"{last['round']} {_num(last.get('train_loss'))}"
            + (f"; masked accuracy {_pct(last.get(acc_key))}" if acc_key else "")
            + "."
        )
    if evals:
        first, last = evals[0], evals[-1]
        accuracy = (
            f", masked accuracy {_pct(first.get('acc_masked'))} -> {_pct(last.get('acc_masked'))}{_baseline(last)}"
            if "acc_masked" in last
            else ""
        )
        lines.append(
            f"Server evaluation on held-out speakers: loss {_num(first.get('loss'))} (round {first['round']}) "
            f"-> {_num(last.get('loss'))} (round {last['round']}){accuracy}."
        )
        if "gain_nats" in last:
            lines.append(
                f"Masked cross-entropy against the label-frequency baseline on the same frames: gain "
                f"{_gain(first['gain_nats'])} (round {first['round']}) -> {_gain(last['gain_nats'])} (round "
                f"{last['round']}); {last.get('predicted_clusters')} distinct clusters predicted."
            )
            lines.append(
                "Gain per round (nats): "
                + ", ".join(f"{r['round']}: {r['gain_nats']:+.3f}" for r in evals if "gain_nats" in r)
                + "."
            )
    lines.extend(_verdict(summary.get("learning")))
    steps = [r for r in train if "step_cosine" in r]
    if steps:
        lines.append(
            f"Server step against the clients' mean change (round {steps[-1]['round']}): ratio "
            f"{steps[-1]['step_ratio']:.2f}, cosine {steps[-1]['step_cosine']:.2f}."
        )
    lines.extend(_privacy(summary.get("privacy"), train))
    failed = sum(r.get("failed", 0) for r in train)
    if failed:
        lines.append(f"Client failures over the run: {failed} (see metrics.jsonl).")
    report.add(
        f"## {'Federated distillation' if distill else 'Federated pretraining'} (`{report.rel(s.path)}`)", *lines
    )
    report.figure(name, f"{s.stage} per round: {_listed(round_panels(rows, acc_key=acc_key))}")


def _listed(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def _privacy(privacy: dict | None, train: list[dict]) -> list[str]:
    if privacy is None:
        return ["Differential privacy: none (privacy.mode=none): the released models carry no privacy guarantee."]
    clipped = [r["privacy_clipped_fraction"] for r in train if "privacy_clipped_fraction" in r]
    where = "on the server" if privacy["mode"] == "server" else "on the clients"
    bound = (
        f"to a bound adapted from {privacy['clip_norm']:g} to {privacy['final_clip_norm']:.3g}"
        if privacy.get("adaptive_clipping")
        else f"to {privacy['clip_norm']:g}"
    )
    line = (
        f"Differential privacy (mode {privacy['mode']}): updates clipped {bound} {where} "
        f"({100 * sum(clipped) / max(len(clipped), 1):.0f}% of the replies clipped on average), noise multiplier "
        f"{privacy['noise_multiplier']:g}"
    )
    if math.isinf(privacy["epsilon"]):
        return [line + ": without noise there is no (epsilon, delta) guarantee."]
    return [
        line + f": ({privacy['epsilon']:.3g}, {privacy['delta']:g})-DP for each client's whole contribution after "
        f"{privacy['accounted_rounds']} rounds (RDP accountant)."
    ]


def _gain(nats: float) -> str:
    return f"{nats:+.3f} nats"


def _baseline(row: dict) -> str:
    """The masked accuracy of always predicting the most frequent training cluster on the frames of an evaluation
    `row`, to put beside the model's (nothing for rows written before it was recorded)."""
    base = row.get("baseline_acc_masked")
    return "" if base is None else f" (always predicting the most frequent cluster: {_pct(base)})"


def _not_better(name: str, score: str, base_name: str, base_score: str, below: bool) -> str:
    relation = "below" if below else "within the error bars of"
    return (
        f"**Not better than random init**: {name} ({score}) is {relation} random init of its architecture "
        f"({base_name}: {base_score}), so its pretraining shows no benefit here."
    )


def _verdict(learning: dict | None) -> list[str]:
    """What the report says plainly about whether the model learned (see fedhubert.train.learning)."""
    if not learning:
        return []
    if learning["learned"]:
        return [
            f"**Learned**: on {learning['held_out']} the model beats the label-frequency baseline by "
            f"{_gain(learning['gain_nats_last'])} (best {_gain(learning['gain_nats_best'])})."
        ]
    return [f"**Did not learn**: the model {problem}." for problem in learning["problems"]]


def _probes(report: Report, stages: list[StageFolder]) -> None:
    """Linear-probe results (`fedhubert probe`), with each trained model's gain over its random init."""
    for s in stages:
        result = s.json("probe.json") if s.stage == "probe" and s.completed else None
        if not result:
            continue
        data = result["data"]
        random = {m["architecture"]: m for m in result["models"] if m["random_init"]}
        lines = [
            f"{data['clips']} keyword clips of {data['words']} words by {data['speakers']} speakers; logistic "
            f"regression on mean-pooled frozen layers, {result['folds']}-fold speaker-disjoint cross-validation "
            f"(mean +- sd over folds; chance {_pct(data['chance'])}).",
            "",
            "| model | accuracy | vs random init of its architecture |",
            "|---|---|---|",
        ]
        warnings = []
        for m in result["models"]:
            base = None if m["random_init"] else random.get(m["architecture"])
            versus = f"{100 * (m['accuracy_mean'] - base['accuracy_mean']):+.1f} points" if base else ""
            lines.append(f"| {m['name']} | {_probe_score(m)} | {versus} |")
            warnings += _probe_versus_random(m, base) if base else []
        report.add(f"## Linear probe of frozen features (`{report.rel(s.path)}`)", *lines)
        if warnings:
            report.add(*warnings)


def _probe_score(model: dict) -> str:
    return f"{100 * model['accuracy_mean']:.1f} +- {100 * model['accuracy_sd']:.1f}%"


def _probe_versus_random(model: dict, base: dict) -> list[str]:
    """A warning unless the probe of `model` beats its random init by more than the sum of their fold sds."""
    bars = model["accuracy_sd"] + base["accuracy_sd"]
    gain = model["accuracy_mean"] - base["accuracy_mean"]
    if gain > bars:
        return []
    return [_not_better(model["name"], _probe_score(model), base["name"], _probe_score(base), gain < -bars)]


def _evaluations(report: Report, stages: list[StageFolder]) -> None:
    from fedhubert.eval.results import result_markdown

    results = [
        r for s in stages if s.stage == "evaluate-speech-commands" and s.completed for r in [s.json("result.json")] if r
    ]
    if not results:
        return
    from fedhubert.plots import save_figure

    save_figure(evaluations_figure(results), report.figures / "speech_commands.png")
    warnings = [
        line
        for r in results
        for base in [_random_init_of(r, results)]
        if base
        for line in _s3prl_versus_random(r, base)
    ]
    steps = sorted({r["steps"] for r in results})
    roots = sorted({r["data"]["root"] for r in results})
    data = (
        f"the same data for every row (`{roots[0]}`)"
        if len(roots) == 1
        else f"**different datasets**: {', '.join(f'`{r}`' for r in roots)}"
    )
    report.add(
        "## Speech Commands (SUPERB keyword spotting, S3PRL)",
        f"S3PRL's speech_commands downstream on each upstream, {', '.join(map(str, steps))} training steps; "
        f"the dev-best checkpoint is scored on the separate test set; {data}.",
        "",
        result_markdown(results).rstrip(),
    )
    if warnings:
        report.add(*warnings)
    report.figure("speech_commands.png", evaluations_caption(results))


def evaluations_caption(results: list[dict]) -> str:
    """What `evaluations_figure(results)` shows, for a caption."""
    from fedhubert.eval.results import intervals

    shown = any(bound for r in results for bound in intervals(r).values())
    bars = " with binomial 95% confidence intervals (Wilson) as error bars" if shown else ""
    return f"dev-best and test accuracy per upstream{bars}"


def evaluations_figure(results: list[dict]) -> Figure:
    """Dev-best and test accuracy per evaluation, with their binomial 95% intervals (as recorded, else from the
    accuracy and clip counts) as error bars; none where neither is known."""
    from fedhubert.eval.results import intervals
    from fedhubert.plots import plt

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results) + 3), 4))
    x = range(len(results))
    ci = [intervals(r) for r in results]
    bars = (
        ("dev (best)", [r["dev_best"]["acc"] for r in results], [c["dev_ci95"] for c in ci]),
        ("test", [r["test_acc"] for r in results], [c["test_ci95"] for c in ci]),
    )
    for offset, (label, values, bounds) in zip((-0.2, 0.2), bars, strict=True):
        errors = [
            [max(0.0, 100 * (v - b[0])) if b else 0.0 for v, b in zip(values, bounds, strict=True)],
            [max(0.0, 100 * (b[1] - v)) if b else 0.0 for v, b in zip(values, bounds, strict=True)],
        ]
        ax.bar([i + offset for i in x], [100 * v for v in values], 0.4, yerr=errors, capsize=3, label=label)
    ax.axhline(100 / 12, color="grey", linestyle="--", linewidth=1, label="chance (12 classes)")
    ax.set_xticks(list(x), [r["name"] for r in results], rotation=15, ha="right", fontsize="small")
    ax.set(ylabel="accuracy (%) with 95% interval", ylim=(0, 100), title="Speech Commands (SUPERB KS) accuracy")
    ax.legend(fontsize="small")
    return fig


def _random_init_of(result: dict, results: list[dict]) -> dict | None:
    """The random-init evaluation to hold a pretrained checkpoint's evaluation against: of the same checkpoint's
    architecture (same `checkpoint_sha256`), else the only random-init evaluation of its kind; None for baselines,
    random inits themselves, or when there is none."""
    if result.get("random_init") or not result.get("checkpoint_sha256"):
        return None
    randoms = [r for r in results if r.get("random_init")]
    same = [r for r in randoms if r.get("checkpoint_sha256") == result["checkpoint_sha256"]]
    kind = [r for r in randoms if result.get("kind") and r.get("kind") == result["kind"]]
    return same[0] if same else kind[0] if len(kind) == 1 else None


def _s3prl_versus_random(result: dict, base: dict) -> list[str]:
    """A warning unless the test interval of `result` lies wholly above that of its random init."""
    from fedhubert.eval.results import interval_text, intervals

    test, base_test = intervals(result)["test_ci95"], intervals(base)["test_ci95"]
    if test is None or base_test is None or test[0] > base_test[1]:
        return []

    def score(r: dict, interval: list[float]) -> str:
        return f"test {_pct(r['test_acc'])}, 95% CI {interval_text(interval)}"

    return [
        _not_better(result["name"], score(result, test), base["name"], score(base, base_test), test[1] < base_test[0])
    ]


def _provenance(report: Report, stages: list[StageFolder]) -> None:
    lines = ["How each stage was run (its full resolved config is config.yaml in its folder):", "", "```"]
    for s in stages:
        lines.append(shlex.join(s.record.get("command", [])))
    lines.append("```")
    report.add("## Provenance", *lines)


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.md (and RUN_DIR/report/*.png); returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder: pass the folder holding the run's stage folders")
    stages = find_stages(Path(os.path.abspath(run_dir)))
    if not stages:
        raise ReportError(
            f"{run_dir} holds no stage folders ({RUN_FILE} files up to three levels down): pass the "
            f"folder a pipeline wrote into, e.g. the demo's data/demo"
        )
    report = Report(run_dir)
    report.figures.mkdir(exist_ok=True)
    for section in (_overview, _data, _kmeans, _training, _probes, _evaluations, _provenance):
        section(report, stages)
    path = report.run_dir / "report.md"
    atomic_write_text(path, "\n".join(report.lines).rstrip() + "\n")
    log.info("report of %d stages written to %s", len(stages), path)
    return path
