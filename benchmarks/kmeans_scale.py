"""Federated k-means at thousands of one-speaker clients: the stage's time and its inertia against a centralized
codebook, with every client in every Lloyd round, with 10% sampled per round, and with 5% of the clients failing.

Inputs: the corpus, partitions and feature caches of `benchmarks/scale.py` (build/bench/scale/<N>/, made once: one
client per speaker, 0.2 min each). Every run is `fedhubert kmeans` with the recipe's K = 100, one MiniBatchKMeans
initialisation per client, at most 30 Lloyd rounds at lloyd.tol = 1e-4 (sampled rounds: mini-batch k-means stopped
after lloyd.patience = 10 rounds without improvement of the smoothed inertia), the initial codebook from at most 200
clients (lloyd.init_clients), the features reused from the cache, and the centralized reference (`reference=true`,
fitted on a uniform sample of at most reference_frames of the pooled frames; both inertias over every frame):

- N = 160, every client per round (lloyd.fraction = 1);
- N = 1600, lloyd.fraction = 0.1 (160 clients a round, as many as the run above);
- N = 1600, lloyd.fraction = 0.1, 5% of the clients failing: a seeded 80 clients raise whenever they are asked
  (tests/reliability/hostile_app, $FEDHUBERT_DRILL_PLAN), so each is left out the first time it is sampled;
- with --with-full: N = 1600, every client per round, at most 3 Lloyd rounds (the cost of a full-participation
  round; README's earlier figure: 41 s a Lloyd round).

Figures: the stage's time (kmeans.json `seconds`: the Flower app's server, from connecting to the record), the time
per Lloyd round (median), the Lloyd rounds run, the relative inertia gap to the centralized codebook, and the
clients left out. Targets: the stage at 1,600 clients with 10% per round within 3x of its time at 160; inertia within
3% of centralized at 1,600 with 10% per round (with and without the failing clients).

    python benchmarks/kmeans_scale.py [--quick] [--with-full]

--quick: N = 16 / 160 (fraction 0.1 at 160, 5% failing = 8 clients), no full run at the larger N, no verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from _common import RESULTS, run_cli, write_results
from scale import ROOT, SEED, corpus, inputs

NAME = "kmeans_scale"
HOSTILE_APP = Path(__file__).resolve().parents[1] / "tests" / "reliability" / "hostile_app"
MAX_ROUNDS = 30
FULL_ROUNDS = 3
FAILING_SHARE = 0.05
COMMON = [
    "--seed",
    str(SEED),
    "minibatch.n_init=1",
    f"lloyd.max_rounds={MAX_ROUNDS}",
    "lloyd.tol=0.0001",
    "lloyd.init_clients=200",
    "reference=true",
]
TARGET_TIME_RATIO = 3.0
TARGET_GAP = 0.03


def failing_plan(n: int, path: Path) -> list[int]:
    """A seeded FAILING_SHARE of the n clients raise in every step they are asked for; the plan file for the
    hostile app."""
    rng = np.random.default_rng([SEED, n])
    failing = sorted(int(c) for c in rng.choice(n, size=max(1, round(FAILING_SHARE * n)), replace=False))
    steps = ["init", "labels", *(f"stats:{r}" for r in range(1, MAX_ROUNDS + 1))]
    path.write_text(json.dumps({str(c): dict.fromkeys(steps, "raise") for c in failing}))
    return failing


def kmeans_run(
    name: str, n: int, fraction: float, made: tuple[Path, dict], *, failing: bool = False, max_rounds: int | None = None
) -> dict:
    """One `fedhubert kmeans` into build/bench/scale/<n>/<name>, on the inputs' feature cache (`made`: the corpus);
    its figures."""
    partition, labels, _ = inputs(n, *made)
    out = ROOT / str(n) / name
    overrides = [*COMMON, f"lloyd.fraction={fraction}", f"feature_dir={labels / 'features'}"]
    if max_rounds is not None:
        overrides.append(f"lloyd.max_rounds={max_rounds}")
    planned: list[int] = []
    if failing:
        plan = ROOT / str(n) / f"{name}-plan.json"
        planned = failing_plan(n, plan)
        os.environ["FEDHUBERT_DRILL_PLAN"] = str(plan)
        overrides.append(f"federation.app={HOSTILE_APP}")
    started = time.perf_counter()
    try:
        run_cli("kmeans", "--partition", partition, "--out", out, "--force", *overrides)
    finally:
        os.environ.pop("FEDHUBERT_DRILL_PLAN", None)
    wall = time.perf_counter() - started
    record = json.loads((out / "kmeans.json").read_text())
    history = record["history"]
    reference = record["reference"]
    return {
        "name": name,
        "clients": n,
        "fraction": fraction,
        "failing_planned": len(planned),
        "overrides": overrides,
        "wall_s": round(wall, 1),
        "stage_s": record["seconds"],
        "exchange_seconds": record["exchange_seconds"],
        "lloyd_rounds": len(history),
        "converged": len(history) < (max_rounds or MAX_ROUNDS),
        "round_s": [h["seconds"] for h in history],
        "median_round_s": statistics.median(h["seconds"] for h in history),
        "clients_per_round": [h["clients"] for h in history],
        "inertia": [h["inertia"] for h in history],
        "sampling_noise": [h["sampling_noise"] for h in history],
        "federated_inertia": reference["federated_inertia"],
        "centralized_inertia": reference["inertia"],
        "relative_gap": reference["relative_gap"],
        "reference_sample_frames": reference["sample_frames"],
        "failed_clients": len(record["failed_clients"]),
        "failed_planned_left_out": len({f["client"] for f in record["failed_clients"]} & set(planned)),
        "labelled_clients": len(record["clients"]),
    }


def figures_for(runs: dict[str, dict], small: int, large: int, quick: bool) -> list[dict]:
    def verdict(ok: bool) -> bool | None:
        return None if quick else ok

    figures = []
    for run in runs.values():
        label = f"k-means N={run['clients']}, fraction {run['fraction']:g}" + (
            f", {run['failing_planned']} failing" if run["failing_planned"] else ""
        )
        figures.append({"figure": f"{label}: stage time", "ours": round(run["stage_s"], 1), "unit": "s"})
        figures.append(
            {
                "figure": f"{label}: Lloyd round (median of {run['lloyd_rounds']})",
                "ours": round(run["median_round_s"], 2),
                "unit": "s",
            }
        )
        gap = {"figure": f"{label}: inertia vs centralized", "ours": f"{100 * run['relative_gap']:+.2f}", "unit": "%"}
        if run["clients"] == large and run["fraction"] < 1:
            gap.update(target=f"<= +{100 * TARGET_GAP:.0f}", met=verdict(run["relative_gap"] <= TARGET_GAP))
        figures.append(gap)
        if run["failing_planned"]:
            figures.append(
                {
                    "figure": f"{label}: clients left out / labelled",
                    "ours": f"{run['failed_clients']} / {run['labelled_clients']}",
                    "unit": "clients",
                }
            )
    if "full_small" in runs and "sampled_large" in runs:
        ratio = runs["sampled_large"]["stage_s"] / runs["full_small"]["stage_s"]
        figures.append(
            {
                "figure": f"k-means stage time N={large} (10%) / N={small} (all)",
                "ours": round(ratio, 2),
                "unit": "x",
                "target": f"<= {TARGET_TIME_RATIO:g}",
                "met": verdict(ratio <= TARGET_TIME_RATIO),
            }
        )
    return figures


def plot(runs: dict[str, dict], path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    ax_inertia, ax_time = fig.subplots(1, 2)
    for run in runs.values():
        label = f"N={run['clients']}, {run['fraction']:g}" + (" + failing" if run["failing_planned"] else "")
        rounds = np.arange(1, run["lloyd_rounds"] + 1)
        inertia = np.array(run["inertia"]) / run["centralized_inertia"] - 1
        ax_inertia.plot(rounds, 100 * inertia, marker="o", markersize=3, label=label)
        ax_time.plot(rounds, run["round_s"], marker="o", markersize=3, label=label)
    ax_inertia.axhline(100 * TARGET_GAP, color="grey", linestyle=":", label="target gap")
    ax_inertia.set(
        xlabel="Lloyd round", ylabel="round's inertia vs centralized (%)", title="inertia (sampled estimate)"
    )
    ax_time.set(xlabel="Lloyd round", ylabel="seconds", title="time per Lloyd round")
    for ax in (ax_inertia, ax_time):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="N = 16 / 160, no verdicts")
    parser.add_argument("--with-full", action="store_true", help="also every client per round at the larger N")
    args = parser.parse_args()
    small, large = (16, 160) if args.quick else (160, 1600)
    started = time.perf_counter()
    made = corpus(large)  # the smaller N sample its speakers
    runs = {
        "full_small": kmeans_run("kmeans-full", small, 1.0, made),
        "sampled_large": kmeans_run("kmeans-sampled", large, 0.1, made),
        "failing_large": kmeans_run("kmeans-failing", large, 0.1, made, failing=True),
    }
    if args.with_full:
        runs["full_large"] = kmeans_run("kmeans-full", large, 1.0, made, max_rounds=FULL_ROUNDS)
    plot(runs, RESULTS / f"{NAME}.png")
    notes = [
        "QUICK CHECK (shrunk sizes, no verdicts)" if args.quick else "",
        "one-speaker clients of benchmarks/scale.py's synthetic corpus (0.2 min each); K=100, one MiniBatchKMeans "
        f"init per client, at most {MAX_ROUNDS} Lloyd rounds (tol 1e-4; sampled rounds: mini-batch k-means, "
        "patience 10), initial codebook from at most 200 clients, features from the cache; stage time = kmeans.json "
        "seconds (the ServerApp's, connect to record); inertia gap = federated over centralized - 1 on every "
        "training frame",
        f"the full run at N={large} stops after {FULL_ROUNDS} rounds (its cost per round, not its convergence)"
        if "full_large" in runs
        else "",
    ]
    write_results(
        NAME,
        figures_for(runs, small, large, args.quick),
        "; ".join(n for n in notes if n),
        extra={
            "quick": args.quick,
            "seconds": round(time.perf_counter() - started),
            "plot": str((RESULTS / f"{NAME}.png").relative_to(RESULTS.parent)),
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
