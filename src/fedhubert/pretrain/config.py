"""Config of `fedhubert pretrain` (kept free of torch and Flower: the CLI reads it for --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedhubert.config import param
from fedhubert.errors import ConfigError
from fedhubert.fl.config import FederationConfig, PrivacyConfig, StrategyConfig
from fedhubert.model.config import ModelConfig
from fedhubert.train.config import LossConfig, TrainConfig

# What the stage writes into its output folder, replaced as a whole by --force.
OUTPUTS = (
    "checkpoints",
    "clients",
    "metrics.jsonl",
    "messages.jsonl",
    "tensorboard",
    "pretrain.png",
    "flwr",
    "pretrain.json",
)


@dataclass
class PretrainConfig:
    partition: Path | None = param(None, "partition folder made by 'fedhubert partition' (required)")
    kmeans: Path | None = param(None, "k-means folder made by 'fedhubert kmeans' on that partition (required)")
    num_rounds: int = param(10, "federated rounds", ge=1)
    local_steps: int = param(50, "optimizer updates per client per round", ge=1)
    seed: int = param(0, "seed of the initial model, client sampling, crops, masks and dropout", ge=0)
    transfer: Literal["float32", "bfloat16"] = param(
        "float32",
        "precision on the wire: float32 weights, or bfloat16 weights out and bfloat16 changes back (half "
        "the bytes; the server keeps float32)",
    )
    evaluate_every: int = param(1, "server-side evaluation on the held-out set every this many rounds", ge=1)
    eval_subset: str = param("dev-clean", "held-out subset of the partition for server-side evaluation")
    checkpoint_every: int = param(1, "checkpoint every this many rounds (and after the last)", ge=1)
    round_timeout_s: float = param(3600.0, "stop waiting for a round's replies after this many seconds", gt=0)
    model: ModelConfig = param(ModelConfig(), "HuBERT architecture")
    loss: LossConfig = param(LossConfig(), "masked-prediction loss")
    train: TrainConfig = param(TrainConfig(), "each client's local trainer (its optim.lr is the client learning rate)")
    strategy: StrategyConfig = param(StrategyConfig(), "server aggregation")
    federation: FederationConfig = param(FederationConfig(), "how the clients are reached")
    privacy: PrivacyConfig = param(PrivacyConfig(), "client-level differential privacy of the released models")

    def validate(self) -> None:
        for key in ("partition", "kmeans"):
            if getattr(self, key) is None:
                raise ConfigError(f"key '{key}' is required: pass --{key} DIR")
