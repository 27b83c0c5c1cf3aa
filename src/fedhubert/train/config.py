"""Config of the local trainer (kept free of torch: the CLI reads it for --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedhubert.config import param
from fedhubert.errors import ConfigError
from fedhubert.model.config import ModelConfig


@dataclass
class LossConfig:
    masked_weight: float = param(1.0, "weight of the masked-frame prediction loss", ge=0)
    unmasked_weight: float = param(0.0, "weight of the unmasked-frame prediction loss", ge=0)
    feature_penalty: float = param(10.0, "weight of the CNN feature L2 penalty", ge=0)


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = param(
        "adamw", "the client optimiser: AdamW (the recipe's) or SGD with momentum (Reddi et al.'s FedAdam clients)"
    )
    lr: float | None = param(
        None,
        "peak learning rate (null: the model preset's AdamW rate, e.g. base 5e-4 as the recipe, tiny 5e-3; "
        "required with name sgd)",
        gt=0,
    )
    betas: list[float] = param([0.9, 0.98], "AdamW betas", ge=0, lt=1)
    eps: float = param(1e-6, "AdamW epsilon", gt=0)
    momentum: float = param(0.9, "SGD momentum (name sgd)", ge=0, lt=1)
    weight_decay: float = param(0.01, "weight decay (AdamW's decoupled; SGD's L2)", ge=0)
    warmup_steps: int | None = param(
        None, "linear warm-up updates, counted by the global step (null: warmup_fraction of total_steps)", ge=0
    )
    total_steps: int | None = param(
        None, "the learning rate decays linearly to 0 at this global step (null: the run's planned updates)", ge=1
    )
    warmup_fraction: float = param(0.1, "warm-up share of total_steps when warmup_steps is null", ge=0, lt=1)
    clip_norm: float = param(10.0, "gradient-norm clipping (0: off)", ge=0)

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"key 'optim.betas' must be [beta1, beta2], got {self.betas}")
        if self.name == "sgd" and self.lr is None:
            raise ConfigError(
                "key 'optim.lr' must be set with optim.name=sgd: the model presets' rates are AdamW's and do not "
                "carry over to SGD (benchmarks/server_opt.py fits one)"
            )
        if self.warmup_steps is not None and self.total_steps is not None and self.warmup_steps >= self.total_steps:
            raise ConfigError(
                f"key 'optim.warmup_steps' ({self.warmup_steps}) must be below 'optim.total_steps' ({self.total_steps})"
            )


@dataclass
class DataConfig:
    min_seconds: float = param(2.0, "utterances shorter than this are skipped (counted)", gt=0)
    max_seconds: float = param(15.625, "longer utterances are randomly cropped to this (250,000 samples)", gt=0)
    batch_seconds: float = param(87.5, "audio per batch after cropping (the recipe: 87.5 s per GPU)", gt=0)
    memory_budget_gb: float | None = param(
        None, "cap batches so that their estimated activation memory fits this budget (null: no cap)", gt=0
    )
    num_workers: int = param(0, "DataLoader worker processes reading audio", ge=0)

    def validate(self) -> None:
        if self.min_seconds > self.max_seconds:
            raise ConfigError(
                f"key 'data.min_seconds' ({self.min_seconds}) must not exceed 'data.max_seconds' ({self.max_seconds})"
            )
        if self.batch_seconds < self.min_seconds:
            raise ConfigError(
                f"key 'data.batch_seconds' ({self.batch_seconds}) must hold at least one crop of "
                f"'data.min_seconds' ({self.min_seconds})"
            )


@dataclass
class TrainConfig:
    device: str = param("auto", "cpu, cuda, cuda:N, or auto (a GPU when there is one)")
    precision: Literal["fp32", "bf16", "fp16"] = param(
        "fp32", "autocast precision (fp32 master weights always; fp16 adds a gradient scaler)"
    )
    accumulation_steps: int = param(1, "batches whose gradients are summed per update", ge=1)
    checkpoint_layers: bool = param(False, "recompute each transformer layer in the backward pass (less memory)")
    checkpoint_cnn: bool = param(False, "recompute each CNN block in the backward pass too")
    log_every: int = param(50, "log training metrics every this many updates", ge=1)
    optim: OptimConfig = param(OptimConfig(), "AdamW and the learning-rate schedule")
    data: DataConfig = param(DataConfig(), "crops and batches")


# What `fedhubert train-local` writes into its output folder, replaced as a whole by --force.
OUTPUTS = ("checkpoints", "metrics.jsonl", "training.png")


@dataclass
class TrainLocalConfig:
    train_manifests: list[Path] = param([], "training manifests (.tsv), pooled")
    train_labels: list[Path] = param([], "their k-means labels (.km), one per manifest, in the same order")
    valid_manifests: list[Path] = param([], "validation manifests (optional)")
    valid_labels: list[Path] = param([], "their labels")
    num_classes: int | None = param(None, "K; null: read from the kmeans.json beside the labels", ge=2)
    seed: int = param(0, "seed of the initial model, crops, masks and dropout", ge=0)
    steps: int = param(1000, "optimizer updates to run", ge=1)
    eval_every: int = param(500, "evaluate on the validation set every this many updates", ge=1)
    checkpoint_every: int = param(500, "write a checkpoint every this many updates", ge=1)
    model: ModelConfig = param(ModelConfig(), "HuBERT architecture")
    loss: LossConfig = param(LossConfig(), "masked-prediction loss")
    train: TrainConfig = param(TrainConfig(), "local training")

    def validate(self) -> None:
        if not self.train_manifests:
            raise ConfigError("key 'train_manifests' is required: pass --manifest FILE.tsv (and --labels FILE.km)")
        for manifests, labels in (("train_manifests", "train_labels"), ("valid_manifests", "valid_labels")):
            if len(getattr(self, manifests)) != len(getattr(self, labels)):
                raise ConfigError(f"keys '{manifests}' and '{labels}' must list as many files each, in the same order")
