"""Config of `fedhubert distill` (kept free of torch and Flower: the CLI reads it for --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedhubert.config import param
from fedhubert.errors import ConfigError
from fedhubert.fl.config import ROUNDS_OUTPUTS, RoundsConfig
from fedhubert.train.config import OptimConfig, TrainConfig

# What the stage writes into its output folder, replaced as a whole by --force.
OUTPUTS = (*ROUNDS_OUTPUTS, "distill.png", "distill.json")


@dataclass
class StudentConfig:
    layers: int = param(2, "student transformer layers (DistilHuBERT: 2)", ge=1)
    embed_dim: int | None = param(None, "student width (null: the teacher's, so its layers can initialise it)", ge=8)
    ffn_dim: int | None = param(None, "student feed-forward width (null: the teacher's)", ge=8)
    heads: int | None = param(None, "student attention heads (null: the teacher's)", ge=1)
    pred_layers: list[int] = param(
        [],
        "teacher layers the prediction heads regress (empty: a third, two thirds and all of the teacher's depth; "
        "4, 8, 12 for HuBERT Base)",
        ge=1,
    )
    init_from_teacher: bool = param(True, "start from the teacher's CNN and first transformer layers")
    dropout: float = param(0.1, "transformer dropout", ge=0, lt=1)
    attention_dropout: float = param(0.1, "attention-weight dropout", ge=0, lt=1)
    activation_dropout: float = param(0.1, "dropout after the FFN activation", ge=0, lt=1)
    feature_grad_mult: float = param(0.1, "scale of the CNN's gradients", gt=0, le=1)


@dataclass
class DistillLossConfig:
    cosine_weight: float = param(1.0, "lambda: weight of -log sigmoid(cos) next to the L1 term", ge=0)
    kmeans_weight: float = param(
        0.0, "weight of masked prediction of the client's k-means labels by the student (0: off; needs 'kmeans')", ge=0
    )
    mask_prob: float = param(0.8, "with kmeans_weight > 0: share of frames starting a masked span", ge=0, le=1)
    mask_length: int = param(10, "with kmeans_weight > 0: masked span length in frames", ge=1)
    label_dim: int = param(256, "with kmeans_weight > 0: projection size of the label embeddings", ge=2)


# DistilHuBERT trains its student with 2e-4, 0.4 of HuBERT Base's 5e-4: an unset student learning rate is this share
# of the teacher preset's (fedhubert.model.config.PRESET_LR).
DISTILL_LR_SHARE = 0.4


@dataclass
class DistillConfig(RoundsConfig):
    teacher: Path | None = param(None, "the pretrained HuBERT checkpoint (fedhubert pretrain/train-local) (required)")
    kmeans: Path | None = param(None, "k-means folder of that partition: needed only with loss.kmeans_weight > 0")
    student: StudentConfig = param(StudentConfig(), "DistilHuBERT student")
    loss: DistillLossConfig = param(DistillLossConfig(), "distillation loss")
    # RoundsConfig's key with DistilHuBERT's warm-up as its default.
    train: TrainConfig = param(
        TrainConfig(optim=OptimConfig(warmup_fraction=0.07)),
        "each client's local trainer (DistilHuBERT: 7% warm-up; an unset lr is DISTILL_LR_SHARE of the teacher "
        "preset's, which gives its 2e-4 for a Base teacher)",
    )

    def validate(self) -> None:
        for key in ("teacher", "partition"):
            if getattr(self, key) is None:
                raise ConfigError(f"key '{key}' is required: pass --{key} PATH")
        if self.loss.kmeans_weight > 0 and self.kmeans is None:
            raise ConfigError("key 'kmeans' is required when loss.kmeans_weight > 0 (the labels to predict)")
