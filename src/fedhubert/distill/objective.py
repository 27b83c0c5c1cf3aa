"""The distillation objective. Loss per head (the paper): L1 + lambda * mean(-log sigmoid(cos)) between the
student's predictions and the frozen teacher's layers, summed over the heads; with `loss.kmeans_weight > 0`, plus
that weight times HuBERT's masked cross-entropy on the client's k-means labels, which costs about one more
transformer forward and backward per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchaudio.models.wav2vec2.model import HuBERTPretrainModel

from fedhubert.distill.config import DistillLossConfig
from fedhubert.model.config import ModelConfig
from fedhubert.model.hubert import hidden_states
from fedhubert.model.student import Student
from fedhubert.train.config import LossConfig
from fedhubert.train.data import Batch
from fedhubert.train.loop import StepOutput, autocast, hubert_loss


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
        out = {
            "l1": sums.get("l1", 0.0) / max(sums.get("batches", 0), 1),
            "cos": sums.get("cos", 0.0) / max(sums.get("batches", 0), 1),
        }
        if "masked" in sums:
            out["acc_masked"] = sums["correct_m"] / max(sums["masked"], 1)
        return out
