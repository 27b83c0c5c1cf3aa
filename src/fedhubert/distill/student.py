"""The DistilHuBERT student, its frozen teacher, and the distillation objective.

The student is S3PRL's own `DistillerModel` (the DistilHuBERT implementation that S3PRL's `distiller_local`
upstream loads), so an exported student is S3PRL's model as it is. It starts from the teacher: the CNN, the
feature projection, the positional convolution and the first transformer layers are copied (parameter names
mapped with torchaudio's fairseq map, as in the HuBERT export); the prediction heads regress chosen teacher
layers. Loss per head (the paper): L1 + lambda * mean(-log sigmoid(cos)), summed over the heads.

Optionally the student also predicts the client's k-means labels on masked frames (`loss.kmeans_weight`): a mask
embedding replaces masked frames of its input and a label head (projection + label embeddings, cosine logits as
HuBERT's) is trained with cross-entropy; the head is not part of the S3PRL export. The layer regression still
sees the whole input: the teacher's targets come from the unmasked audio, so the student's encoder runs twice per
step (once unmasked for the regression, once masked for the label term; the CNN runs once), which costs about
one more transformer forward and backward per step while the k-means term is on.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchaudio.models.wav2vec2.components import _compute_mask_indices
from torchaudio.models.wav2vec2.model import HuBERTPretrainModel

from fedhubert.distill.config import DistillLossConfig, StudentConfig
from fedhubert.errors import ConfigError
from fedhubert.model.checkpoint import load_checkpoint, model_config_of
from fedhubert.model.config import ModelConfig
from fedhubert.model.export import _ours
from fedhubert.model.hubert import build_hubert, cosine_logits, hidden_states, recompute_in_backward
from fedhubert.train.data import Batch
from fedhubert.train.loop import StepOutput, autocast, hubert_loss
from fedhubert.train.config import LossConfig

LABEL_HEAD_KEYS = ("mask_emb", "label_proj.weight", "label_proj.bias", "label_embeddings")
_LOGIT_TEMPERATURE = 0.1


def load_teacher(path: Path) -> tuple[HuBERTPretrainModel, ModelConfig, dict]:
    """The teacher, frozen: eval mode, no gradients. A missing file, a corrupt one or one that is not a HuBERT
    checkpoint stops with a CheckpointError naming the file."""
    payload = load_checkpoint(path, kind="hubert")
    cfg = model_config_of(payload)
    model = build_hubert(cfg, payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, cfg, payload


def prediction_layers(student: StudentConfig, teacher: ModelConfig) -> list[int]:
    """The teacher layers to regress: as configured, or a third, two thirds and all of its depth."""
    layers = student.pred_layers or sorted({max(1, round(teacher.layers * k / 3)) for k in (1, 2, 3)})
    too_deep = [layer for layer in layers if layer > teacher.layers]
    if too_deep:
        raise ConfigError(f"key 'student.pred_layers' asks for teacher layers {too_deep}, but the teacher has "
                          f"{teacher.layers}")
    return list(layers)


def distiller_config(student: StudentConfig, teacher: ModelConfig, pred_layers: list[int],
                     cosine_weight: float) -> dict:
    """S3PRL DistillerConfig fields (saved as the exported checkpoint's Config['distiller'])."""
    width = student.embed_dim or teacher.embed_dim
    return {
        "extractor_mode": "default" if teacher.extractor_mode == "group_norm" else "layer_norm",
        "extractor_conv_feature_layers": repr([tuple(layer) for layer in teacher.conv_layers]),
        "extractor_dropout": 0.0,
        "feature_grad_mult": student.feature_grad_mult,
        "conv_pos": teacher.pos_conv_kernel,
        "conv_pos_groups": teacher.pos_conv_groups,
        "encoder_layers": student.layers,
        "encoder_embed_dim": width,
        "encoder_ffn_embed_dim": student.ffn_dim or teacher.ffn_dim,
        "encoder_attention_heads": student.heads or teacher.heads,
        "activation_fn": "gelu",
        "layer_norm_first": teacher.layer_norm_first,
        "attention_type": "original",
        "dropout": student.dropout,
        "attention_dropout": student.attention_dropout,
        "activation_dropout": student.activation_dropout,
        "encoder_layerdrop": 0.0,
        "final_dim": teacher.embed_dim,
        "out_layer_type": "expand-last",
        "out_layer_inter_dim": -1,
        "n_tasks": len(pred_layers),
        "task_emb_type": "expand-last",
        "task_emb_size": 0,
        "layer_emb_size": 0,
        "loss_type": "l1",
        "feat_pen_loss": 0.0,
        "cosine_loss": cosine_weight,
        "pred_layer_id": list(pred_layers),
        "init_teacher_conv_layers": student.init_from_teacher,
        "init_teacher_encoder_layers": student.init_from_teacher,
    }


def s3prl_distiller(config: dict) -> nn.Module:
    from s3prl.upstream.distiller.model import DistillerConfig, DistillerModel

    with contextlib.redirect_stdout(io.StringIO()):  # S3PRL prints its choices
        return DistillerModel(DistillerConfig(config))


class Student(nn.Module):
    """S3PRL's DistillerModel, plus an optional masked-prediction head for k-means labels."""

    def __init__(self, config: dict, num_classes: int = 0, label_dim: int = 256, mask_prob: float = 0.8,
                 mask_length: int = 10):
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
        mask = _compute_mask_indices(tuple(labels.shape), None, self.mask_prob, self.mask_length, "static", 0.0,
                                     min_masks=2).to(wave.device)
        _, layer_hiddens = self.transform(self.masked(feat, mask), pad_mask)
        proj = self.label_proj(layer_hiddens[-1])
        logit_m = cosine_logits(proj[mask], labels[mask], self.label_embeddings, _LOGIT_TEMPERATURE)
        logit_u = cosine_logits(proj[~mask], labels[~mask], self.label_embeddings, _LOGIT_TEMPERATURE)
        return pred, logit_m, logit_u

    def enable_checkpointing(self, layers: bool, cnn: bool) -> None:
        """Recompute the transformer layers (and the CNN blocks) in the backward pass, as for the HuBERT."""
        modules = [*(self.distiller.encoder.layers if layers else []),
                   *(self.distiller.feature_extractor.conv_layers if cnn else [])]
        for module in modules:
            recompute_in_backward(module)

    @torch.no_grad()
    def hidden_states(self, wave: Tensor) -> list[Tensor]:
        """The hidden states S3PRL's distiller upstream exposes: [features, encoder layers, prediction heads]."""
        pred, layer_hiddens, feat_final = self.encode(wave)
        return [feat_final, *layer_hiddens, *pred.unbind(1)]


def build_student(config: dict, loss: DistillLossConfig, num_classes: int = 0) -> Student:
    return Student(config, num_classes if loss.kmeans_weight > 0 else 0, loss.label_dim, loss.mask_prob,
                   loss.mask_length)


def init_from_teacher(student: Student, teacher_state: dict[str, Tensor]) -> list[str]:
    """Copy every student parameter that has a same-shaped teacher counterpart; returns the copied names."""
    state = student.distiller.state_dict()
    copied = []
    for key in state:
        try:
            source = teacher_state[_ours(key)]
        except (KeyError, ValueError):
            continue  # prediction heads, or a layer the teacher does not have
        if source.shape == state[key].shape:
            state[key] = source.clone()
            copied.append(key)
    student.distiller.load_state_dict(state)
    return copied


@dataclass
class Distillation:
    """The distillation objective for the local trainer: teacher targets computed on the spot, frozen. With
    `loss.kmeans_weight > 0` the student's encoder runs twice per step: unmasked for the regression of the
    teacher's layers (computed from the same unmasked audio), masked for the k-means label term."""

    teacher: HuBERTPretrainModel
    teacher_config: ModelConfig
    pred_layers: list[int]
    loss: DistillLossConfig

    def step(self, model: Student, batch: Batch, device: torch.device, precision: str) -> StepOutput:
        wave = batch.waveforms.to(device, non_blocking=True)
        with torch.no_grad(), autocast(device, precision):
            states = hidden_states(self.teacher, wave, None, self.teacher_config.normalize_waveform)
            target = torch.stack([states[layer] for layer in self.pred_layers], dim=1).float()
        labels = batch.labels.to(device) if self.loss.kmeans_weight > 0 else None
        with autocast(device, precision):
            pred, logit_m, logit_u = model(wave, labels)
        pred = pred.float()[:, :, : target.shape[2]]
        l1 = (pred - target).abs().mean(dim=(0, 2, 3))
        cos = F.cosine_similarity(pred, target, dim=-1)
        total = l1.sum() + self.loss.cosine_weight * (-F.logsigmoid(cos)).mean(dim=(0, 2)).sum()
        sums = {"batches": 1, "l1": float(l1.sum()), "cos": float(cos.mean())}
        if logit_m is not None:
            masked = hubert_loss(logit_m, logit_u, torch.zeros(()), LossConfig(feature_penalty=0.0))
            total = total + self.loss.kmeans_weight * masked.loss
            sums.update(masked.sums)
        return StepOutput(total, sums)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        out = {"l1": sums.get("l1", 0.0) / max(sums.get("batches", 0), 1),
               "cos": sums.get("cos", 0.0) / max(sums.get("batches", 0), 1)}
        if "masked" in sums:
            out["acc_masked"] = sums["correct_m"] / max(sums["masked"], 1)
        return out
