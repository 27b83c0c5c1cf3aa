"""Figures and TensorBoard logs of a 2,000-client federation: distributions and quantiles, not a mark or a tag per
client (one-speaker LibriSpeech studies have 1,000-2,338 clients)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedhubert.fl.round_log import RoundLog, rounds_figure
from fedhubert.labels.run import kmeans_figure
from fedhubert.partition.report import plot_clients
from fedhubert.plots import MANY_CLIENTS

N = 2000


def one_speaker_partition(n: int) -> dict:
    rng = np.random.default_rng(0)
    clients = []
    for i in range(n):
        female = float(rng.random() < 0.5)
        subset = "train-clean-100" if i % 3 else "train-other-500"
        clients.append(
            {
                "client": i,
                "hours": {"train": float(rng.uniform(0.1, 0.6)), "valid": 0.01},
                "subset_mix": {subset: 1.0},
                "sex_mix": {"F": female, "M": 1 - female},
            }
        )
    return {"scheme": "natural", "clients": clients}


def test_clients_png_at_2000_clients_is_a_rank_plot_and_a_histogram(tmp_path):
    path = tmp_path / "clients.png"
    plot_clients(one_speaker_partition(N), path)
    width, height = Image.open(path).size
    assert width < 1500 and height < 600, (width, height)
    small = tmp_path / "small.png"
    plot_clients(one_speaker_partition(4), small)
    assert Image.open(small).size[0] < 1500


def test_round_curves_at_2000_clients_are_a_band_not_a_line_each():
    rng = np.random.default_rng(1)
    rows = []
    for round_ in range(1, 6):
        for client in rng.choice(N, size=100, replace=False):
            rows.append({"kind": "client", "round": round_, "client": int(client), "train_loss": float(rng.normal(3))})
        rows.append({"kind": "train", "round": round_, "train_loss": 3.0, "train_acc_masked": 0.1})
    ax = rounds_figure(rows, "pretrain").axes[0]
    assert len(ax.lines) <= 3 and len(ax.collections) == 1, [line.get_label() for line in ax.lines]
    few = [r for r in rows if r["kind"] != "client" or r["client"] < 3]
    clients = len({r["client"] for r in few if r["kind"] == "client"})
    assert len(rounds_figure(few, "pretrain").axes[0].lines) == clients + 1


def test_per_client_codebooks_at_2000_clients_are_a_histogram():
    record = {
        "history": [],
        "clients": [{"client": i, "inertia": 1.0 + i / N} for i in range(N)],
        "cluster_usage": [5, 3],
        "num_clusters": 2,
    }
    ax = kmeans_figure(record).axes[0]
    assert ax.get_xlabel() == "inertia per frame" and len(ax.patches) == 30


def test_tensorboard_tags_do_not_grow_with_the_clients(tmp_path):
    def tags(num_clients: int) -> set[str]:
        out = tmp_path / str(num_clients)
        out.mkdir()
        log = RoundLog(out, num_clients)
        for round_ in (1, 2):
            for client in range(min(num_clients, 60)):
                log.write({"kind": "client", "round": round_, "client": client, "train_loss": float(client)})
            log.write({"kind": "train", "round": round_, "train_loss": 1.0})
        log.close()
        board = EventAccumulator(str(out / "tensorboard"))
        board.Reload()
        return set(board.Tags()["scalars"])

    assert tags(3) == {"client_0/train_loss", "client_1/train_loss", "client_2/train_loss", "clients/train_loss"}
    many = tags(N)
    assert N > MANY_CLIENTS and many == {
        "clients/train_loss",
        "clients_p10/train_loss",
        "clients_p50/train_loss",
        "clients_p90/train_loss",
    }
    board = EventAccumulator(str(tmp_path / str(N) / "tensorboard"))
    board.Reload()
    assert [e.value for e in board.Scalars("clients_p50/train_loss")] == [29.5, 29.5]
