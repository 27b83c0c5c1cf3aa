"""`fedhubert features`: one client's features (the k-means input) computed on their own, so that a Slurm job
array can featurise every client in parallel before `fedhubert kmeans feature_dir=...` reuses them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedhubert.corpus.librispeech import CorpusError
from fedhubert.errors import ConfigError
from fedhubert.labels.config import ClientFeaturesConfig
from fedhubert.labels.features import featurise
from fedhubert.labels.federated import SPLITS
from fedhubert.runlog import StageRun

log = logging.getLogger(__name__)


def run_client_features(cfg: ClientFeaturesConfig, out: Path, run: StageRun) -> dict:
    out = Path(out).resolve()
    if out.name != f"client_{cfg.client}":
        raise ConfigError(
            f"--out must be FEATURE_DIR/client_{cfg.client} (not {out.name}), so that "
            f"'fedhubert kmeans feature_dir=FEATURE_DIR' finds the features"
        )
    partition_file = Path(cfg.partition) / "partition.json"
    if not partition_file.is_file():
        raise CorpusError(f"{partition_file} not found: --partition must be a folder made by 'fedhubert partition'")
    num_clients = int(json.loads(partition_file.read_text())["num_clients"])
    if cfg.client >= num_clients:
        raise ConfigError(f"client {cfg.client} does not exist: the partition has clients 0..{num_clients - 1}")
    jobs = [(Path(cfg.partition) / f"client_{cfg.client}" / f"{split}.tsv", out / split) for split in SPLITS]
    summary = featurise(jobs, cfg.features, workers=cfg.workers, desc=f"client {cfg.client} features")
    log.info(
        "client %d: features in %s (%s); use them with: fedhubert kmeans ... feature_dir=%s",
        cfg.client,
        out,
        ", ".join(f"{k} {v}" for k, v in summary.items() if k in ("computed", "reused")),
        out.parent,
    )
    run.summary.update(summary)
    return summary
