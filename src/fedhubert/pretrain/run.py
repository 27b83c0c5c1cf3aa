"""`fedhubert pretrain`: federated HuBERT pretraining as a Flower run, in a local simulation or on a SuperLink.

Writes `checkpoints/` (round_<r>.pt, best.pt by the lowest server-side masked cross-entropy, final.pt; each with a
.sha256),
`metrics.jsonl`, `tensorboard/`, `messages.jsonl` (what crossed the wire, per message), `pretrain.json` and
`pretrain.png`; with per-client codebooks each client's head in `clients/client_<i>/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedhubert.fl.round_log import plot_rounds, read_rows
from fedhubert.fl.runtime.federation import run_training_stage
from fedhubert.fl.runtime.resources import estimate_client_gpu_bytes
from fedhubert.pretrain.config import PretrainConfig
from fedhubert.pretrain.server import read_inputs
from fedhubert.runlog import StageRun

log = logging.getLogger(__name__)


def client_gpu_bytes(cfg: PretrainConfig, num_classes: int) -> int:
    """One client's GPU memory by estimate: the HuBERT it trains."""
    from fedhubert.model.hubert import build_hubert

    params = sum(p.numel() for p in build_hubert(cfg.model, num_classes).parameters())
    return estimate_client_gpu_bytes(cfg.train, cfg.model, trained=params, num_classes=num_classes)


def plot_pretrain(cfg: PretrainConfig, out: Path, summary: dict) -> None:
    """pretrain.png from the run's metrics.jsonl."""
    plot_rounds(
        read_rows(out / "metrics.jsonl"),
        out / "pretrain.png",
        f"federated pretraining ({cfg.strategy.name}, {summary['clients']} clients)",
    )


def run_pretrain(cfg: PretrainConfig, out: Path, run: StageRun) -> dict:
    out = Path(out).resolve()
    partition, kmeans = read_inputs(cfg)
    summary = run_training_stage(
        "pretrain",
        cfg,
        out,
        run,
        num_clients=int(partition["num_clients"]),
        checkpoint_kind="hubert",
        gpu_bytes=lambda: client_gpu_bytes(cfg, int(kmeans["num_clusters"])),
        plot=lambda summary: plot_pretrain(cfg, out, summary),
    )
    best = summary.get("best")
    log.info(
        "pretraining done: %d rounds%s; final checkpoint %s",
        summary["rounds"],
        f", best server masked cross-entropy {best['ce_masked']:.3f} (round {best['round']})" if best else "",
        summary["final_checkpoint"],
    )
    return summary
