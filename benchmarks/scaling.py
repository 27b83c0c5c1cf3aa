"""How cost grows: training-step time and saved activations against crop length and model size, and federated
round time against the number of clients (Flower simulation). Each series gets a fitted growth law (a power law
a * x^b for the step, a line a + b * n for rounds), a table in benchmarks/results/scaling.json and a PNG plot
(benchmarks/results/scaling_*.png).

Usage: python benchmarks/scaling.py [--presets tiny small base] [--seconds 2 4 8 16] [--clients 2 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from _common import RESULTS, run_cli, write_results
from fedhubert.config import load_config
from fedhubert.model.config import ModelConfig
from fedhubert.model.frames import feature_frames
from fedhubert.model.hubert import build_hubert
from fedhubert.plots import save_figure
from fedhubert.train.config import LossConfig, TrainConfig
from fedhubert.train.loop import MaskedPrediction, make_optimizer, train
from train_step import batches, saved_bytes

ROOT = Path(__file__).resolve().parents[1] / "build" / "bench" / "scaling"
K = 100


def step_seconds(preset: str, seconds: float, repeats: int) -> tuple[float, int]:
    """Best time of one training update on a batch of one crop of `seconds`, and its saved activations."""
    cfg = load_config(ModelConfig, None, [f"preset={preset}"])
    data = batches(1, seconds, repeats + 1, lambda n: feature_frames(n, cfg))
    torch.manual_seed(0)
    model = build_hubert(cfg, K)
    memory = saved_bytes(model, data[0])
    tcfg = load_config(
        TrainConfig, None, ["device=cpu", "optim.lr=5e-4", "optim.warmup_steps=1", "optim.total_steps=100000"]
    )
    optimizer = make_optimizer(model, tcfg.optim)
    objective = MaskedPrediction(LossConfig())
    train(
        model,
        iter(data[:1]),
        tcfg,
        objective=objective,
        steps=1,
        global_step=0,
        optimizer=optimizer,
        device=torch.device("cpu"),
    )
    best = float("inf")
    for i, batch in enumerate(data[1:], start=1):
        start = time.perf_counter()
        train(
            model,
            iter([batch]),
            tcfg,
            objective=objective,
            steps=1,
            global_step=i,
            optimizer=optimizer,
            device=torch.device("cpu"),
        )
        best = min(best, time.perf_counter() - start)
    return best, memory


def power_law(x: list[float], y: list[float]) -> tuple[float, float]:
    """a, b of y = a * x^b (least squares in log-log)."""
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(log_a)), float(b)


def round_seconds(clients: list[int], rounds: int) -> dict[int, float]:
    """Median round time of tiny-preset pretraining with n clients (the server loop's own timing per round)."""
    corpus = ROOT / "corpus"
    if not (corpus / "SPEAKERS.TXT").is_file():
        shutil.rmtree(ROOT, ignore_errors=True)
        run_cli(
            "synth",
            "librispeech",
            "--out",
            corpus,
            "--speakers",
            max(clients) * 2,
            "--minutes",
            "0.2",
            "chapters=1",
            "max_seconds=6",
        )
    times = {}
    for n in clients:
        partition, kmeans, out = ROOT / f"partition-{n}", ROOT / f"kmeans-{n}", ROOT / f"pretrain-{n}"
        if not (kmeans / "kmeans.json").is_file():
            run_cli("partition", "--corpus", corpus, "--out", partition, "--clients", n, "--force")
            run_cli(
                "kmeans",
                "--partition",
                partition,
                "--out",
                kmeans,
                "--clusters",
                "16",
                "--mode",
                "per-client",
                "sample_fraction=1",
                "minibatch.n_init=1",
                "reference=false",
                "--force",
            )
        run_cli(
            "pretrain",
            "--partition",
            partition,
            "--kmeans",
            kmeans,
            "--out",
            out,
            "--force",
            "--preset",
            "tiny",
            "--rounds",
            rounds,
            "--local-steps",
            "2",
            "train.device=cpu",
            "train.data.min_seconds=1",
            "train.data.max_seconds=3",
            "train.data.batch_seconds=6",
            "evaluate_every=1000",
        )
        rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
        times[n] = float(np.median([r["seconds"] for r in rows]))
    return times


def plot(
    path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list, object]], log: bool
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y, fit) in series.items():
        (line,) = ax.plot(x, y, "o", label=name)
        grid = np.linspace(min(x), max(x), 50)
        ax.plot(grid, fit(grid), "-", color=line.get_color(), alpha=0.6)
    if log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--seconds", nargs="+", type=float, default=[2, 4, 8, 16])
    parser.add_argument("--clients", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures, step_series, memory_series = [], {}, {}
    for preset in args.presets:
        seconds, memory = [], []
        for length in args.seconds:
            t, m = step_seconds(preset, length, args.repeats)
            seconds.append(t)
            memory.append(m / 2**20)
            figures.append({"figure": f"{preset}, {length:g} s crop: training step", "ours": round(t, 3), "unit": "s"})
            figures.append(
                {
                    "figure": f"{preset}, {length:g} s crop: saved activations",
                    "ours": round(m / 2**20, 1),
                    "unit": "MiB",
                }
            )
        (ta, tb), (ma, mb) = power_law(args.seconds, seconds), power_law(args.seconds, memory)
        figures.append({"figure": f"{preset}: step time ~ length^b, b", "ours": round(tb, 2), "unit": "exponent"})
        figures.append({"figure": f"{preset}: activations ~ length^b, b", "ours": round(mb, 2), "unit": "exponent"})
        step_series[f"{preset} (b={tb:.2f})"] = (args.seconds, seconds, lambda x, a=ta, b=tb: a * x**b)
        memory_series[f"{preset} (b={mb:.2f})"] = (args.seconds, memory, lambda x, a=ma, b=mb: a * x**b)
    plot(
        RESULTS / "scaling_step_time.png",
        "training step (batch of one crop, CPU)",
        "crop length (s)",
        "seconds per update",
        step_series,
        log=True,
    )
    plot(
        RESULTS / "scaling_activations.png",
        "saved activations of one update",
        "crop length (s)",
        "MiB",
        memory_series,
        log=True,
    )
    rounds = round_seconds(args.clients, args.rounds)
    n, t = list(rounds), list(rounds.values())
    slope, intercept = np.polyfit(n, t, 1)
    for clients, seconds in rounds.items():
        figures.append(
            {
                "figure": f"federated round, {clients} clients (tiny, 2 steps each)",
                "ours": round(seconds, 2),
                "unit": "s",
            }
        )
    figures.append(
        {
            "figure": "federated round time per added client (linear fit)",
            "ours": round(float(slope), 3),
            "unit": "s/client",
        }
    )
    figures.append(
        {"figure": "federated round time, fixed part (linear fit)", "ours": round(float(intercept), 3), "unit": "s"}
    )
    plot(
        RESULTS / "scaling_rounds.png",
        "federated round time (simulation, CPU)",
        "clients",
        "seconds per round",
        {f"tiny, 2 local steps ({slope:.2f} s/client + {intercept:.2f} s)": (n, t, lambda x: intercept + slope * x)},
        log=False,
    )
    write_results(
        "scaling",
        figures,
        notes=f"CPU ({torch.get_num_threads()} threads), fp32, batch of one crop, best of "
        f"{args.repeats} updates; rounds: median of {args.rounds} rounds, clients trained one after another "
        f"on the machine's cores; plots: benchmarks/results/scaling_*.png",
    )


if __name__ == "__main__":
    main()
