"""The server side of federated pretraining: the initial model, what is shared, and server-side evaluation.

Server-side evaluation reports the masked cross-entropy beside the label-frequency baseline's on the same frames;
`best.pt` is the round of the lowest held-out masked cross-entropy.

With a federated (shared) codebook every parameter is aggregated and the server evaluates the global model on
the held-out set (`eval_subset`) labelled with that codebook. With per-client codebooks the label-prediction head
(label embeddings, final projection) stays on the clients: it is not sent, not aggregated, and the server has no
labels to evaluate with, so only the clients' own validation metrics are reported.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.serverapp import Grid

from fedhubert.config import load_config
from fedhubert.fl.local import planned_local_steps
from fedhubert.fl.rounds import RoundTask
from fedhubert.fl.tasks import ServerRun
from fedhubert.fl.training import (
    client_seconds,
    held_out_evaluator,
    label_heads,
    read_task_inputs,
    serve_rounds,
    unlabelled_clients,
)
from fedhubert.model.config import PRESET_LR
from fedhubert.model.hubert import LABEL_HEAD_KEYS, build_hubert
from fedhubert.pretrain.config import PretrainConfig
from fedhubert.train.data import LabelRate
from fedhubert.train.loop import MaskedPrediction, label_log_prior

log = logging.getLogger(__name__)


def read_inputs(cfg: PretrainConfig) -> tuple[dict, dict]:
    """partition.json and kmeans.json, checked to belong together."""
    return read_task_inputs(cfg, ("partition", "kmeans"), with_kmeans=True)


def dev_evaluator(cfg: PretrainConfig, kmeans: dict, rate: LabelRate):
    """Server-side evaluation on the held-out set labelled with the shared codebook (None without one)."""
    if kmeans["label_head"] != "shared":
        log.info("per-client codebooks: no server-side evaluation (the server has no shared labels)")
        return None
    num_classes = kmeans["num_clusters"]
    # The frequency baseline: the clients' label distribution, from the cluster counts that federated k-means
    # gathered (statistics that already left the clients).
    objective = MaskedPrediction(cfg.loss, cfg.model.normalize_waveform, label_log_prior(kmeans["cluster_usage"]))
    return held_out_evaluator(
        cfg,
        build_hubert(cfg.model, num_classes),
        objective,
        rate,
        labels=Path(cfg.kmeans) / "global" / f"{cfg.eval_subset}.km",
        num_classes=num_classes,
    )


def serve_pretrain(grid: Grid, run: ServerRun) -> dict:
    cfg, out = load_config(PretrainConfig, run.config), run.out
    partition, kmeans = read_inputs(cfg)
    num_clients, num_classes = int(partition["num_clients"]), int(kmeans["num_clusters"])
    local_head = kmeans["label_head"] == "local"
    rate = LabelRate(int(kmeans.get("label_rate", 100)), cfg.model)
    torch.manual_seed(cfg.seed)
    state = build_hubert(cfg.model, num_classes).state_dict()
    shared = [k for k in state if not (local_head and k in LABEL_HEAD_KEYS)]
    log.info(
        "pretraining HuBERT %s (K=%d, %s label head) with %d clients, %s, %d rounds of %d local steps",
        cfg.model.preset,
        num_classes,
        "per-client" if local_head else "shared",
        num_clients,
        cfg.strategy.name,
        cfg.num_rounds,
        cfg.local_steps,
    )

    heads = label_heads(kmeans["label_head"], out, num_clients)
    task = RoundTask(
        name="pretrain",
        message_type="train",
        checkpoint_kind="hubert",
        model_config=cfg.model,
        num_classes=num_classes,
        state=state,
        shared_keys=shared,
        round_info={"num_classes": num_classes, "label_rate": rate.rate, "local_head": local_head},
        evaluate=dev_evaluator(cfg, kmeans, rate),
        best_key="ce_masked",
        higher_is_better=False,
        local_steps=planned_local_steps(cfg, num_clients),
        default_lr=PRESET_LR[cfg.model.preset],
        checkpoint_extra=lambda round_: {"label_rate": rate.rate, **heads(round_)},
        client_seconds=client_seconds(partition),
        unavailable=unlabelled_clients(kmeans),
    )
    details = {"label_head": kmeans["label_head"], "num_classes": num_classes, "label_rate": rate.rate}
    return serve_rounds(grid, run, cfg, task, num_clients, details)
