"""Which server optimiser learns, and with what settings: FedAdam and FedYogi over eta x tau, with the clients on
AdamW and on SGD with momentum, beside FedAvg and FedAvgM, at the learning benchmark's data and model.

The data are `benchmarks/learning.py`'s (made once under build/bench/learning/; the IID partition of 4 clients, its
federated K=100 codebook, the keyword set of other speakers for the probe). Every cell is one `fedhubert pretrain`
(learning.py's `train`), in three stages:

1. client rates: FedAvg with SGD clients (momentum 0.9) at train.optim.lr in SGD_RATES; the best by held-out gain is
   the SGD clients' rate for the rest (AdamW clients start at the preset's rate, PRESET_LR);
2. screen (`--screen-rounds`, default 6 of the learning benchmark's 15 rounds): FedAvg with AdamW clients (the
   reference at screen length), FedAdam and FedYogi over ETAS x TAUS with AdamW clients, FedAdam over the same grid
   with SGD clients, FedAvgM (eta 1, momentum 0.9) with both, and FedAdam without its server momentum (beta_1 0,
   tau 1e-3) over ETAS with AdamW clients;
3. refine (the learning benchmark's full compute: `--rounds` x `--local-steps` x 4 clients): FedAvg with both client
   optimisers; the best screened FedAdam cell (by held-out gain, see `gain`) with AdamW clients, with and without
   server momentum, each with eta x 1, x 0.5 and x 2, and beside it the one whose step ratio is nearest 1 (the
   step that follows the clients; at 6 rounds the gain favours large steps that settle at the label prior); the
   best with SGD clients; the best of these with the client
   rate x 0.5 and x 2; the best FedYogi and FedAvgM cells.

`--reuse` reads back a cell whose folder holds a completed run of the same command (the record names the commit
that made it), so that a sweep stopped part-way, or one whose later stages change, does not train its cells again.

Per cell: held-out masked cross-entropy gain over the label-frequency baseline (dev-clean, the shared codebook), the
clusters predicted, the server's step against the clients' mean change (step_ratio and step_cosine, median over the
rounds; FedAvg gives 1 and 1), and the linear probe of frozen features (learning.py's: speaker-disjoint 5-fold
cross-validation; gaps to FedAvg paired over the folds). One pretraining seed per cell (the seeded learning
benchmark measures the seed-to-seed spread). Target (issue 28): a FedAdam setting that learns (gain > 0, > 10
clusters, probe above random init beyond the error bars), and how far it is from FedAvg.

    python benchmarks/server_opt.py [--quick] [--screen-rounds 6] [learning.py's data and compute flags]

--quick: 2 rounds of 2 local steps, one rate and the grid's corners only; a check that every stage runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from _common import RESULTS, write_results
from fedhubert.model.config import PRESET_LR
from fedhubert.plots import plt, save_figure
from learning import Run, Timer, add_arguments, fold_gap, make_data, pm, probe, rows, train

NAME = "server_opt"
ETAS = (1e-3, 1e-2, 3e-2, 1e-1)
TAUS = (1e-3, 1e-2, 1e-1)
SGD_RATES = (0.01, 0.03, 0.1, 0.3)
MOMENTUM = 0.9
MIN_CLUSTERS = 10


def cell(
    slug: str,
    strategy: str,
    client: str,
    lr: float,
    eta: float | None = None,
    tau: float | None = None,
    beta_1: float | None = None,
):
    """A Run of learning.py for one cell, and what it stands for (beta_1: FedAdam's first-moment decay, where not
    the default 0.9)."""
    overrides = [f"strategy.name={strategy}"]
    if eta is not None:
        overrides.append(f"strategy.eta={eta:g}")
    if tau is not None:
        overrides.append(f"strategy.tau={tau:g}")
    if beta_1 is not None:
        overrides.append(f"strategy.beta_1={beta_1:g}")
    if strategy == "fedavgm":
        overrides.append(f"strategy.momentum={MOMENTUM}")
    if client == "sgd":
        overrides += ["train.optim.name=sgd", f"train.optim.momentum={MOMENTUM}"]
    overrides.append(f"train.optim.lr={lr:g}")
    run = Run(f"so-{slug}", "pretrain", "iid", overrides=overrides)
    return run, {"strategy": strategy, "client": client, "lr": lr, "eta": eta, "tau": tau, "beta_1": beta_1}


def measured(run: Run, spec: dict, data: dict, args: argparse.Namespace, stage: str) -> dict:
    record = train(run, data, args, None, reuse=args.reuse)
    train_rows = rows(Path(record["out"]) / "metrics.jsonl", "train")
    ratios = [r["step_ratio"] for r in train_rows if r.get("step_ratio") is not None]
    cosines = [r["step_cosine"] for r in train_rows if r.get("step_cosine") is not None]
    return {
        **spec,
        "slug": run.slug,
        "stage": stage,
        "train_s": json.loads((Path(record["out"]) / "run.json").read_text())["elapsed_s"],
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "checkpoint": record["checkpoint"],
        "gain": record.get("gain_last"),
        "clusters": record.get("predicted_clusters_last"),
        "step_ratio": statistics.median(ratios) if ratios else None,
        "step_cosine": statistics.median(cosines) if cosines else None,
        "overrides": run.overrides,
        **({"reused_from_commit": record["reused_from_commit"]} if "reused_from_commit" in record else {}),
    }


def gain(record: dict) -> float:
    """Selection between cells: the held-out gain. Not the clusters predicted: in the screen's 6 rounds a cell that
    has reached the label prior (gain near 0, few clusters) is further along than one still near its random init
    (gain -0.5, many clusters), as FedAvg's own curve passes through the prior; the clusters count in the verdict, at
    full compute."""
    return record["gain"] if record["gain"] is not None and math.isfinite(record["gain"]) else -math.inf


def learns(record: dict) -> bool:
    return record["gain"] is not None and record["gain"] > 0 and (record["clusters"] or 0) > MIN_CLUSTERS


def label(r: dict) -> str:
    parts = [r["strategy"], r["client"], f"lr {r['lr']:g}"]
    if r["eta"] is not None:
        parts.append(f"eta {r['eta']:g}")
    if r["tau"] is not None:
        parts.append(f"tau {r['tau']:g}")
    if r.get("beta_1") is not None:
        parts.append(f"beta_1 {r['beta_1']:g}")
    return ", ".join(parts)


def plot(records: list[dict], path: Path) -> None:
    """Top: held-out gain over the eta x tau grid of each screened FedAdam/FedYogi family (a cross: <= MIN_CLUSTERS
    clusters predicted). Bottom: every refined cell's probe gap to FedAvg with AdamW clients."""
    families = sorted(
        {(r["strategy"], r["client"], r.get("beta_1")) for r in records if r["stage"] == "screen" and r["tau"]},
        key=str,
    )
    refined = [r for r in records if r["stage"] == "refine" and "probe_gap" in r]
    columns = max(len(families), 1)
    fig = plt.figure(figsize=(5.2 * columns, 4.0 + 0.32 * max(len(refined), 4)))
    grid_spec = fig.add_gridspec(2, columns, height_ratios=[4.0, 0.32 * max(len(refined), 4)])
    for column, (strategy, client, beta_1) in enumerate(families):
        ax = fig.add_subplot(grid_spec[0, column])
        grid = np.full((len(TAUS), len(ETAS)), np.nan)
        for r in records:
            if (r["strategy"], r["client"], r.get("beta_1"), r["stage"]) != (strategy, client, beta_1, "screen"):
                continue
            if r["gain"] is None:
                continue
            if r["tau"] in TAUS and r["eta"] in ETAS:
                y, x = TAUS.index(r["tau"]), ETAS.index(r["eta"])
                grid[y, x] = r["gain"]
                ax.text(x, y, f"{r['gain']:.2f}", ha="center", va="center", fontsize=8, color="white")
                if (r["clusters"] or 0) <= MIN_CLUSTERS:
                    ax.plot(x, y + 0.3, "rx", markersize=6)
        image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(ETAS)), [f"{e:g}" for e in ETAS])
        ax.set_yticks(range(len(TAUS)), [f"{t:g}" for t in TAUS])
        momentum = f", beta_1 {beta_1:g}" if beta_1 is not None else ""
        ax.set(xlabel="eta", ylabel="tau", title=f"{strategy}{momentum}, {client} clients: held-out gain (nats)")
        fig.colorbar(image, ax=ax, shrink=0.85)
    if refined:
        ax = fig.add_subplot(grid_spec[1, :])
        ys = np.arange(len(refined))
        ax.errorbar([r["probe_gap"] for r in refined], ys, xerr=[r["probe_gap_sd"] for r in refined], fmt="o")
        ax.set_yticks(ys, [label(r) for r in refined], fontsize=8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set(xlabel="probe gap to FedAvg with AdamW clients (points; sd over 5 folds)", title="refined cells")
    save_figure(fig, path)


def figures_for(records: list[dict], random_init: dict, quick: bool, wall_s: float) -> list[dict]:
    figures = []
    refined = [r for r in records if r["stage"] == "refine"]
    for r in refined:
        figures.append(
            {
                "figure": f"{label(r)}: gain / clusters / step ratio / cosine",
                "ours": f"{r['gain']:.3f} / {r['clusters']} / {r['step_ratio']:.2f} / {r['step_cosine']:.2f}"
                if r["gain"] is not None and r["step_ratio"] is not None
                else f"{r['gain']} / {r['clusters']}",
                "unit": "nats / - / x / -",
            }
        )
        figures.append(
            {
                "figure": f"{label(r)}: probe gap to FedAvg",
                "ours": pm(r["probe_gap"], r["probe_gap_sd"]),
                "unit": "points",
            }
        )
    fedadam = [r for r in refined if r["strategy"] == "fedadam"]
    if fedadam:
        best = max(fedadam, key=lambda r: (learns(r), gain(r), r["probe"]["accuracy_mean"]))
        gap, sd = fold_gap(best["probe"], random_init)
        figures.append(
            {
                "figure": f"best FedAdam ({label(best)}) learns (gain > 0, > {MIN_CLUSTERS} clusters, probe > random)",
                "ours": f"gain {best['gain']:.3f}, {best['clusters']} clusters, probe {pm(gap, sd)} over random init",
                "unit": "",
                "target": "yes",
                "met": None if quick else learns(best) and gap > sd,
            }
        )
        figures.append(
            {
                "figure": "best FedAdam - FedAvg (probe)",
                "ours": pm(best["probe_gap"], best["probe_gap_sd"]),
                "unit": "points",
                "target": "within the error bar",
                "met": None if quick else best["probe_gap"] >= -best["probe_gap_sd"],
            }
        )
    figures.append({"figure": "cells run (all stages)", "ours": len(records), "unit": "pretraining runs"})
    reused = sum("reused_from_commit" in r for r in records)
    figures.append(
        {
            "figure": "the cells' training time, summed (each cell's run.json elapsed_s)",
            "ours": round(sum(r["train_s"] for r in records) / 60, 1),
            "unit": "min",
            "target": "~90",
        }
    )
    figures.append(
        {
            "figure": f"this invocation, wall time ({reused} of {len(records)} cells read back with --reuse)",
            "ours": round(wall_s / 60, 1),
            "unit": "min",
        }
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    add_arguments(parser)
    parser.add_argument("--screen-rounds", type=int, default=6, help="rounds of each screened cell")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 steps, the grid's corners; no verdicts")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read back cells whose folder holds a completed run of the same command instead of training them again",
    )
    args = parser.parse_args()
    etas, taus, rates = (ETAS, TAUS, SGD_RATES) if not args.quick else ((ETAS[0], ETAS[-1]), (TAUS[0],), (0.1,))
    if args.quick:
        args.rounds, args.local_steps, args.screen_rounds, args.probe_every = 2, 2, 2, 2
    full = copy.copy(args)
    screen = copy.copy(args)
    screen.rounds = min(args.screen_rounds, args.rounds)
    screen.probe_every = screen.rounds
    full.probe_every = full.rounds
    started = time.perf_counter()
    timer = Timer()
    data = timer("data", make_data, args)
    records: list[dict] = []

    def go(slug: str, stage: str, namespace, *spec, **keys) -> dict:
        run, described = cell(slug, *spec, **keys)
        record = timer(run.slug, measured, run, described, data, namespace, stage)
        records.append(record)
        print(f"[server_opt] {stage} {label(record)}: gain {record['gain']}, clusters {record['clusters']}, step "
              f"ratio {record['step_ratio']}, cosine {record['step_cosine']}", flush=True)  # fmt: skip
        return record

    adamw_lr = PRESET_LR[args.preset]
    fitted = [go(f"rates-fedavg-sgd-lr{lr:g}", "rates", screen, "fedavg", "sgd", lr) for lr in rates]
    sgd_lr = max(fitted, key=gain)["lr"]
    rate = {"adamw": adamw_lr, "sgd": sgd_lr}
    screened = [go("screen-fedavg-adamw", "screen", screen, "fedavg", "adamw", adamw_lr)]
    for strategy, client in (("fedadam", "adamw"), ("fedyogi", "adamw"), ("fedadam", "sgd")):
        for eta in etas:
            for tau in taus:
                slug = f"screen-{strategy}-{client}-eta{eta:g}-tau{tau:g}"
                screened.append(go(slug, "screen", screen, strategy, client, rate[client], eta=eta, tau=tau))
    for client in ("adamw", "sgd"):
        screened.append(go(f"screen-fedavgm-{client}", "screen", screen, "fedavgm", client, rate[client], eta=1.0))
    for eta in etas:  # FedAdam without its server momentum: which of momentum and normalisation costs more
        slug = f"screen-fedadam-adamw-eta{eta:g}-tau{taus[0]:g}-beta1-0"
        screened.append(go(slug, "screen", screen, "fedadam", "adamw", adamw_lr, eta=eta, tau=taus[0], beta_1=0.0))

    def best(strategy: str, client: str | None = None, **keys) -> dict:
        return max(
            (
                r
                for r in screened
                if r["strategy"] == strategy
                and client in (None, r["client"])
                and all(r.get(k) == v for k, v in keys.items())
            ),
            key=gain,
        )

    def following(strategy: str, client: str, **keys) -> dict:
        return min(
            (
                r
                for r in screened
                if (r["strategy"], r["client"]) == (strategy, client)
                and all(r.get(k) == v for k, v in keys.items())
                and r["step_ratio"]
            ),
            key=lambda r: abs(math.log(r["step_ratio"])),
        )

    refine = [("fedavg", client, rate[client], None, None, None) for client in ("adamw", "sgd")]
    # Each FedAdam family: with AdamW clients (with and without server momentum) its best and eta x 0.5 and x 2;
    # with SGD clients its best; the best of all with the client rate x 0.5 and x 2.
    families = {
        ("adamw", None): (1, 0.5, 2),
        ("adamw", 0.0): (1, 0.5, 2),
        ("sgd", None): (1,),
    }
    fedadam = []
    for (client, beta_1), factors in families.items():
        c = best("fedadam", client, beta_1=beta_1)
        fedadam.append(c)
        refine += [("fedadam", client, c["lr"], c["eta"] * k, c["tau"], beta_1) for k in factors]
        if client == "adamw":  # and the cell whose step follows its clients most closely: ratio nearest 1
            c = following("fedadam", client, beta_1=beta_1)
            refine.append(("fedadam", client, c["lr"], c["eta"], c["tau"], beta_1))
    if not args.quick:
        top = max(fedadam, key=gain)
        refine += [
            ("fedadam", top["client"], top["lr"] * k, top["eta"], top["tau"], top.get("beta_1")) for k in (0.5, 2)
        ]
    for strategy in ("fedyogi", "fedavgm"):
        c = best(strategy)
        refine.append((strategy, c["client"], c["lr"], c["eta"], c["tau"], c.get("beta_1")))
    for strategy, client, lr, eta, tau, beta_1 in dict.fromkeys(refine):
        slug = "-".join(
            ["refine", strategy, client, f"lr{lr:g}"]
            + ([f"eta{eta:g}"] if eta else [])
            + ([f"tau{tau:g}"] if tau else [])
            + ([f"beta1-{beta_1:g}"] if beta_1 is not None else [])
        )
        go(slug, "refine", full, strategy, client, lr, eta=eta, tau=tau, beta_1=beta_1)
    result = timer(
        "probe",
        probe,
        [r["checkpoint"] for r in records],
        data["keywords"],
        Path(data["corpus"]).parent / "probe-server-opt",
    )
    by_checkpoint = {Path(m["checkpoint"]).resolve(): m for m in result["models"] if not m["random_init"]}
    random_init = next(m for m in result["models"] if m["random_init"] and m["kind"] == "hubert")
    for r in records:
        r["probe"] = by_checkpoint[Path(r["checkpoint"]).resolve()]
    baseline = next(
        r for r in records if r["stage"] == "refine" and (r["strategy"], r["client"]) == ("fedavg", "adamw")
    )
    for r in records:
        r["probe_gap"], r["probe_gap_sd"] = fold_gap(r["probe"], baseline["probe"])
        r["probe_over_random"], r["probe_over_random_sd"] = fold_gap(r["probe"], random_init)
    wall_s = time.perf_counter() - started
    plot(records, RESULTS / f"{NAME}.png")
    write_results(
        NAME,
        figures_for(records, random_init, args.quick, wall_s),
        ("QUICK CHECK (2 rounds, the grid's corners; no verdicts); " if args.quick else "")
        + f"{args.preset} preset, learning.py's IID partition of 4 clients; screen {screen.rounds} rounds, refine "
        f"{full.rounds} rounds, x {args.local_steps} local steps of {args.batch_seconds:g} s batches; SGD clients at "
        f"lr {sgd_lr:g} (momentum {MOMENTUM}), AdamW clients at the preset's rate; probe gaps paired over 5 "
        "speaker-disjoint folds; one pretraining seed per cell",
        extra={
            "quick": args.quick,
            "sgd_lr": sgd_lr,
            "cells": records,
            "random_init": random_init,
            "seconds": {**timer.seconds, "total": round(wall_s, 1)},
            "settings": {k: v for k, v in vars(args).items()},
            "plot": str((RESULTS / f"{NAME}.png").relative_to(RESULTS.parent)),
        },
    )
    print(json.dumps({"sgd_lr": sgd_lr, "wall_min": round(wall_s / 60, 1)}))


if __name__ == "__main__":
    main()
