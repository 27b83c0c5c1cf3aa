"""What a federated run records per round: metrics.jsonl (per client, aggregated, server-side evaluation and
failures), a TensorBoard log, and at the end a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedhubert.display import MANY_CLIENTS

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class RoundLog:
    """metrics.jsonl and the TensorBoard log. TensorBoard gets a tag per client only in a federation of at most
    MANY_CLIENTS clients; in a larger one each round's client rows become quantiles over its clients
    (`clients_p10|p50|p90/<metric>`), written with the round's aggregated row, so the tags do not grow with N."""

    def __init__(self, out: Path, num_clients: int = 0):
        self.path = Path(out) / "metrics.jsonl"
        self.board_dir = Path(out) / "tensorboard"
        self._writer = None
        self.per_client = num_clients <= MANY_CLIENTS
        self._round_clients: dict[str, list[float]] = {}

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.board_dir))
        return self._writer

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        step = row["round"]
        scalars = {
            key: value
            for key, value in row.items()
            if key not in ("kind", "round", "client")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        }
        if row["kind"] == "client" and not self.per_client:
            for key, value in scalars.items():
                self._round_clients.setdefault(key, []).append(float(value))
            return
        if row["kind"] == "train" and self._round_clients:
            for key, values in self._round_clients.items():
                for q in (10, 50, 90):
                    self.writer.add_scalar(f"clients_p{q}/{key}", float(np.percentile(values, q)), step)
            self._round_clients = {}
        prefix = {"client": f"client_{row.get('client')}", "train": "clients", "eval": "server_eval"}.get(row["kind"])
        if prefix:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_rows(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


LOSS_PANEL = "loss"
ACCURACY_PANEL = "masked accuracy"
GAIN_PANEL = "gain over the label-frequency baseline"


def round_panels(rows: list[dict], loss_key: str = "train_loss", acc_key: str | None = "train_acc_masked") -> list[str]:
    """What the panels of `rounds_figure` show for these arguments, in order (for captions)."""
    gains = any(r["kind"] == "eval" and "gain_nats" in r for r in rows) or any(
        r["kind"] == "train" and loss_key in r and "valid_gain_nats" in r for r in rows
    )
    return [LOSS_PANEL] + [ACCURACY_PANEL] * bool(acc_key) + [GAIN_PANEL] * gains


def plot_rounds(
    rows: list[dict], path: Path, title: str, loss_key: str = "train_loss", acc_key: str | None = "train_acc_masked"
) -> None:
    """Write `rounds_figure` as a PNG at `path`."""
    from fedhubert.plots import save_figure

    save_figure(rounds_figure(rows, title, loss_key, acc_key), path)


def rounds_figure(
    rows: list[dict], title: str, loss_key: str = "train_loss", acc_key: str | None = "train_acc_masked"
) -> Figure:
    """Loss per round (each client, or above MANY_CLIENTS their 10-90% band and median; their weighted mean; the
    server's evaluation); with `acc_key` also masked accuracy,
    and, where evaluations report it, the gain over the label-frequency baseline (held-out, in nats). The round
    axes have integer ticks. `round_panels` names the panels."""
    from fedhubert.plots import integer_ticks, plt  # here: the processes that only record rounds never plot

    aggregated = [r for r in rows if r["kind"] == "train" and loss_key in r]
    evals = [r for r in rows if r["kind"] == "eval"]
    gains = [r for r in evals if "gain_nats" in r]
    valid_gains = [r for r in aggregated if "valid_gain_nats" in r]
    panels = round_panels(rows, loss_key, acc_key)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    ax_loss = axes[0][0]
    client_rows = [r for r in rows if r["kind"] == "client" and loss_key in r]
    clients = sorted({r["client"] for r in client_rows})
    if len(clients) > MANY_CLIENTS:
        by_round: dict[int, list[float]] = {}
        for r in client_rows:
            by_round.setdefault(r["round"], []).append(r[loss_key])
        rounds = sorted(by_round)
        low, median, high = (np.array([np.quantile(by_round[n], q) for n in rounds]) for q in (0.1, 0.5, 0.9))
        ax_loss.fill_between(rounds, low, high, alpha=0.25, label=f"clients 10-90% ({len(clients)} clients)")
        ax_loss.plot(rounds, median, alpha=0.6, label="clients' median")
    for client in clients if len(clients) <= MANY_CLIENTS else []:
        points = [r for r in client_rows if r["client"] == client]
        ax_loss.plot([r["round"] for r in points], [r[loss_key] for r in points], alpha=0.4, label=f"client {client}")
    ax_loss.plot([r["round"] for r in aggregated], [r[loss_key] for r in aggregated], "k-o", label="weighted mean")
    if evals and "loss" in evals[0]:
        ax_loss.plot([r["round"] for r in evals], [r["loss"] for r in evals], "r-s", label="server eval")
    ax_loss.set(xlabel="round", ylabel="loss", title=title)
    ax_loss.legend(fontsize="small")
    if acc_key:
        ax_acc = axes[0][1]
        ax_acc.plot(
            [r["round"] for r in aggregated], [r.get(acc_key, 0) for r in aggregated], "k-o", label="clients (train)"
        )
        valid = [r for r in aggregated if "valid_acc_masked" in r]
        if valid:
            ax_acc.plot(
                [r["round"] for r in valid], [r["valid_acc_masked"] for r in valid], "b-^", label="clients (valid)"
            )
        if evals and "acc_masked" in evals[0]:
            ax_acc.plot([r["round"] for r in evals], [r["acc_masked"] for r in evals], "r-s", label="server eval")
        ax_acc.set(xlabel="round", ylabel="masked accuracy", title="masked prediction accuracy")
        ax_acc.legend(fontsize="small")
    if GAIN_PANEL in panels:
        ax_gain = axes[0][-1]
        if valid_gains:
            ax_gain.plot(
                [r["round"] for r in valid_gains],
                [r["valid_gain_nats"] for r in valid_gains],
                "b-^",
                label="clients (valid)",
            )
        if gains:
            ax_gain.plot([r["round"] for r in gains], [r["gain_nats"] for r in gains], "r-s", label="server eval")
        ax_gain.axhline(0.0, color="grey", linestyle="--", linewidth=1, label="frequency baseline")
        ax_gain.set(xlabel="round", ylabel="nats per masked frame", title="gain over the label-frequency baseline")
        ax_gain.legend(fontsize="small")
    for ax in axes[0]:
        integer_ticks(ax)
    return fig
