"""Settings of the featurisation and the k-means maths (Flower-free and light: the CLI reads them for --help). The
configs of the kmeans and features stages (`fedhubert.labels.config`) nest them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedhubert.config import param
from fedhubert.errors import ConfigError


@dataclass
class MiniBatchConfig:
    """scikit-learn MiniBatchKMeans settings; the defaults are the HuBERT recipe's (fairseq simple_kmeans)."""

    init: str = param("k-means++", "initialisation", choices=["k-means++", "random"])
    max_iter: int = param(100, "passes over the sample", ge=1)
    batch_size: int = param(10000, "frames per mini-batch", ge=1)
    tol: float = param(0.0, "early-stopping tolerance on centroid change (0: off)", ge=0)
    max_no_improvement: int = param(100, "stop after this many mini-batches without improvement", ge=1)
    n_init: int = param(20, "initialisations tried; the best is kept", ge=1)
    reassignment_ratio: float = param(0.0, "reassignment of small clusters (0: off)", ge=0)


@dataclass
class FeaturesConfig:
    kind: Literal["mfcc", "hubert"] = param(
        "mfcc",
        "mfcc: the recipe's 39-dim MFCC at 100 Hz (iteration 1); hubert: a transformer layer of a pretrained "
        "checkpoint at 50 Hz (iteration 2)",
    )
    checkpoint: Path | None = param(None, "hubert: the pretrained fedhubert checkpoint (.pt)")
    layer: int = param(6, "hubert: the transformer layer (1 = the first) whose output is clustered", ge=1)
    normalize: Literal["none", "utterance", "speaker"] = param(
        "none",
        "mean and variance normalisation of every dimension. none: raw features (the recipe); utterance: "
        "over each utterance; speaker: over all frames of the utterance's speaker on its client (a client's train "
        "and valid together; a held-out set over its own speakers), speaker read from the LibriSpeech file name",
    )
    dtype: Literal["float16", "float32"] = param("float16", "storage type of the feature cache")

    def validate(self) -> None:
        if self.kind == "hubert" and self.checkpoint is None:
            raise ConfigError("key 'features.checkpoint' is required with features.kind=hubert (--checkpoint CKPT)")
