"""HuBERT for pretraining, built with `torchaudio.models.hubert_pretrain_model` and extended where it falls short.

- `LabelLogits` replaces torchaudio's logit generator with the same parameters (state-dict names unchanged) and
  the same outputs: per frame, [positive, all K classes with the positive's own class at -inf], divided by a
  configurable temperature. torchaudio materialises a (K+1) x frames x final_dim tensor of label embeddings to
  take cosine similarities; this computes them as one matrix product of normalised vectors, which saves that
  memory and time.
- `enable_checkpointing` recomputes each transformer layer (and optionally each CNN block) in the backward pass
  instead of keeping its activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torchaudio.models import hubert_pretrain_model
from torchaudio.models.wav2vec2 import components
from torchaudio.models.wav2vec2.model import HuBERTPretrainModel

from fedhubert.model.config import ModelConfig

# The label-prediction head: with per-client codebooks it stays on each client and is never aggregated.
LABEL_HEAD_KEYS = (
    "logit_generator.label_embeddings",
    "logit_generator.final_proj.weight",
    "logit_generator.final_proj.bias",
)


def cosine_logits(proj_x: Tensor, target: Tensor, label_embeddings: Tensor, temperature: float) -> Tensor:
    """Per frame: [cos(x, e_target), cos(x, e_k) for every class k with the target's own at -inf] / temperature,
    the positive first (torchaudio's and fairseq's layout), as one product of normalised matrices."""
    x = F.normalize(proj_x.float(), dim=-1, eps=1e-8)
    emb = F.normalize(label_embeddings.float(), dim=-1, eps=1e-8)
    sims = x @ emb.T  # (frames, K)
    positive = sims.gather(1, target.long().unsqueeze(1))
    negatives = sims.scatter(1, target.long().unsqueeze(1), float("-inf"))
    return (torch.cat([positive, negatives], dim=1) / temperature).type_as(proj_x)


class LabelLogits(components.LogitGenerator):
    """torchaudio's LogitGenerator with a configurable temperature and memory-light logits."""

    temperature: float = 0.1

    def _logits(self, proj_x: Tensor, target: Tensor) -> Tensor:
        return cosine_logits(proj_x, target, self.label_embeddings, self.temperature)

    def forward(self, x: Tensor, label: Tensor, mask_m: Tensor, mask_u: Tensor) -> tuple[Tensor | None, Tensor | None]:
        proj_x = self.final_proj(x)
        logit_m = None if self.skip_masked else self._logits(proj_x[mask_m], label[mask_m])
        logit_u = None if self.skip_nomask else self._logits(proj_x[mask_u], label[mask_u])
        return logit_m, logit_u


def build_hubert(cfg: ModelConfig, num_classes: int) -> HuBERTPretrainModel:
    """A freshly initialised HuBERT for masked prediction of `num_classes` k-means labels."""
    model = hubert_pretrain_model(
        extractor_mode=cfg.extractor_mode,
        extractor_conv_layer_config=[tuple(layer) for layer in cfg.conv_layers],
        extractor_conv_bias=cfg.conv_bias,
        encoder_embed_dim=cfg.embed_dim,
        encoder_projection_dropout=cfg.projection_dropout,
        encoder_pos_conv_kernel=cfg.pos_conv_kernel,
        encoder_pos_conv_groups=cfg.pos_conv_groups,
        encoder_num_layers=cfg.layers,
        encoder_num_heads=cfg.heads,
        encoder_attention_dropout=cfg.attention_dropout,
        encoder_ff_interm_features=cfg.ffn_dim,
        encoder_ff_interm_dropout=cfg.activation_dropout,
        encoder_dropout=cfg.dropout,
        encoder_layer_norm_first=cfg.layer_norm_first,
        encoder_layer_drop=cfg.layer_drop,
        mask_prob=cfg.mask_prob,
        mask_selection="static",
        mask_other=0.0,
        mask_length=cfg.mask_length,
        no_mask_overlap=False,
        mask_min_space=1,
        mask_channel_prob=cfg.mask_channel_prob,
        mask_channel_selection="static",
        mask_channel_other=0.0,
        mask_channel_length=cfg.mask_channel_length,
        no_mask_channel_overlap=False,
        mask_channel_min_space=1,
        skip_masked=False,
        skip_nomask=False,
        num_classes=num_classes,
        final_dim=cfg.final_dim,
        feature_grad_mult=cfg.feature_grad_mult if cfg.feature_grad_mult < 1 else None,
    )
    model.logit_generator.__class__ = LabelLogits
    model.logit_generator.temperature = cfg.logit_temperature
    return model


class _Recomputed:
    """Mixin: run the module's forward under activation checkpointing while training with gradients."""

    def forward(self, *args, **kwargs):
        parent = super()
        if self.training and torch.is_grad_enabled():
            return checkpoint(lambda *a, **k: parent.forward(*a, **k), *args, use_reentrant=False, **kwargs)
        return parent.forward(*args, **kwargs)


def recompute_in_backward(module: torch.nn.Module) -> None:
    """Make `module` recompute its forward in the backward pass (its class becomes a checkpointing subclass)."""
    if not isinstance(module, _Recomputed):
        cls = module.__class__
        module.__class__ = type(f"Recomputed{cls.__name__}", (_Recomputed, cls), {})


def enable_checkpointing(model: HuBERTPretrainModel, layers: bool = True, cnn: bool = False) -> None:
    """Activation checkpointing per transformer layer and, optionally, per CNN block (names and weights as they
    were). Dropout masks are recomputed identically (the RNG state is restored), so gradients do not change."""
    if layers:
        for layer in model.wav2vec2.encoder.transformer.layers:
            recompute_in_backward(layer)
    if cnn:
        for block in model.wav2vec2.feature_extractor.conv_layers:
            recompute_in_backward(block)


def normalize_waveforms(waveforms: Tensor, lengths: Tensor | None) -> Tensor:
    """Zero mean, unit variance per utterance over its valid samples (HuBERT Large's `normalize`)."""
    out = torch.zeros_like(waveforms)
    for i in range(len(waveforms)):
        n = int(lengths[i]) if lengths is not None else waveforms.shape[1]
        out[i, :n] = F.layer_norm(waveforms[i, :n], (n,))
    return out


def hidden_states(
    model: HuBERTPretrainModel, waveforms: Tensor, lengths: Tensor | None, normalize: bool
) -> list[Tensor]:
    """[transformer input, output of layer 1, ..., output of the last layer (after the final layer norm for
    pre-norm models)], the layers S3PRL's upstreams expose as hidden_states. No masking, no dropout."""
    wav2vec2 = model.wav2vec2
    if normalize:
        waveforms = normalize_waveforms(waveforms, lengths)
    x, out_lengths = wav2vec2.feature_extractor(waveforms, lengths)
    x, attention_mask = wav2vec2.encoder._preprocess(x, out_lengths)
    transformer = wav2vec2.encoder.transformer
    x = transformer._preprocess(x)
    states = [x]
    position_bias = None
    for layer in transformer.layers:
        x, position_bias = layer(x, attention_mask, position_bias=position_bias)
        states.append(x)
    if not transformer.layer_norm_first:  # torchaudio's flag is the inverse of fairseq's layer_norm_first
        states[-1] = transformer.layer_norm(x)
    return states
