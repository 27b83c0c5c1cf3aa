"""Does federated pretraining learn with its defaults? Frozen features of the pretrained teacher against the same
architecture at random init, and the server's held-out gain over the label-frequency baseline.

The measurement of issue 15's "done when": a default federated run with only the preset and the run length chosen
for a CPU (`--preset tiny --rounds 20 --local-steps 10`, 4 clients, about 35 minutes of synthetic speech from 11
training speakers), then `fedhubert probe` (logistic regression on mean-pooled frozen layers, speaker-disjoint
5-fold cross-validation) on about 1,000 synthetic keyword clips of 40 other speakers. Variants change one thing
each against the defaults (`--variant NAME:KEY=VALUE,KEY=VALUE`), e.g. the server optimizer; each is its own run
of the same length, so all see the same compute.

Targets: every default run's probe score at least 10 points above random init, and its server-side held-out gain
over the frequency baseline above 0.3 nats by the last round. The corpora and labels are made once under
build/bench/learning/ (delete it to remake them); the runs are made again each time.

    python benchmarks/learning.py [--rounds 20] [--local-steps 10] [--variant fedadam:strategy.name=fedadam ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _common import RESULTS, run_cli, write_results

from fedhubert.plots import plt, save_figure

ROOT = Path(__file__).resolve().parents[1] / "build" / "bench" / "learning"
PROBE_TARGET_POINTS = 10.0
GAIN_TARGET_NATS = 0.3
SPEAKERS, MINUTES = 15, 3.2  # the synthetic pretraining corpus (about 11 training speakers, 35 minutes)
PRESET = "tiny"


def inputs(normalize: str) -> tuple[Path, Path, Path]:
    """The pretraining corpus, its 4-client partition, k-means labels (K=100) and the keyword clips."""
    corpus, partition, keywords = ROOT / "LibriSpeech", ROOT / "partition", ROOT / "speech_commands"
    kmeans = ROOT / f"kmeans-{normalize}"
    if not (partition / "partition.json").is_file():
        shutil.rmtree(ROOT, ignore_errors=True)
        run_cli("synth", "librispeech", "--out", corpus, "--speakers", SPEAKERS, "--minutes", MINUTES)
        run_cli("partition", "--corpus", corpus, "--out", partition, "--clients", 4)
    if not (keywords / "run.json").is_file():
        run_cli("synth", "speech-commands", "--out", keywords, "--seed", 7, "--force")
    if not (kmeans / "kmeans.json").is_file():
        run_cli("kmeans", "--partition", partition, "--out", kmeans, "--force", f"features.normalize={normalize}")
    return partition, kmeans, keywords


def rows(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def pretrain(name: str, overrides: list[str], partition: Path, kmeans: Path, rounds: int, local_steps: int) -> dict:
    out = ROOT / "runs" / name
    started = time.perf_counter()
    run_cli("pretrain", "--partition", partition, "--kmeans", kmeans, "--out", out, "--preset", PRESET, "--rounds",
            rounds, "--local-steps", local_steps, "--force", *overrides)
    evals = rows(out, "eval")
    steps = rows(out, "train")
    return {"name": name, "overrides": overrides, "out": str(out), "seconds": round(time.perf_counter() - started, 1),
            "checkpoint": str(out / "checkpoints" / "final.pt"),
            "gain_by_round": [[r["round"], r["gain_nats"]] for r in evals],
            "gain_last": evals[-1]["gain_nats"], "predicted_clusters_last": evals[-1]["predicted_clusters"],
            "step_ratio_mean": sum(r["step_ratio"] for r in steps) / len(steps),
            "step_cosine_mean": sum(r["step_cosine"] for r in steps) / len(steps),
            "learning": json.loads((out / "run.json").read_text())["summary"].get("learning")}


def probe(runs: list[dict], keywords: Path) -> dict:
    out = ROOT / "probe"
    flags = [a for run in runs for a in ("--checkpoint", run["checkpoint"])]
    run_cli("probe", "--dataset", keywords, *flags, "--random-init", "--out", out, "--force")
    return json.loads((out / "probe.json").read_text())


def plot(runs: list[dict], random_init: dict, path: Path) -> None:
    fig, (ax_probe, ax_gain) = plt.subplots(1, 2, figsize=(12, 4))
    names = ["random init", *[r["name"] for r in runs]]
    means = [100 * random_init["accuracy_mean"], *[100 * r["probe"]["accuracy_mean"] for r in runs]]
    sds = [100 * random_init["accuracy_sd"], *[100 * r["probe"]["accuracy_sd"] for r in runs]]
    ax_probe.bar(names, means, yerr=sds, capsize=4, color=["grey", *["tab:blue"] * len(runs)])
    ax_probe.set(ylabel="accuracy (%)", title="linear probe of frozen features (5-fold, speaker-disjoint)")
    ax_probe.tick_params(axis="x", rotation=20)
    for run in runs:
        ax_gain.plot(*zip(*run["gain_by_round"]), "-o", label=run["name"], markersize=3)
    ax_gain.axhline(0.0, color="grey", linestyle="--", linewidth=1, label="frequency baseline")
    ax_gain.axhline(GAIN_TARGET_NATS, color="green", linestyle=":", linewidth=1, label="target")
    ax_gain.set(xlabel="round", ylabel="nats per masked frame", title="server held-out gain over the baseline")
    ax_gain.legend(fontsize="small")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--normalize", default="none", help="features.normalize of the k-means labels")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a run that changes these keys against the defaults (repeatable)")
    args = parser.parse_args()
    partition, kmeans, keywords = inputs(args.normalize)
    variants = [("defaults", [])] + [(v.split(":", 1)[0], [o for o in v.split(":", 1)[1].split(",") if o])
                                     for v in args.variant]
    runs = [pretrain(name, overrides, partition, kmeans, args.rounds, args.local_steps) for name, overrides in variants]
    result = probe(runs, keywords)
    random_init = next(m for m in result["models"] if m["random_init"])
    trained = {Path(m["checkpoint"]).resolve(): m for m in result["models"] if not m["random_init"]}
    for run in runs:
        run["probe"] = trained[Path(run["checkpoint"]).resolve()]
    chance = result["data"]["chance"]
    figures = [{"figure": f"probe accuracy, random init ({PRESET})",
                "ours": f"{100 * random_init['accuracy_mean']:.1f} +- {100 * random_init['accuracy_sd']:.1f}",
                "unit": "%", "reference": f"chance {100 * chance:.1f}"}]
    for run in runs:
        gain_points = 100 * (run["probe"]["accuracy_mean"] - random_init["accuracy_mean"])
        figures += [
            {"figure": f"probe accuracy, {run['name']}", "ours": f"{100 * run['probe']['accuracy_mean']:.1f} +- "
             f"{100 * run['probe']['accuracy_sd']:.1f}", "unit": "%",
             "target": f">= random init + {PROBE_TARGET_POINTS:g}", "met": gain_points >= PROBE_TARGET_POINTS},
            {"figure": f"held-out gain over frequency baseline, {run['name']}, last round",
             "ours": round(run["gain_last"], 3), "unit": "nats", "target": f"> {GAIN_TARGET_NATS}",
             "met": run["gain_last"] > GAIN_TARGET_NATS},
        ]
    plot(runs, random_init, RESULTS / "learning.png")
    write_results("learning", figures, notes=(
        f"{PRESET} preset, {args.rounds} rounds x {args.local_steps} local steps, 4 clients, k-means "
        f"features.normalize={args.normalize}; probe: {result['data']['clips']} keyword clips, mean +- sd over 5 speaker-"
        f"disjoint folds; one pretraining seed per run"),
        extra={"runs": runs, "random_init": random_init, "normalize": args.normalize})


if __name__ == "__main__":
    main()
