"""The distillation objective with the k-means term (`loss.kmeans_weight > 0`): the student regresses the
teacher's layers from the unmasked input (the teacher's targets come from it) and predicts the labels from the
masked one. Tiny real models: a tiny-preset HuBERT teacher and S3PRL's DistillerModel as the student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchaudio.models.wav2vec2.components import _compute_mask_indices

from fedhubert.config import load_config
from fedhubert.distill.config import DistillLossConfig, StudentConfig
from fedhubert.distill.models import build_student, distiller_config
from fedhubert.distill.objective import Distillation
from fedhubert.model.config import ModelConfig
from fedhubert.model.frames import feature_frames
from fedhubert.model.hubert import build_hubert, cosine_logits, hidden_states
from fedhubert.model.student import init_from_teacher
from fedhubert.train.data import Batch

TINY = load_config(ModelConfig, None, ["preset=tiny"])
K = 10
LAYERS = [1, 2]
SAMPLES = 24000
CPU = torch.device("cpu")


@pytest.fixture
def setup():
    """(objective, student in eval mode: no dropout, so its passes are deterministic, a batch with labels)."""
    torch.manual_seed(0)
    teacher = build_hubert(TINY, 8).eval()
    loss = DistillLossConfig(kmeans_weight=0.5, label_dim=16)
    student = build_student(distiller_config(StudentConfig(layers=1), TINY, LAYERS, loss.cosine_weight), loss, K)
    init_from_teacher(student, teacher.state_dict())
    student.eval()
    generator = torch.Generator().manual_seed(1)
    wave = torch.randn(2, SAMPLES, generator=generator) * 0.1
    labels = torch.randint(K, (2, feature_frames(SAMPLES, TINY)), generator=generator)
    return Distillation(teacher, TINY, LAYERS, loss), student, Batch(wave, labels)


def regression_terms(objective: Distillation, pred: torch.Tensor, wave: torch.Tensor) -> tuple[float, float]:
    """(L1 summed over the heads, mean cosine) of `pred` against the teacher's layers of the unmasked `wave`."""
    states = hidden_states(objective.teacher, wave, None, TINY.normalize_waveform)
    target = torch.stack([states[layer] for layer in LAYERS], dim=1)
    pred = pred[:, :, : target.shape[2]]
    return float((pred - target).abs().mean(dim=(0, 2, 3)).sum()), float(F.cosine_similarity(pred, target, -1).mean())


def test_the_regression_term_comes_from_the_unmasked_input(setup):
    objective, student, batch = setup
    torch.manual_seed(3)
    with torch.no_grad():
        out = objective.step(student, batch, CPU, "fp32")
        unmasked_pred = student.encode(batch.waveforms)[0]
        l1, cos = regression_terms(objective, unmasked_pred, batch.waveforms)
    assert out.sums["masked"] > 0, "the k-means term ran, on masked frames"
    assert out.sums["l1"] == pytest.approx(l1, rel=1e-5) and out.sums["cos"] == pytest.approx(cos, rel=1e-5)


def masked_label_logits(student, wave: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The label head on S3PRL's distiller run by hand over features whose `mask` frames are the mask embedding."""
    d = student.distiller
    feat, pad_mask = d.forward_feature(wave, torch.ones_like(wave))
    feat = d.post_extract_proj(feat) if d.post_extract_proj is not None else feat
    feat = torch.where(mask.unsqueeze(-1), student.mask_emb, feat)
    _, layer_hiddens = d.encoder(feat, ~pad_mask.bool(), get_hidden=True)
    return cosine_logits(student.label_proj(layer_hiddens[-1])[mask], labels[mask], student.label_embeddings, 0.1)


def test_the_label_term_comes_from_the_masked_input(setup):
    objective, student, batch = setup
    loss = objective.loss
    with torch.no_grad():
        torch.manual_seed(4)
        _, logit_m, _ = student(batch.waveforms, batch.labels)
        torch.manual_seed(4)  # the same draw: the student's unmasked pass draws nothing in eval mode
        mask = _compute_mask_indices(
            tuple(batch.labels.shape), None, loss.mask_prob, loss.mask_length, "static", 0.0, min_masks=2
        )
        expected = masked_label_logits(student, batch.waveforms, batch.labels, mask)
        last_layer = student.encode(batch.waveforms)[1][-1]
        from_unmasked = cosine_logits(
            student.label_proj(last_layer)[mask], batch.labels[mask], student.label_embeddings, 0.1
        )
    assert len(logit_m) == int(mask.sum()) > 0
    torch.testing.assert_close(logit_m, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logit_m, from_unmasked, atol=1e-2), "masking changes what the label head sees"
