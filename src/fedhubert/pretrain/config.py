"""Config of `fedhubert pretrain` (kept free of torch and Flower: the CLI reads it for --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedhubert.config import param
from fedhubert.errors import ConfigError
from fedhubert.fl.config import ROUNDS_OUTPUTS, RoundsConfig
from fedhubert.model.config import ModelConfig
from fedhubert.train.config import LossConfig

# What the stage writes into its output folder, replaced as a whole by --force.
OUTPUTS = (*ROUNDS_OUTPUTS, "pretrain.png", "pretrain.json")


@dataclass
class PretrainConfig(RoundsConfig):
    kmeans: Path | None = param(None, "k-means folder made by 'fedhubert kmeans' on that partition (required)")
    model: ModelConfig = param(ModelConfig(), "HuBERT architecture")
    loss: LossConfig = param(LossConfig(), "masked-prediction loss")

    def validate(self) -> None:
        for key in ("partition", "kmeans"):
            if getattr(self, key) is None:
                raise ConfigError(f"key '{key}' is required: pass --{key} DIR")
