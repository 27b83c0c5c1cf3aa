"""Does federated pretraining learn, and how close does it come to centralized pretraining at equal compute?

Makes its own data: a synthetic LibriSpeech-layout corpus (30 speakers of both sexes, about 24 of them and 1 hour in
the training subsets) and a synthetic Speech Commands set of other speakers. Then, with the same model (the tiny
preset), the same k-means recipe (K=100 MFCC labels, federated codebook) and the same compute for every trained
model (updates x batch seconds: `--rounds` x `--local-steps` x 4 clients updates of `--batch-seconds`):

- random init; centralized (`train-local` on the pooled clients of the IID partition);
- federated IID (balanced partition of 4 clients) with FedAvg, and with FedAdam (the other server optimizer);
- federated non-IID: Dirichlet on sex with alpha 0.1 (4 clients), and one speaker per client (4 sampled a round);
- per-client codebooks with local label heads (IID partition);
- the distilled student of the federated IID teacher (same updates and batch).

Measures: held-out masked cross-entropy and its gain over the label-frequency baseline on dev-clean (labelled by the
shared codebook; per-client codebooks have no shared labels, so their clients' own validation gain is reported); a
linear probe of frozen features (`fedhubert probe`: mean-pooled layers, logistic regression, speaker-disjoint 5-fold
cross-validation, mean +- sd over folds; gaps between two models are paired over the same folds); S3PRL's
speech_commands downstream (`--s3prl-steps`, 3000) for random init, centralized, federated IID and the student, with
Wilson 95% intervals on test accuracy; and curves of the held-out gain and the probe against updates.

Targets (issue 16): the federated teacher at least 15 probe points above random init and above it on S3PRL beyond
the intervals; federated IID within 3 probe points of centralized; the student within 5 points of its teacher; the
non-IID and codebook gaps reported with their error bars. The data are made once under build/bench/learning/
(again when their flags change); a run whose folder holds a completed run of the same command is read back (its
record names the commit that made it), so a benchmark cut off resumes where it stopped; `--retrain` trains all again.

Every run is trained with `--seeds` pretraining seeds (3; the data, codebooks and probe folds stay the same), so a
gap is reported as mean +- standard error over seeds x folds (issue 28), with each seed's gap beside it; the probe
curves and S3PRL are of seed 0. `--seeds 1` is the quick check (about a third of the time).

    python benchmarks/learning.py [--seeds 3] [--rounds 15] [--local-steps 10] [--batch-seconds 32] [--s3prl-steps 3000]

A larger version on a GPU machine: `--preset small --rounds 50 --local-steps 50 --batch-seconds 87.5 --speakers 120
--minutes 10` (training picks the GPU with train.device=auto; S3PRL with `--s3prl-device cuda`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from _common import RESULTS, run_cli, write_results
from fedhubert.corpus.librispeech_synth import LibriSpeechSynthConfig, allocate
from fedhubert.eval.confidence import wilson_interval
from fedhubert.fl.config import STRATEGY_PRESETS
from fedhubert.plots import plt, save_figure
from fedhubert.runlog import environment_record

ROOT = Path(__file__).resolve().parents[1] / "build" / "bench" / "learning"
CLIENTS = 4
PROBE_TARGET_POINTS = 15.0  # federated teacher over random init
CENTRAL_TARGET_POINTS = 3.0  # federated IID may trail centralized by this much
STUDENT_TARGET_POINTS = 5.0  # student may trail its teacher by this much


@dataclass
class Run:
    name: str
    stage: str  # train-local | pretrain | distill
    partition: str  # iid | dirichlet | natural
    codebook: str = "federated"  # federated | per-client
    overrides: list[str] = field(default_factory=list)
    s3prl: bool = False

    @property
    def slug(self) -> str:
        return self.name.split(":")[0]


RUNS = [
    Run("centralized", "train-local", "iid", s3prl=True),
    Run("fedavg-iid: federated IID, FedAvg", "pretrain", "iid", s3prl=True),
    Run("fedadam-iid: federated IID, FedAdam", "pretrain", "iid", overrides=["strategy.name=fedadam"]),
    Run("dirichlet-sex: non-IID, Dirichlet(0.1) on sex", "pretrain", "dirichlet"),
    Run("one-speaker: non-IID, one speaker per client", "pretrain", "natural"),
    Run("per-client-codebooks: IID, per-client codebooks", "pretrain", "iid", codebook="per-client"),
    Run("student: distilled from fedavg-iid", "distill", "iid", s3prl=True),
]
PARTITIONS = {
    "iid": [],
    "dirichlet": ["scheme=dirichlet", "dirichlet.alpha=0.1", "dirichlet.attribute=sex"],
    "natural": ["scheme=natural", "num_clients=null", "natural.speakers_per_client=1"],
}


def rows(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 1)
        print(f"[learning] {name}: {self.seconds[name]:.0f} s", flush=True)
        return result


def data_flags(args: argparse.Namespace) -> dict:
    """The flags the data depends on; `dev_speakers` only when set, so that the default data keeps its stamp."""
    flags = ["speakers", "minutes", "keyword_speakers", "keyword_test_speakers"]
    flags += ["dev_speakers"] if args.dev_speakers else []
    return {key: getattr(args, key) for key in flags}


def variant(args: argparse.Namespace) -> str:
    """The suffix of the folders and results names of a `--dev-speakers` held-out set ('-devN'); '' by default, so
    the default's data, cells and results stay where they are."""
    return f"-dev{args.dev_speakers}" if args.dev_speakers else ""


def root_of(args: argparse.Namespace) -> Path:
    """The benchmark's data and runs."""
    return ROOT.with_name(ROOT.name + variant(args))


def cells_of(args: argparse.Namespace) -> Path:
    """The cell files."""
    return CELLS.with_name(CELLS.name + variant(args))


def synth_flags(args: argparse.Namespace) -> list[object]:
    """synth librispeech's speakers; with `--dev-speakers`, the training and test subsets keep the speakers that
    `--speakers` gives them and dev-clean gets that many (allocate() gives one speaker a subset and the rest by share,
    so shares of count - 1 give the counts exactly)."""
    if not args.dev_speakers:
        return ["--speakers", args.speakers]
    counts = {**allocate(args.speakers, LibriSpeechSynthConfig().subsets), "dev-clean": args.dev_speakers}
    subsets = {subset: count - 1 for subset, count in counts.items()}
    return ["--speakers", sum(counts.values()), f"subsets={json.dumps(subsets)}"]


def make_data(args: argparse.Namespace) -> dict:
    """The corpus, its three partitions, their labels and the keyword set (made once; made again when the data flags
    change)."""
    root = root_of(args)
    corpus, keywords, stamp = root / "LibriSpeech", root / "speech_commands", root / "data.json"
    wanted = data_flags(args)
    if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        stamp.write_text(json.dumps(wanted) + "\n")
    if not (corpus / "SPEAKERS.TXT").is_file():
        run_cli("synth", "librispeech", "--out", corpus, *synth_flags(args), "--minutes", args.minutes)
    if not (keywords / "run.json").is_file():
        run_cli(
            "synth",
            "speech-commands",
            "--out",
            keywords,
            "--speakers",
            args.keyword_speakers,
            "--test-speakers",
            args.keyword_test_speakers,
            "--seed",
            7,
            "--force",
        )
    partitions = {}
    for name, overrides in PARTITIONS.items():
        folder = root / f"partition-{name}"
        if not (folder / "partition.json").is_file():
            run_cli("partition", "--corpus", corpus, "--out", folder, "--clients", CLIENTS, "--force", *overrides)
        partitions[name] = folder
    labels = {}
    for part, mode in [
        ("iid", "federated"),
        ("dirichlet", "federated"),
        ("natural", "federated"),
        ("iid", "per-client"),
    ]:
        folder = root / f"kmeans-{part}-{mode}"
        if not (folder / "kmeans.json").is_file():
            run_cli(
                "kmeans", "--partition", partitions[part], "--out", folder, "--force", f"mode={mode}", "reference=false"
            )
        labels[part, mode] = folder
    return {"corpus": corpus, "keywords": keywords, "partitions": partitions, "labels": labels}


def describe_data(data: dict) -> dict:
    iid = json.loads((data["partitions"]["iid"] / "partition.json").read_text())
    sexes = {}
    for line in (data["corpus"] / "SPEAKERS.TXT").read_text().splitlines():
        if not line.startswith(";"):
            fields = [f.strip() for f in line.split("|")]
            if fields[2].startswith("train"):
                sexes[fields[1]] = sexes.get(fields[1], 0) + 1
    clients = {
        name: json.loads((folder / "partition.json").read_text())["num_clients"]
        for name, folder in data["partitions"].items()
    }
    keyword_run = json.loads((data["keywords"] / "run.json").read_text())
    return {
        "train_hours": round(sum(c["hours"]["train"] + c["hours"].get("valid", 0.0) for c in iid["clients"]), 3),
        "train_speakers": sum(len(c["speakers"]) for c in iid["clients"]),
        "train_speakers_by_sex": sexes,
        "clients": clients,
        "keywords": keyword_run.get("summary", {}),
    }


def planned(args: argparse.Namespace) -> int:
    return args.rounds * args.local_steps * CLIENTS


def completed_with(out: Path, *command: object) -> str | None:
    """The git commit of the completed run in `out` that was made by exactly this fedhubert command, or None."""
    try:
        record = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("status") != "completed" or record.get("command", [])[1:] != [str(c) for c in command]:
        return None
    return record.get("git_commit") or "unknown"


def train(run: Run, data: dict, args: argparse.Namespace, teacher: Path | None, reuse: bool = False) -> dict:
    """Train one run and read back what it measured. `reuse`: a completed run of the same command in the run's folder
    is read back instead of trained again (the record says so, with the commit that made it)."""
    out = root_of(args) / "runs" / run.slug
    reused: list[str] = []

    def run_or_reuse(*command: object) -> None:
        commit = completed_with(out, *command) if reuse else None
        if commit is None or (args.only_commit and commit != args.only_commit):
            run_cli(*command)
        else:
            reused.append(commit)

    partition = data["partitions"][run.partition]
    kmeans = data["labels"][run.partition, run.codebook]
    batch = f"train.data.batch_seconds={args.batch_seconds}"
    if run.stage == "train-local":
        clients = sorted(c for c in partition.glob("client_*") if (c / "train.tsv").is_file())
        manifests = json.dumps([str(c / "train.tsv") for c in clients])
        labels = json.dumps([str(kmeans / c.name / "train.km") for c in clients])
        every = args.local_steps * CLIENTS  # one round's compute
        run_or_reuse(
            "train-local",
            "--out",
            out,
            "--preset",
            args.preset,
            "--steps",
            planned(args),
            "--force",
            f"train_manifests={manifests}",
            f"train_labels={labels}",
            "--valid-manifest",
            partition / "global" / "dev-clean.tsv",
            "--valid-labels",
            kmeans / "global" / "dev-clean.km",
            f"eval_every={every * args.evaluate_every}",
            f"checkpoint_every={every * args.probe_every}",
            f"train.log_every={every}",
            batch,
            *run.overrides,
        )
        evals = [(r["step"], r) for r in rows(out / "metrics.jsonl", "valid")]
        curve_checkpoints = {int(p.stem.split("_")[1]): p for p in (out / "checkpoints").glob("step_*.pt")}
        curve_checkpoints[planned(args)] = out / "checkpoints" / "final.pt"
    else:
        num_clients = json.loads((partition / "partition.json").read_text())["num_clients"]
        fraction = [f"strategy.fraction={(CLIENTS - 0.5) / num_clients:.6f}"] if num_clients > CLIENTS else []
        common = [
            "--partition",
            partition,
            "--out",
            out,
            "--rounds",
            args.rounds,
            "--local-steps",
            args.local_steps,
            "--force",
            batch,
            "train.log_every=1000",
            "checkpoint_keep=null",  # the probe curve reads every probe_every-th round's checkpoint
            # the whole dev-clean (510 s), as the centralized run's validation and every cell in results/learning/
            # (made while the default bound, 600 s, covered it all): the default 200 s would count clusters on less
            "eval_seconds=null",
            *([f"evaluate_every={args.evaluate_every}"] if args.evaluate_every != 1 else []),
            *fraction,
            *run.overrides,
        ]
        if run.stage == "pretrain":
            run_or_reuse("pretrain", "--kmeans", kmeans, "--preset", args.preset, *common)
        else:
            run_or_reuse("distill", "--teacher", teacher, *common)
        per_round = args.local_steps * CLIENTS
        evals = [(r["round"] * per_round, r) for r in rows(out / "metrics.jsonl", "eval")]
        curve_checkpoints = {
            r * per_round: out / "checkpoints" / f"round_{r:05d}.pt"
            for r in range(args.probe_every, args.rounds + 1, args.probe_every)
        }
    clients_rows = rows(out / "metrics.jsonl", "client") if run.stage != "train-local" else []
    record = {
        "name": run.name,
        "stage": run.stage,
        "partition": run.partition,
        "codebook": run.codebook,
        "overrides": run.overrides,
        "out": str(out),
        "checkpoint": str(out / "checkpoints" / "final.pt"),
        "updates": planned(args),
        "batch_seconds": args.batch_seconds,
        "curve_checkpoints": {str(k): str(v) for k, v in sorted(curve_checkpoints.items())},
        **({"reused_from_commit": reused[0]} if reused else {}),
    }
    if run.stage != "distill":
        gains = [(u, r["gain_nats"]) for u, r in evals if "gain_nats" in r]
        if gains:
            record["gain_by_update"] = gains
            record["gain_last"] = gains[-1][1]
            record["predicted_clusters_last"] = evals[-1][1]["predicted_clusters"]
            record["gain_on"] = "dev-clean, shared codebook"
        else:
            last = max(r["round"] for r in clients_rows)
            final = [r["valid_gain_nats"] for r in clients_rows if r["round"] == last and "valid_gain_nats" in r]
            record["gain_last"] = float(np.mean(final))
            record["gain_on"] = "the clients' own validation sets, own codebooks (mean over clients)"
    if clients_rows:
        by_round: dict[int, int] = {}
        for r in clients_rows:
            by_round[r["round"]] = by_round.get(r["round"], 0) + 1
        record["clients_per_round"] = sorted(set(by_round.values()))
    run_json = json.loads((out / "run.json").read_text())
    record["learning"] = run_json.get("summary", {}).get("learning")
    record["train_s"] = run_json.get("elapsed_s")
    record["git_commit"] = run_json.get("git_commit")  # cells made by other code are read back too: say whose
    return record


def probe(checkpoints: list[str], keywords: Path, out: Path, random_init: bool = False) -> dict:
    """One `fedhubert probe` over the checkpoints (and with `random_init` each architecture at random init)."""
    run_cli(
        "probe",
        "--dataset",
        keywords,
        *[a for c in checkpoints for a in ("--checkpoint", c)],
        *(["--random-init"] if random_init else []),
        "--out",
        out,
        "--force",
    )
    result = json.loads((out / "probe.json").read_text())
    return result


def s3prl(jobs: list[tuple[str, list[str], Path, dict]], keywords: Path, args: argparse.Namespace) -> dict[str, dict]:
    """S3PRL speech_commands for each (name, checkpoint flags, cell file, cell key), `--s3prl-jobs` at a time, each
    in its own process; each result goes to its cell file as it finishes."""
    threads = max(1, (os.cpu_count() or 1) // args.s3prl_jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def one(job: tuple[str, list[str], Path, dict]) -> tuple[str, dict]:
        name, flags, path, key = job
        out = root_of(args) / "s3prl" / name
        command = [
            sys.executable,
            "-m",
            "fedhubert",
            "evaluate",
            "speech-commands",
            "--dataset",
            str(keywords),
            "--steps",
            str(args.s3prl_steps),
            "--eval-step",
            str(args.s3prl_steps // 6),
            "--device",
            args.s3prl_device,
            "--name",
            name,
            "--out",
            str(out),
            "--force",
            *flags,
        ]
        log = root_of(args) / "s3prl" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle:
            if subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env).returncode:
                raise SystemExit(f"S3PRL evaluation {name} failed: see {log}")
        result = json.loads((out / "result.json").read_text())
        clips = result["data"]["test_clips"]
        correct = round(result["test_acc"] * clips)
        result["test_ci95"] = list(wilson_interval(correct, clips))
        run_json = json.loads((out / "run.json").read_text())
        result["seconds"] = run_json["elapsed_s"]
        result["git_commit"] = run_json.get("git_commit")
        write_cell(path, {"key": key, "record": result})
        return name, result

    with ThreadPoolExecutor(args.s3prl_jobs) as pool:
        return dict(pool.map(one, jobs))


def fold_gap(a: dict, b: dict) -> tuple[float, float]:
    """Mean and sd over folds of a - b in points (the same speaker-disjoint folds for both models)."""
    diff = 100 * (np.asarray(a["fold_accuracies"]) - np.asarray(b["fold_accuracies"]))
    return float(diff.mean()), float(diff.std(ddof=1))


def seeds_gap(a: list[dict], b: list[dict]) -> dict:
    """a - b in points over seeds and folds together: each seed's model against the same seed's model (or one
    model, for random init), paired over the same folds. Mean, standard error over the seeds x folds differences,
    each seed's mean, the standard error over those seed means (the seeds x folds one treats a seed's 5 folds as
    independent draws, which they are not: a seed moves all its folds together), and whether the mean lies beyond
    two of the larger of the two standard errors."""
    b = b * len(a) if len(b) == 1 else b
    diffs = np.concatenate(
        [100 * (np.asarray(x["fold_accuracies"]) - np.asarray(y["fold_accuracies"])) for x, y in zip(a, b, strict=True)]
    )
    mean = float(diffs.mean())
    se = float(diffs.std(ddof=1) / np.sqrt(diffs.size)) if diffs.size > 1 else float("nan")
    per_seed = [round(fold_gap(x, y)[0], 2) for x, y in zip(a, b, strict=True)]
    se_seeds = float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else float("nan")
    wider = max(se, se_seeds) if not np.isnan(se_seeds) else se
    return {
        "mean": mean,
        "se": se,
        "se_seeds": se_seeds,
        "per_seed": per_seed,
        "beyond_2se": bool(abs(mean) > 2 * wider),
    }


def pm(mean: float, sd: float) -> str:
    return f"{mean:.1f} +- {sd:.1f}"


def summarise(seeds: list[dict]) -> dict:
    """One run's seeds together: probe accuracy (mean over seeds; SE over seeds x folds) and held-out gain (mean and
    SE over seeds)."""
    folds = 100 * np.concatenate([np.asarray(r["probe"]["fold_accuracies"]) for r in seeds])
    out = {
        "seeds": len(seeds),
        "probe_mean": float(folds.mean()),
        "probe_se": float(folds.std(ddof=1) / np.sqrt(folds.size)),
        "probe_by_seed": [round(100 * r["probe"]["accuracy_mean"], 2) for r in seeds],
    }
    by_seed = [100 * r["probe"]["accuracy_mean"] for r in seeds]
    out["probe_se_seeds"] = float(np.std(by_seed, ddof=1) / np.sqrt(len(by_seed))) if len(by_seed) > 1 else float("nan")
    gains = [r["gain_last"] for r in seeds if "gain_last" in r]
    if gains:
        out["gain_mean"] = float(np.mean(gains))
        out["gain_se"] = float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else float("nan")
        out["gain_by_seed"] = [round(g, 4) for g in gains]
    return out


def plot(records: dict[str, dict], random_init: dict, s3prl_results: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax_probe, ax_s3prl, ax_gain, ax_curve = axes.ravel()
    names = ["random init", *records]
    ax_probe.bar(
        names,
        [100 * random_init["accuracy_mean"], *[r["summary"]["probe_mean"] for r in records.values()]],
        yerr=[
            100 * random_init["accuracy_sd"] / np.sqrt(len(random_init["fold_accuracies"])),
            *[max(r["summary"]["probe_se"], r["summary"].get("probe_se_seeds") or 0.0) for r in records.values()],
        ],
        capsize=4,
        color=["grey", *["tab:blue"] * len(records)],
    )
    for x, r in enumerate(records.values(), start=1):
        ax_probe.plot([x] * r["summary"]["seeds"], r["summary"]["probe_by_seed"], "k.", markersize=4)
    ax_probe.set(
        ylabel="accuracy (%)", title="linear probe (mean +- the larger SE: seeds x folds or seed means; dots: seeds)"
    )
    ax_probe.tick_params(axis="x", rotation=30)
    if s3prl_results:
        labels = list(s3prl_results)
        acc = [100 * s3prl_results[n]["test_acc"] for n in labels]
        lo = [a - 100 * s3prl_results[n]["test_ci95"][0] for a, n in zip(acc, labels, strict=True)]
        hi = [100 * s3prl_results[n]["test_ci95"][1] - a for a, n in zip(acc, labels, strict=True)]
        ax_s3prl.bar(labels, acc, yerr=[lo, hi], capsize=4, color="tab:orange")
        ax_s3prl.tick_params(axis="x", rotation=30)
    ax_s3prl.set(ylabel="test accuracy (%)", title="S3PRL speech_commands, seed 0 (Wilson 95% interval)")
    for slug, r in records.items():
        first = r["seeds"][0]
        if "gain_by_update" in first:
            ax_gain.plot(*zip(*first["gain_by_update"], strict=True), "-o", markersize=3, label=slug)
    ax_gain.axhline(0.0, color="grey", linestyle="--", linewidth=1, label="frequency baseline")
    ax_gain.set(
        xlabel="updates (all clients)",
        ylabel="nats per masked frame",
        title="held-out gain over the label-frequency baseline (dev-clean), seed 0",
    )
    ax_gain.legend(fontsize="small")
    for slug, r in records.items():
        if r.get("probe_curve"):
            updates, means, sds = zip(*r["probe_curve"], strict=True)
            ax_curve.errorbar(updates, means, yerr=sds, fmt="-o", capsize=3, label=slug)
    ax_curve.axhline(100 * random_init["accuracy_mean"], color="grey", linestyle="--", linewidth=1, label="random init")
    ax_curve.set(xlabel="updates (all clients)", ylabel="probe accuracy (%)", title="probe against compute, seed 0")
    ax_curve.legend(fontsize="small")
    save_figure(fig, path)


def figures_of(
    records: dict[str, dict], random_init: dict, s3prl_results: dict, wall_s: float, reused: int = 0
) -> list[dict]:
    def seeds(slug: str) -> list[dict]:
        return [r["probe"] for r in records[slug]["seeds"]]

    def gap_figure(a: str, b: str, label: str, **target) -> dict:
        gap = seeds_gap(
            seeds(a) if a != "random init" else [random_init], seeds(b) if b != "random init" else [random_init]
        )
        return {
            "figure": f"{label} (probe)",
            "ours": pm(gap["mean"], gap["se"])
            + (f" (seeds: +- {gap['se_seeds']:.1f})" if len(gap["per_seed"]) > 1 else ""),
            "unit": "points",
            "reference": ("beyond 2 SE" if gap["beyond_2se"] else "within 2 SE")
            + f"; by seed {', '.join(f'{g:+.1f}' for g in gap['per_seed'])}",
            **target,
        }

    figures = [
        {
            "figure": "probe accuracy, random init",
            "ours": pm(100 * random_init["accuracy_mean"], 100 * random_init["accuracy_sd"]),
            "unit": "%",
            "reference": "sd over 5 folds",
        }
    ]
    for slug, r in records.items():
        summary = r["summary"]
        figures.append(
            {
                "figure": f"probe accuracy, {slug}",
                "ours": pm(summary["probe_mean"], summary["probe_se"])
                + (f" (seeds: +- {summary['probe_se_seeds']:.1f})" if summary["seeds"] > 1 else ""),
                "unit": "%",
                "reference": f"SE over {summary['seeds']} seeds x 5 folds (and over the seeds' means)",
            }
        )
        if "gain_mean" in summary:
            figures.append(
                {
                    "figure": f"held-out gain over frequency baseline, {slug}",
                    "ours": f"{summary['gain_mean']:.3f} +- {summary['gain_se']:.3f}",
                    "unit": "nats",
                    "reference": ("own codebooks; " if r["seeds"][0]["codebook"] == "per-client" else "")
                    + f"SE over {summary['seeds']} seeds",
                }
            )
    teacher = seeds_gap(seeds("fedavg-iid"), [random_init])["mean"]
    figures.append(
        gap_figure(
            "fedavg-iid",
            "random init",
            "federated teacher - random init",
            target=f">= {PROBE_TARGET_POINTS:g}",
            met=teacher >= PROBE_TARGET_POINTS,
        )
    )
    central = seeds_gap(seeds("fedavg-iid"), seeds("centralized"))["mean"]
    figures.append(
        gap_figure(
            "fedavg-iid",
            "centralized",
            "federated IID - centralized",
            target=f">= -{CENTRAL_TARGET_POINTS:g}",
            met=central >= -CENTRAL_TARGET_POINTS,
        )
    )
    for slug in ("fedadam-iid", "dirichlet-sex", "one-speaker", "per-client-codebooks"):
        figures.append(gap_figure(slug, "fedavg-iid", f"{slug} - federated IID FedAvg"))
    student = seeds_gap(seeds("student"), seeds("fedavg-iid"))["mean"]
    figures.append(
        gap_figure(
            "student",
            "fedavg-iid",
            "student - its teacher",
            target=f">= -{STUDENT_TARGET_POINTS:g}",
            met=student >= -STUDENT_TARGET_POINTS,
        )
    )
    for name, res in s3prl_results.items():
        lo, hi = res["test_ci95"]
        figures.append(
            {
                "figure": f"S3PRL test accuracy, {name} (seed 0)",
                "ours": f"{100 * res['test_acc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
                "unit": "%",
                "reference": f"{res['data']['test_clips']} test clips, {res['steps']} steps",
            }
        )
    if {"random-init", "fedavg-iid"} <= set(s3prl_results):
        above = s3prl_results["fedavg-iid"]["test_ci95"][0] > s3prl_results["random-init"]["test_ci95"][1]
        figures.append(
            {
                "figure": "S3PRL: federated teacher above random init beyond the intervals",
                "ours": "yes" if above else "no",
                "unit": "",
                "target": "yes",
                "met": above,
            }
        )
    figures.append(
        {
            "figure": "whole benchmark, time (every run's own training time + data + probe + S3PRL, its evaluations' "
            "summed time / the number side by side)",
            "ours": round(wall_s / 60, 1),
            "unit": "min",
            "reference": f"{reused} run(s) read back from an earlier invocation keep their own time",
            "target": "<= 90",
            "met": wall_s <= 90 * 60,
        }
    )
    return figures


def at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `lowest`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, compute and data flags (shared with benchmarks/privacy.py, which runs on the same data)."""
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-seconds", type=float, default=32.0, help="audio per batch, every run")
    parser.add_argument("--probe-every", type=int, default=3, help="probe the curves every this many rounds")
    parser.add_argument("--speakers", type=int, default=30, help="synthetic LibriSpeech speakers (80%% training)")
    parser.add_argument("--minutes", type=float, default=2.75, help="minutes of speech per speaker")
    parser.add_argument(
        "--dev-speakers",
        type=at_least(2),
        default=None,
        help="speakers of dev-clean, the held-out set (default: --speakers' share, 3 of 30; training speakers stay as "
        "--speakers gives them); its data and cells go to folders of their own (build/bench/learning-devN, "
        "results/learning-devN/)",
    )
    parser.add_argument(
        "--evaluate-every",
        type=at_least(1),
        default=1,
        help="the server's held-out evaluation every this many rounds and after the last (the gain's curve is coarser; "
        "a large --dev-speakers set costs less)",
    )
    parser.add_argument("--keyword-speakers", type=int, default=48)
    parser.add_argument("--keyword-test-speakers", type=int, default=40)


def add_reuse_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train every run again (default: a run with a cell file of the same settings in "
        "benchmarks/results/learning/ is read back, so a benchmark cut off resumes where it stopped)",
    )
    parser.add_argument(
        "--only-this-commit",
        action="store_true",
        help="read back only cells and runs made by the checked-out commit and train the others again: every figure "
        "from one commit, and a benchmark cut off still resumes",
    )


def parse_reuse_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed arguments, with `only_commit`: the commit whose cells may be read back (None: any commit's)."""
    args = parser.parse_args()
    args.only_commit = environment_record()["git_commit"] if args.only_this_commit else None
    if args.only_this_commit and (not args.only_commit or code_changed()):
        parser.error(
            "--only-this-commit needs a git checkout whose code is committed (its cells are recorded under its "
            "commit; results files may differ, so a run cut off resumes)"
        )
    return args


def code_changed() -> list[str]:
    """Files of the checkout's code (not its results) that differ from its commit."""
    repo = Path(__file__).resolve().parents[1]
    status = subprocess.run(
        ["git", "status", "--porcelain", "--", "src", "apps", "configs", "benchmarks/*.py", "pyproject.toml"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line[3:] for line in status.splitlines()]


def with_seed(run: Run, seed: int) -> Run:
    """The run with pretraining seed `seed` (initial model, sampling, crops, masks, dropout), in its own folder."""
    slug, _, what = run.name.partition(":")
    return replace(run, name=f"{slug}-seed{seed}:{what}", overrides=[*run.overrides, f"seed={seed}"])


CELLS = RESULTS / "learning"  # one results file per run and seed, and per S3PRL evaluation, as each finishes
CURVE_RUNS = ("centralized", "fedavg-iid")


def cell_key(run: Run, args: argparse.Namespace) -> dict:
    """What a cell's result depends on: the run and every data, model and compute flag."""
    flags = ("preset", "rounds", "local_steps", "batch_seconds", "probe_every")
    key = {"run": run.name, "overrides": run.overrides, **{k: getattr(args, k) for k in flags}, **data_flags(args)}
    if args.evaluate_every != 1:  # only when set, so that earlier cells keep their keys
        key["evaluate_every"] = args.evaluate_every
    strategy = next((o.split("=", 1)[1] for o in run.overrides if o.startswith("strategy.name=")), None)
    taken = STRATEGY_PRESETS.get(strategy, {}).items()
    preset = {k: v for k, v in taken if not any(o.startswith(f"strategy.{k}=") for o in run.overrides)}
    if preset:  # a run that takes a strategy's preset depends on it (a cell of an older preset is trained again)
        key["strategy_preset"] = preset
    return key


def read_cell(path: Path, key: dict, commit: str | None = None) -> dict | None:
    """The cell of this key, or None; with `commit`, only a cell that commit made (others are trained again)."""
    try:
        cell = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if cell.get("key") != key or (commit and cell.get("record", {}).get("git_commit") != commit):
        return None
    return cell


def write_cell(path: Path, cell: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell, indent=2) + "\n")


def probed_run(run: Run, seed: int, data: dict, args: argparse.Namespace, teacher: Callable[[], Path] | None) -> dict:
    """One run's record with its probe (and for seed 0 of the curve runs, the probe of its curve checkpoints; for
    seed 0 of the centralized run, random init too): read back from its cell file when one of the same key exists
    (a benchmark cut off resumes where it stopped, even on a fresh checkout), else trained and probed and written."""
    seeded = with_seed(run, seed)
    key = cell_key(seeded, args)
    path = cells_of(args) / f"{seeded.slug}.json"
    if not args.retrain and (cell := read_cell(path, key, args.only_commit)) is not None:
        print(f"[learning] {seeded.slug}: read back from {path.relative_to(RESULTS.parent)}", flush=True)
        return {**cell["record"], "read_back": True}
    record = train(seeded, data, args, teacher() if teacher else None, reuse=not args.retrain)
    curve = seed == 0 and run.slug in CURVE_RUNS
    checkpoints = [record["checkpoint"]]
    if curve:
        checkpoints += [c for c in record["curve_checkpoints"].values() if c not in checkpoints]
    started = time.perf_counter()
    random_init = seed == 0 and run.slug == "centralized"
    result = probe(checkpoints, data["keywords"], root_of(args) / "probe" / seeded.slug, random_init=random_init)
    by_checkpoint = {str(Path(m["checkpoint"]).resolve()): m for m in result["models"] if not m["random_init"]}
    record["probe"] = by_checkpoint[str(Path(record["checkpoint"]).resolve())]
    record["probe_data"] = result["data"]
    if curve:
        record["curve_probes"] = {
            u: by_checkpoint[str(Path(c).resolve())] for u, c in record["curve_checkpoints"].items()
        }
    if random_init:
        record["random_init_probe"] = next(m for m in result["models"] if m["random_init"] and m["kind"] == "hubert")
    record["probe_s"] = round(time.perf_counter() - started, 1)
    write_cell(path, {"key": key, "record": record})
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--seeds", type=int, default=3, help="pretraining seeds of every run (1: a quick check)")
    parser.add_argument("--s3prl-steps", type=int, default=3000, help="0 skips S3PRL")
    parser.add_argument("--s3prl-jobs", type=int, default=2, help="S3PRL evaluations run side by side")
    parser.add_argument("--s3prl-device", default="cpu")
    add_reuse_arguments(parser)
    args = parse_reuse_arguments(parser)
    started = time.perf_counter()
    timer = Timer()
    data = timer("data", make_data, args)
    records: dict[str, dict] = {run.slug: {"seeds": []} for run in RUNS}

    def checkpoint_of(slug: str, seed: int) -> Path:
        """A run's final checkpoint, trained again if its cell was read back on a checkout without it."""
        record = records[slug]["seeds"][seed]
        if not Path(record["checkpoint"]).is_file():
            run = next(r for r in RUNS if r.slug == slug)
            teacher = checkpoint_of("fedavg-iid", seed) if run.stage == "distill" else None
            train(with_seed(run, seed), data, args, teacher, reuse=True)
        return Path(record["checkpoint"])

    for seed in range(args.seeds):
        for run in RUNS:
            teacher = (lambda seed=seed: checkpoint_of("fedavg-iid", seed)) if run.stage == "distill" else None
            record = timer(with_seed(run, seed).slug, probed_run, run, seed, data, args, teacher)
            records[run.slug]["seeds"].append(record)
    random_init = records["centralized"]["seeds"][0]["random_init_probe"]
    probe_data = records["centralized"]["seeds"][0]["probe_data"]
    for record in records.values():
        record["summary"] = summarise(record["seeds"])
    for slug in CURVE_RUNS:
        probes = records[slug]["seeds"][0]["curve_probes"]
        records[slug]["probe_curve"] = [
            (int(u), 100 * m["accuracy_mean"], 100 * m["accuracy_sd"]) for u, m in probes.items()
        ]
    s3prl_results: dict[str, dict] = {}
    if args.s3prl_steps:
        jobs = []
        for name, slug in [("random-init", "fedavg-iid"), *[(r.slug, r.slug) for r in RUNS if r.s3prl]]:
            run = next(r for r in RUNS if r.slug == slug)
            key = {**cell_key(with_seed(run, 0), args), "s3prl_steps": args.s3prl_steps, "random_init": name != slug}
            path = cells_of(args) / f"s3prl-{name}.json"
            if not args.retrain and (cell := read_cell(path, key, args.only_commit)) is not None:
                s3prl_results[name] = cell["record"]
                continue
            flags = ["--checkpoint", str(checkpoint_of(slug, 0)), *(["--random-init"] if name != slug else [])]
            jobs.append((name, flags, path, key))
        s3prl_results.update(timer("s3prl", s3prl, jobs, data["keywords"], args))
    invocation_s = time.perf_counter() - started
    runs_s = sum((r.get("train_s") or 0.0) + r.get("probe_s", 0.0) for rec in records.values() for r in rec["seeds"])
    reused = sum(
        bool(r.get("read_back") or r.get("reused_from_commit")) for rec in records.values() for r in rec["seeds"]
    )
    # S3PRL: each evaluation's own time (read back with its cell), `--s3prl-jobs` of them side by side.
    s3prl_s = sum(r.get("seconds", 0.0) for r in s3prl_results.values()) / max(1, args.s3prl_jobs)
    wall_s = runs_s + timer.seconds.get("data", 0.0) + s3prl_s
    name = "learning" + variant(args)
    plot(records, random_init, s3prl_results, RESULTS / f"{name}.png")
    figures = figures_of(records, random_init, s3prl_results, wall_s, reused)
    described = describe_data(data)
    write_results(
        name,
        figures,
        notes=(
            f"{args.preset} preset; every trained model {planned(args)} updates of {args.batch_seconds:g} s batches "
            f"(federated: {args.rounds} rounds x {args.local_steps} local steps x {CLIENTS} clients); "
            f"{described['train_hours']} h of training speech from {described['train_speakers']} speakers; "
            f"{args.seeds} pretraining seed(s) per run; probe: {probe_data['clips']} keyword clips of "
            f"{probe_data['speakers']} other speakers, 5 speaker-disjoint folds, accuracies and gaps as mean +- "
            "standard error over seeds x folds (gaps paired over folds, each seed against the same seed); held-out "
            f"gain mean +- SE over seeds; curves and S3PRL ({args.s3prl_steps} steps, Wilson 95% intervals) of seed 0"
        ),
        extra={
            "data": described,
            "runs": records,
            "random_init": random_init,
            "s3prl": s3prl_results,
            "seconds": {**timer.seconds, "total": round(wall_s, 1), "this_invocation": round(invocation_s, 1)},
            "settings": {k: v for k, v in vars(args).items()},
        },
    )


if __name__ == "__main__":
    main()
