"""What client-level differential privacy costs and what it hides: the federated teacher's utility against the epsilon
it reaches, and a linkage attack on the updates the server receives, without and with privacy.

Runs on the learning benchmark's data (benchmarks/learning.py: the same synthetic corpus, IID partition of 4 clients,
federated codebook and keyword set, made once under build/bench/learning/) with its compute (`--rounds` x
`--local-steps` per client, `--batch-seconds` batches, FedAvg):

- no privacy (`privacy.mode=none`); its clients' update lengths (`received_norm`) give the clipping bound: the
  median over all rounds (the README's recipe);
- clipping only (`privacy.mode=client`, that bound, no noise: epsilon is infinite);
- clipping and Gaussian noise at each `--noise` multiplier, added by the clients (`privacy.mode=client`, which
  gives the model and epsilon of mode server: tested), with the (epsilon, delta) of Flower's RDP accountant;
- mode server at the largest noise: the same guarantee for the released models, but the server receives the
  clients' updates as they are.

Measures for each: the held-out gain over the label-frequency baseline (dev-clean, nats per masked frame); the
linear probe of frozen features (`fedhubert probe`: mean +- sd over 5 speaker-disjoint folds; drops against the
no-privacy run paired over the same folds), next to random init; and a linkage attack by the server, which keeps
`privacy.audit_coordinates` coordinates of every update it receives and tells which client sent a round's update
by its cosine similarity to the previous round's updates (accuracy over rounds 2.. and clients, Wilson 95%
interval; chance is 1 in 4). Output: benchmarks/results/privacy.json, its rows in benchmarks/RESULTS.md and
privacy.png (probe and gain against epsilon; attack accuracy per run).

    python benchmarks/privacy.py [--noise 0.01 0.1 1.0] [--delta 1e-5] [--rounds 15] [--local-steps 10]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from _common import RESULTS, write_results
from fedhubert.eval.confidence import wilson_interval
from fedhubert.plots import plt, save_figure
from learning import CLIENTS, Run, Timer, add_arguments, fold_gap, make_data, pm, probe, root_of, rows, train

AUDIT_COORDINATES = 16384


def private_run(name: str, mode: str, clip: float | None, noise: float, delta: float) -> Run:
    overrides = [f"privacy.mode={mode}", f"privacy.audit_coordinates={AUDIT_COORDINATES}"]
    if mode != "none":
        overrides += [
            f"privacy.clip_norm={clip:.6g}",
            f"privacy.noise_multiplier={noise:g}",
            f"privacy.delta={delta:g}",
        ]
    return Run(name, "pretrain", "iid", overrides=overrides)


def with_privacy(record: dict) -> dict:
    out = Path(record["out"])
    summary = json.loads((out / "run.json").read_text())["summary"]
    record["privacy"] = summary.get("privacy")
    clients = rows(out / "metrics.jsonl", "client")
    record["received_norm_median"] = float(np.median([c["received_norm"] for c in clients]))
    train_rows = rows(out / "metrics.jsonl", "train")
    if train_rows and "privacy_clipped_fraction" in train_rows[0]:
        record["clipped_fraction_mean"] = float(np.mean([r["privacy_clipped_fraction"] for r in train_rows]))
    return record


def linkage_attack(out: Path) -> dict:
    """Which client sent each update of round r, guessed as the client whose round r-1 update is the most similar
    (cosine) among those the server received."""
    rounds = sorted((out / "audit").glob("round_*.npz"))
    correct = trials = 0
    previous = None
    for path in rounds:
        audit = np.load(path)
        clients, changes = audit["clients"], audit["changes"].astype(np.float64)
        unit = changes / np.maximum(np.linalg.norm(changes, axis=1, keepdims=True), 1e-30)
        if previous is not None:
            before_clients, before_unit = previous
            guesses = before_clients[np.argmax(unit @ before_unit.T, axis=1)]
            correct += int((guesses == clients).sum())
            trials += len(clients)
        previous = (clients, unit)
    low, high = wilson_interval(correct, trials)
    return {"correct": correct, "trials": trials, "accuracy": correct / trials, "ci95": [low, high]}


def epsilon_of(record: dict) -> float | None:
    """None without privacy; inf with clipping only."""
    return None if record["privacy"] is None else float(record["privacy"]["epsilon"])


def plot(records: dict[str, dict], random_init: dict, path: Path) -> None:
    fig, (ax_probe, ax_gain, ax_attack) = plt.subplots(1, 3, figsize=(19, 4.8))
    noised = [r for r in records.values() if r["privacy"] and r["privacy"]["mode"] == "client"]
    noised = [r for r in noised if epsilon_of(r) < math.inf]
    eps = [epsilon_of(r) for r in noised]
    ax_probe.errorbar(
        eps,
        [100 * r["probe"]["accuracy_mean"] for r in noised],
        yerr=[100 * r["probe"]["accuracy_sd"] for r in noised],
        fmt="-o",
        capsize=4,
        label="Gaussian noise (label: noise multiplier)",
    )
    for r, e in zip(noised, eps, strict=True):
        ax_probe.annotate(f"z={r['privacy']['noise_multiplier']:g}", (e, 100 * r["probe"]["accuracy_mean"]))
    lines = [
        ("no privacy", records["no-privacy"]["probe"], "tab:green"),
        ("clipping only (epsilon infinite)", records["clip-only"]["probe"], "tab:purple"),
        ("random init", random_init, "grey"),
    ]
    for label, model, color in lines:
        mean, sd = 100 * model["accuracy_mean"], 100 * model["accuracy_sd"]
        ax_probe.axhline(mean, color=color, linestyle="--", linewidth=1, label=f"{label}: {mean:.1f} +- {sd:.1f}")
    ax_probe.set(
        xscale="log",
        xlabel="epsilon (delta as configured)",
        ylabel="probe accuracy (%)",
        title="linear probe of frozen features (mean +- sd over 5 folds)",
    )
    ax_probe.legend(fontsize="small")
    ax_gain.plot(eps, [r["gain_last"] for r in noised], "-o", label="Gaussian noise")
    for label, key, color in [("no privacy", "no-privacy", "tab:green"), ("clipping only", "clip-only", "tab:purple")]:
        ax_gain.axhline(records[key]["gain_last"], color=color, linestyle="--", linewidth=1, label=label)
    ax_gain.axhline(0.0, color="grey", linestyle=":", linewidth=1, label="label-frequency baseline")
    ax_gain.set(
        xscale="log",
        xlabel="epsilon",
        ylabel="nats per masked frame",
        title="held-out gain over the frequency baseline (dev-clean)",
    )
    ax_gain.legend(fontsize="small")
    names = list(records)
    accuracy = [100 * records[n]["attack"]["accuracy"] for n in names]
    low = [a - 100 * records[n]["attack"]["ci95"][0] for a, n in zip(accuracy, names, strict=True)]
    high = [100 * records[n]["attack"]["ci95"][1] - a for a, n in zip(accuracy, names, strict=True)]
    ax_attack.bar(names, accuracy, yerr=[low, high], capsize=4, color="tab:red")
    ax_attack.axhline(100 / CLIENTS, color="grey", linestyle="--", linewidth=1, label="chance")
    ax_attack.set(ylabel="accuracy (%)", title="server's linkage attack on received updates (Wilson 95%)")
    ax_attack.tick_params(axis="x", rotation=30)
    ax_attack.legend(fontsize="small")
    save_figure(fig, path)


def figures_of(records: dict[str, dict], random_init: dict, wall_s: float) -> list[dict]:
    base = records["no-privacy"]
    figures = [
        {
            "figure": "probe accuracy, random init",
            "ours": pm(100 * random_init["accuracy_mean"], 100 * random_init["accuracy_sd"]),
            "unit": "%",
        }
    ]
    for slug, r in records.items():
        epsilon = epsilon_of(r)
        where = "no privacy" if epsilon is None else f"epsilon {epsilon:.3g}"
        figures.append(
            {
                "figure": f"probe accuracy, {slug} ({where})",
                "ours": pm(100 * r["probe"]["accuracy_mean"], 100 * r["probe"]["accuracy_sd"]),
                "unit": "%",
            }
        )
        figures.append({"figure": f"held-out gain, {slug}", "ours": round(r["gain_last"], 3), "unit": "nats"})
        attack = r["attack"]
        low, high = attack["ci95"]
        figures.append(
            {
                "figure": f"linkage attack on received updates, {slug}",
                "ours": f"{100 * attack['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]",
                "unit": "%",
                "reference": f"chance {100 / CLIENTS:.0f}%, {attack['trials']} guesses",
            }
        )
        if r is not base:
            gap, sd = fold_gap(r["probe"], base["probe"])
            figures.append(
                {
                    "figure": f"{slug} - no privacy (probe)",
                    "ours": pm(gap, sd),
                    "unit": "points",
                    "reference": "reported with its error bar",
                }
            )
    figures.append({"figure": "whole benchmark, wall time", "ours": round(wall_s / 60, 1), "unit": "min"})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="noise multipliers")
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    started = time.perf_counter()
    timer = Timer()
    data = timer("data", make_data, args)
    records: dict[str, dict] = {}
    base = private_run("no-privacy: FedAvg, IID, no privacy", "none", None, 0.0, args.delta)
    records["no-privacy"] = with_privacy(timer("no-privacy", train, base, data, args, None))
    clip = records["no-privacy"]["received_norm_median"]
    runs = [private_run("clip-only: clipping on the clients, no noise", "client", clip, 0.0, args.delta)]
    runs += [
        private_run(f"noise-{z:g}: clipping and noise multiplier {z:g} on the clients", "client", clip, z, args.delta)
        for z in args.noise
    ]
    loudest = max(args.noise)
    runs.append(
        private_run(f"server-{loudest:g}: as noise-{loudest:g}, on the server", "server", clip, loudest, args.delta)
    )
    for run in runs:
        records[run.slug] = with_privacy(timer(run.slug, train, run, data, args, None))
    for record in records.values():
        record["attack"] = linkage_attack(Path(record["out"]))
    result = timer(
        "probe", probe, [r["checkpoint"] for r in records.values()], data["keywords"], root_of(args) / "probe-privacy"
    )
    by_checkpoint = {Path(m["checkpoint"]).resolve(): m for m in result["models"] if not m["random_init"]}
    random_init = next(m for m in result["models"] if m["random_init"] and m["kind"] == "hubert")
    for r in records.values():
        r["probe"] = by_checkpoint[Path(r["checkpoint"]).resolve()]
    wall_s = time.perf_counter() - started
    plot(records, random_init, RESULTS / "privacy.png")
    write_results(
        "privacy",
        figures_of(records, random_init, wall_s),
        notes=(
            f"{args.preset} preset, federated IID (4 clients, all sampled each round), FedAvg, {args.rounds} rounds x "
            f"{args.local_steps} local steps of {args.batch_seconds:g} s batches; clip_norm {clip:.4g} (the "
            f"no-privacy run's median update norm), delta {args.delta:g}; probe: mean +- sd over 5 speaker-disjoint "
            f"folds, gaps paired over folds; linkage attack on {AUDIT_COORDINATES} coordinates of each received "
            "update; one pretraining seed per run"
        ),
        extra={
            "runs": records,
            "random_init": random_init,
            "clip_norm": clip,
            "seconds": {**timer.seconds, "total": round(wall_s, 1)},
            "settings": dict(vars(args)),
        },
    )


if __name__ == "__main__":
    main()
