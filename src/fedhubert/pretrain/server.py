"""The server side of federated pretraining: the initial model, what is shared, and server-side evaluation.

Server-side evaluation reports the masked cross-entropy beside the label-frequency baseline's on the same frames;
`best.pt` is the round of the lowest held-out masked cross-entropy.

With a federated (shared) codebook every parameter is aggregated and the server evaluates the global model on
the held-out set (`eval_subset`) labelled with that codebook. With per-client codebooks the label-prediction head
(label embeddings, final projection) stays on the clients: it is not sent, not aggregated, and the server has no
labels to evaluate with, so only the clients' own validation metrics are reported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from flwr.serverapp import Grid

from fedhubert.atomic import atomic_write_text
from fedhubert.config import load_config
from fedhubert.errors import ConfigError
from fedhubert.fl.local import client_heads, planned_local_steps
from fedhubert.fl.rounds import FederatedRun, RoundTask, summary_path
from fedhubert.fl.tasks import ServerRun
from fedhubert.model.config import PRESET_LR
from fedhubert.model.hubert import LABEL_HEAD_KEYS, build_hubert
from fedhubert.pretrain.config import PretrainConfig
from fedhubert.train.data import LabelRate, batch_loader, load_utterances
from fedhubert.train.loop import MaskedPrediction, evaluate, label_log_prior, resolve_device
from fedhubert.train.memory import batch_cap

log = logging.getLogger(__name__)


def read_inputs(cfg: PretrainConfig) -> tuple[dict, dict]:
    """partition.json and kmeans.json, checked to belong together."""
    for key in ("partition", "kmeans"):
        if not Path(getattr(cfg, key)).is_absolute():
            raise ConfigError(f"key '{key}' must be an absolute path when the ServerApp reads it ({getattr(cfg, key)})")
    partition_file, kmeans_file = Path(cfg.partition) / "partition.json", Path(cfg.kmeans) / "kmeans.json"
    for path, stage in ((partition_file, "partition"), (kmeans_file, "kmeans")):
        if not path.is_file():
            raise ConfigError(f"{path} not found: '{path.parent}' is not a folder made by 'fedhubert {stage}'")
    partition, kmeans = json.loads(partition_file.read_text()), json.loads(kmeans_file.read_text())
    if Path(kmeans["partition"]["path"]).resolve() != Path(cfg.partition).resolve():
        raise ConfigError(
            f"{kmeans_file} labels the partition {kmeans['partition']['path']}, not {cfg.partition}: make labels "
            f"for this one with 'fedhubert kmeans --partition {cfg.partition} --out DIR', then pass --kmeans DIR"
        )
    return partition, kmeans


def dev_evaluator(cfg: PretrainConfig, kmeans: dict, rate: LabelRate):
    """Server-side evaluation on the held-out set labelled with the shared codebook (None without one)."""
    if kmeans["label_head"] != "shared":
        log.info("per-client codebooks: no server-side evaluation (the server has no shared labels)")
        return None
    manifest = Path(cfg.partition) / "global" / f"{cfg.eval_subset}.tsv"
    labels = Path(cfg.kmeans) / "global" / f"{cfg.eval_subset}.km"
    if not (manifest.is_file() and labels.is_file()):
        log.warning("no %s / %s: no server-side evaluation", manifest, labels)
        return None
    utts = load_utterances([(manifest, labels)], kmeans["num_clusters"], cfg.train.data, rate)
    loader = batch_loader(utts, rate, cfg.train.data, cfg.seed, batch_cap(cfg.train, cfg.model, kmeans["num_clusters"]))
    device = resolve_device(cfg.train.device)
    model = build_hubert(cfg.model, kmeans["num_clusters"]).to(device)
    # The frequency baseline: the clients' label distribution, from the cluster counts that federated k-means
    # gathered (statistics that already left the clients).
    objective = MaskedPrediction(cfg.loss, cfg.model.normalize_waveform, label_log_prior(kmeans["cluster_usage"]))

    def run(state: dict[str, torch.Tensor]) -> dict:
        model.load_state_dict(state)
        return evaluate(model, loader, cfg.train, objective=objective, device=device, seed=cfg.seed)

    return run


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

    def heads(round_: int) -> dict:
        if not local_head:
            return {"label_head": "shared"}
        return {"label_head": "local", "client_heads": client_heads(out, num_clients, round_)}

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
    )
    summary = FederatedRun(grid, cfg, out, task, num_clients, resume=run.resume, threads=run.threads).run()
    summary.update(
        {
            "label_head": "local" if local_head else "shared",
            "num_classes": num_classes,
            "label_rate": rate.rate,
            "clients": num_clients,
        }
    )
    atomic_write_text(summary_path(out, "pretrain"), json.dumps(summary, indent=2) + "\n")
    return summary
