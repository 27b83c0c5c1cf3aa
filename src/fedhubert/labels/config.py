"""Config of `fedhubert kmeans` (kept free of heavy imports: the CLI reads it for --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedhubert.config import param
from fedhubert.errors import ConfigError
from fedhubert.fl.config import FederationConfig
from fedhubert.labels.settings import FeaturesConfig, MiniBatchConfig

# What the stage writes into its output folder, replaced as a whole by --force (the feature cache is kept).
OUTPUTS = (
    "kmeans.json",
    "codebook.npy",
    "messages.jsonl",
    "kmeans.png",
    "flwr",
    "global",
    "client_[0-9]*",
    "checkpoints",
)


@dataclass
class LloydConfig:
    max_rounds: int = param(50, "most Lloyd rounds (each: clients send per-cluster sums and counts)", ge=1)
    tol: float = param(
        1e-4,
        "stop when the relative change in inertia falls below this (with fraction < 1: the least relative "
        "improvement of the smoothed inertia that resets `patience`)",
        ge=0,
    )
    min_shared_count: int = param(
        10,
        "a client's local centroid is shared for the initial codebook only if it stands for this many frames",
        ge=1,
    )
    fraction: float = param(
        1.0,
        "share of the clients asked for statistics each Lloyd round (a new seeded sample each round); below 1 "
        "the rounds are mini-batch k-means over the sampled clients (each centroid the running mean of all the "
        "frames assigned to it so far) and stop by `patience`",
        gt=0,
        le=1,
    )
    patience: int = param(
        10,
        "with fraction < 1: stop once the smoothed inertia (an exponentially weighted mean of the rounds' sampled "
        "estimates, as scikit-learn's MiniBatchKMeans) has not improved by a relative tol for this many rounds",
        ge=1,
    )
    init_clients: int = param(
        200,
        "most clients whose local centroids seed the initial codebook (a seeded sample; the initial clustering "
        "then works on at most init_clients x num_clusters points)",
        ge=1,
    )
    min_clients: int = param(
        1,
        "stop with an error when fewer clients than this are left to ask (clients that fail or time out are "
        "left out of the rest of the stage)",
        ge=1,
    )
    timeout_s: float = param(
        1800.0,
        "longest wait for a client's reply in any exchange; once a Lloyd round has completed, a round waits "
        "3x the last one's time + 60 s (at most this)",
        gt=0,
    )


@dataclass
class KMeansConfig:
    partition: Path | None = param(None, "the partition folder made by 'fedhubert partition' (required)")
    mode: Literal["federated", "per-client"] = param(
        "federated",
        "federated: one shared codebook from cluster statistics; per-client: each client its own "
        "codebook (the label head must then stay local)",
    )
    num_clusters: int = param(100, "K, the number of clusters (HuBERT iteration 1: 100)", ge=2)
    seed: int = param(0, "random seed; the same seed gives the same labels", ge=0)
    sample_fraction: float = param(0.1, "fraction of a client's frames used to fit its MiniBatchKMeans", gt=0, le=1)
    min_sample_frames: int = param(20000, "fit on at least this many frames (or all a client has)", ge=1)
    features: FeaturesConfig = param(FeaturesConfig(), "MFCC features")
    minibatch: MiniBatchConfig = param(MiniBatchConfig(), "MiniBatchKMeans (per-client codebooks, initial centroids)")
    lloyd: LloydConfig = param(LloydConfig(), "federated Lloyd rounds")
    reference: bool = param(
        True,
        "also fit a centralized codebook on the pooled frames and report the gap to it (simulation only: "
        "it reads every client's features)",
    )
    reference_frames: int = param(
        2_000_000,
        "most frames the reference codebook is fitted on: a uniform sample over all clients' training frames, "
        "held as float32 (2 M x 39 dims: 312 MB); both inertias are then summed over every frame, client by client",
        ge=1,
    )
    feature_dir: Path | None = param(None, "feature cache folder (null: <out>/features; kept by --force)")
    workers: int = param(0, "processes for featurising; 0 means one per CPU core", ge=0)
    federation: FederationConfig = param(FederationConfig(), "how the clients are reached")

    def validate(self) -> None:
        if self.partition is None:
            raise ConfigError("key 'partition' is required: pass --partition DIR (made by 'fedhubert partition')")
        if self.reference and self.federation.superlink is not None:
            raise ConfigError(
                "key 'reference' needs every client's features on this machine: set reference=false "
                "when running against a SuperLink"
            )


FEATURES_OUTPUTS = ("train.*", "valid.*")


@dataclass
class ClientFeaturesConfig:
    """`fedhubert features`: one client's feature cache, computed ahead of `fedhubert kmeans` (a Slurm array
    task per client). kmeans reuses it when given feature_dir=<the folder above client_<i>> and the same
    features.* settings (otherwise it computes them again: never stale)."""

    partition: Path | None = param(None, "the partition folder made by 'fedhubert partition' (required)")
    client: int | None = param(None, "the client whose train and valid manifests are featurised (required)", ge=0)
    features: FeaturesConfig = param(FeaturesConfig(), "features, as in the kmeans config")
    workers: int = param(0, "processes; 0 means one per CPU core", ge=0)

    def validate(self) -> None:
        if self.partition is None:
            raise ConfigError("key 'partition' is required: pass --partition DIR (made by 'fedhubert partition')")
        if self.client is None:
            raise ConfigError("key 'client' is required: pass --client I (e.g. --client $SLURM_ARRAY_TASK_ID)")
