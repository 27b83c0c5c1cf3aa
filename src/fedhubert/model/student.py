"""The DistilHuBERT student: S3PRL's own `DistillerModel` (the DistilHuBERT implementation that S3PRL's
`distiller_local` upstream loads), so an exported student is S3PRL's model as it is. It can start from a HuBERT
teacher: the CNN, the feature projection, the positional convolution and the first transformer layers are copied
(parameter names mapped as in the HuBERT export).

Optionally the student also predicts k-means labels on masked frames: a mask embedding replaces masked frames of
its input and a label head (projection + label embeddings, cosine logits as HuBERT's) gives the logits; the head
is not part of the S3PRL export. The layer predictions still come from the whole input, so with labels the
student's encoder runs twice per step (once unmasked, once masked; the CNN runs once).
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import Tensor, nn
from torchaudio.models.wav2vec2.components import _compute_mask_indices

from fedhubert.model.fairseq_keys import torchaudio_key
from fedhubert.model.hubert import cosine_logits, recompute_in_backward

LABEL_HEAD_KEYS = ("mask_emb", "label_proj.weight", "label_proj.bias", "label_embeddings")
_LOGIT_TEMPERATURE = 0.1


def s3prl_distiller(config: dict) -> nn.Module:
    from s3prl.upstream.distiller.model import DistillerConfig, DistillerModel

    with contextlib.redirect_stdout(io.StringIO()):  # S3PRL prints its choices
        return DistillerModel(DistillerConfig(config))


class Student(nn.Module):
    """S3PRL's DistillerModel, plus an optional masked-prediction head for k-means labels."""

    def __init__(
        self, config: dict, num_classes: int = 0, label_dim: int = 256, mask_prob: float = 0.8, mask_length: int = 10
    ):
        super().__init__()
        self.config = config
        self.distiller = s3prl_distiller(config)
        self.num_classes = num_classes
        self.mask_prob, self.mask_length = mask_prob, mask_length
        if num_classes:
            width = config["encoder_embed_dim"]
            self.mask_emb = nn.Parameter(torch.empty(width).uniform_())
            self.label_proj = nn.Linear(width, label_dim)
            self.label_embeddings = nn.Parameter(torch.empty(num_classes, label_dim).uniform_())

    def features(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        """The CNN's features, projected to the encoder's width (B, T, D), and S3PRL's frame padding mask."""
        d = self.distiller
        feat, pad_mask = d.forward_feature(wave, torch.ones_like(wave))
        return (d.post_extract_proj(feat) if d.post_extract_proj is not None else feat), pad_mask

    def transform(self, feat: Tensor, pad_mask: Tensor) -> tuple[Tensor, list[Tensor]]:
        """S3PRL's encoder and expand-last heads on projected features: (predictions (B, heads, T, D), the encoder
        layers' outputs)."""
        d = self.distiller
        hidden, layer_hiddens = d.encoder(feat, ~pad_mask.bool(), get_hidden=True)
        b, t, _ = hidden.shape
        pred = d.output_layer(hidden).reshape(b, t, d.n_tasks, -1).permute(0, 2, 1, 3)
        return pred, layer_hiddens

    def masked(self, feat: Tensor, mask: Tensor) -> Tensor:
        """`feat` with the frames of `mask` (B, T) replaced by the mask embedding."""
        return torch.where(mask.unsqueeze(-1), self.mask_emb.to(feat.dtype), feat)

    def encode(self, wave: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """S3PRL's forward (expand-last heads, no padding): (predictions (B, heads, T, D), the encoder layers'
        outputs, the projected features)."""
        feat, pad_mask = self.features(wave)
        pred, layer_hiddens = self.transform(feat, pad_mask)
        return pred, layer_hiddens, feat

    def forward(self, wave: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(predictions, logits of the masked frames, logits of the others); logits only with labels. The
        predictions always come from the unmasked input (they regress the teacher's layers of that input); with
        labels the encoder runs a second time, on the masked input, for the logits."""
        feat, pad_mask = self.features(wave)
        pred, _ = self.transform(feat, pad_mask)
        if labels is None or not self.num_classes:
            return pred, None, None
        # one label per frame: the student's CNN is the teacher's, so the crop's labels fit its frames
        mask = _compute_mask_indices(
            tuple(labels.shape), None, self.mask_prob, self.mask_length, "static", 0.0, min_masks=2
        ).to(wave.device)
        _, layer_hiddens = self.transform(self.masked(feat, mask), pad_mask)
        proj = self.label_proj(layer_hiddens[-1])
        logit_m = cosine_logits(proj[mask], labels[mask], self.label_embeddings, _LOGIT_TEMPERATURE)
        logit_u = cosine_logits(proj[~mask], labels[~mask], self.label_embeddings, _LOGIT_TEMPERATURE)
        return pred, logit_m, logit_u

    def enable_checkpointing(self, layers: bool, cnn: bool) -> None:
        """Recompute the transformer layers (and the CNN blocks) in the backward pass, as for the HuBERT."""
        modules = [
            *(self.distiller.encoder.layers if layers else []),
            *(self.distiller.feature_extractor.conv_layers if cnn else []),
        ]
        for module in modules:
            recompute_in_backward(module)

    @torch.no_grad()
    def hidden_states(self, wave: Tensor) -> list[Tensor]:
        """The hidden states S3PRL's distiller upstream exposes: [features, encoder layers, prediction heads]."""
        pred, layer_hiddens, feat_final = self.encode(wave)
        return [feat_final, *layer_hiddens, *pred.unbind(1)]


def init_from_teacher(student: Student, teacher_state: dict[str, Tensor]) -> list[str]:
    """Copy every student parameter that has a same-shaped teacher counterpart; returns the copied names."""
    state = student.distiller.state_dict()
    copied = []
    for key in state:
        try:
            source = teacher_state[torchaudio_key(key)]
        except (KeyError, ValueError):
            continue  # prediction heads, or a layer the teacher does not have
        if source.shape == state[key].shape:
            state[key] = source.clone()
            copied.append(key)
    student.distiller.load_state_dict(state)
    return copied
