"""HuBERT architecture config with presets (kept free of torch: the CLI reads it for --help).

`model.preset` picks tiny, small, base (the paper's HuBERT Base, ~95 M parameters) or large; any field set
explicitly (in a file or as `model.layers=4`) overrides the preset. configs/models/<preset>.yaml show each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from fedhubert.config import param
from fedhubert.errors import ConfigError

LABEL_RATE = 100  # k-means labels per second (MFCC frames)
FEATURE_STRIDE = 320  # samples per transformer frame (50 Hz): the CNN's total stride


def _conv(channels: int) -> list[list[int]]:
    """The wav2vec 2.0 / HuBERT CNN: (channels, kernel, stride) x 7, total stride 320."""
    return [[channels, 10, 5]] + [[channels, 3, 2] for _ in range(4)] + [[channels, 2, 2] for _ in range(2)]


_RECIPE = {  # HuBERT Base recipe values shared by the presets unless they say otherwise
    "extractor_mode": "group_norm",
    "conv_bias": False,
    "layer_norm_first": False,
    "pos_conv_kernel": 128,
    "pos_conv_groups": 16,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "projection_dropout": 0.1,
    "layer_drop": 0.05,
    "mask_prob": 0.8,
    "mask_length": 10,
    "mask_channel_prob": 0.0,
    "mask_channel_length": 10,
    "feature_grad_mult": 0.1,
    "logit_temperature": 0.1,
    "normalize_waveform": False,
}

PRESETS: dict[str, dict] = {
    "tiny": {
        **_RECIPE,
        "conv_layers": _conv(32),
        "embed_dim": 64,
        "layers": 2,
        "heads": 2,
        "ffn_dim": 128,
        "final_dim": 32,
        "pos_conv_kernel": 16,
        "pos_conv_groups": 4,
        "layer_drop": 0.0,
    },
    "small": {
        **_RECIPE,
        "conv_layers": _conv(256),
        "embed_dim": 384,
        "layers": 6,
        "heads": 6,
        "ffn_dim": 1536,
        "final_dim": 128,
    },
    "base": {
        **_RECIPE,
        "conv_layers": _conv(512),
        "embed_dim": 768,
        "layers": 12,
        "heads": 12,
        "ffn_dim": 3072,
        "final_dim": 256,
    },
    "large": {
        **_RECIPE,
        "extractor_mode": "layer_norm",
        "conv_layers": _conv(512),
        "embed_dim": 1024,
        "layers": 24,
        "heads": 16,
        "ffn_dim": 4096,
        "final_dim": 768,
        "layer_norm_first": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "projection_dropout": 0.0,
        "layer_drop": 0.0,
        "feature_grad_mult": 1.0,
        "normalize_waveform": True,
    },
}
_BASE = PRESETS["base"]

# The peak learning rate each preset trains well with, used where `train.optim.lr` is null: base and large are the
# fairseq recipe's (hubert_base_librispeech 5e-4, hubert_large_ll60k 1.5e-3); tiny is measured here
# (benchmarks/learning.py); small is not measured (between tiny's and base's).
PRESET_LR: dict[str, float] = {"tiny": 5e-3, "small": 1e-3, "base": 5e-4, "large": 1.5e-3}


@dataclass
class ModelConfig:
    PRESETS: ClassVar[dict[str, dict]] = PRESETS

    preset: str = param(
        "base", "architecture preset; fields set explicitly override it", choices=["tiny", "small", "base", "large"]
    )
    extractor_mode: Literal["group_norm", "layer_norm"] = param(
        _BASE["extractor_mode"], "CNN normalisation: group_norm (Base, first layer) or layer_norm (Large, all)"
    )
    conv_layers: list[list[int]] = param(_BASE["conv_layers"], "CNN layers as [channels, kernel, stride]", ge=1)
    conv_bias: bool = param(_BASE["conv_bias"], "bias in the CNN convolutions")
    embed_dim: int = param(_BASE["embed_dim"], "transformer width", ge=8)
    layers: int = param(_BASE["layers"], "transformer layers", ge=1)
    heads: int = param(_BASE["heads"], "attention heads", ge=1)
    ffn_dim: int = param(_BASE["ffn_dim"], "feed-forward width", ge=8)
    layer_norm_first: bool = param(_BASE["layer_norm_first"], "pre-norm transformer (Large) instead of post-norm")
    pos_conv_kernel: int = param(_BASE["pos_conv_kernel"], "convolutional positional embedding kernel", ge=2)
    pos_conv_groups: int = param(_BASE["pos_conv_groups"], "convolutional positional embedding groups", ge=1)
    final_dim: int = param(_BASE["final_dim"], "projection size for the label embeddings", ge=2)
    dropout: float = param(_BASE["dropout"], "transformer dropout", ge=0, lt=1)
    attention_dropout: float = param(_BASE["attention_dropout"], "attention-weight dropout", ge=0, lt=1)
    activation_dropout: float = param(_BASE["activation_dropout"], "dropout after the FFN activation", ge=0, lt=1)
    projection_dropout: float = param(_BASE["projection_dropout"], "dropout after the feature projection", ge=0, lt=1)
    layer_drop: float = param(_BASE["layer_drop"], "probability of skipping a transformer layer", ge=0, lt=1)
    mask_prob: float = param(_BASE["mask_prob"], "share of frames starting a masked span", ge=0, le=1)
    mask_length: int = param(_BASE["mask_length"], "masked span length in frames", ge=1)
    mask_channel_prob: float = param(_BASE["mask_channel_prob"], "feature-channel masking probability", ge=0, le=1)
    mask_channel_length: int = param(_BASE["mask_channel_length"], "masked channel span", ge=1)
    feature_grad_mult: float = param(
        _BASE["feature_grad_mult"], "scale of the CNN's gradients (1: unscaled)", gt=0, le=1
    )
    logit_temperature: float = param(_BASE["logit_temperature"], "temperature of the cosine-similarity logits", gt=0)
    normalize_waveform: bool = param(_BASE["normalize_waveform"], "zero-mean unit-variance input (Large)")

    def validate(self) -> None:
        if any(len(layer) != 3 for layer in self.conv_layers):
            raise ConfigError("key 'model.conv_layers' must list [channels, kernel, stride] triples")
        stride = 1
        for _, _, step in self.conv_layers:
            stride *= step
        if stride != FEATURE_STRIDE:
            raise ConfigError(
                f"key 'model.conv_layers' must downsample by {FEATURE_STRIDE} in total (50 Hz frames "
                f"for 100 Hz labels), got {stride}"
            )
        if self.embed_dim % self.heads:
            raise ConfigError(
                f"key 'model.embed_dim' ({self.embed_dim}) must be divisible by 'model.heads' ({self.heads})"
            )
        if self.embed_dim % self.pos_conv_groups:
            raise ConfigError(
                f"key 'model.embed_dim' ({self.embed_dim}) must be divisible by 'model.pos_conv_groups' "
                f"({self.pos_conv_groups})"
            )
